"""Parameter shapes of real architectures, generated from their definitions (no downloads)."""


def resnet50():
    """torchvision's resnet50: 161 tensors, 25,557,032 parameters."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(width, inplanes, 1, 1), (width,), (width,)]
            shapes += [(width, width, 3, 3), (width,), (width,)]
            shapes += [(4 * width, width, 1, 1), (4 * width,), (4 * width,)]
            if b == 0:
                shapes += [(4 * width, inplanes, 1, 1), (4 * width,), (4 * width,)]
            inplanes = 4 * width
    return shapes + [(1000, 2048), (1000,)]


def vit_b16():
    """torchvision's vit_b_16: 152 tensors, 86,567,656 parameters."""
    d, mlp, layers = 768, 3072, 12
    shapes = [(d, 3, 16, 16), (d,), (1, 1, d), (1, 197, d)]  # patch embedding, class, position
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,)]  # norm, attention
        shapes += [(d,), (d,), (mlp, d), (mlp,), (d, mlp), (d,)]  # norm, MLP
    return shapes + [(d,), (d,), (1000, d), (1000,)]


def gpt2_medium():
    """HF GPT-2 medium (tied head): 292 tensors, 354,823,168 parameters."""
    d, vocab, ctx, layers = 1024, 50257, 1024, 24
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,)]
        shapes += [(d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def many_tiny(n=2000):
    """n bias-like tensors of 1-64 elements: a launch-overhead stress test."""
    return [(1 + (i * 37) % 64,) for i in range(n)]


def few_tiny():
    """200 of many-tiny's tensors: a quick look at the host's share (and the tests' set)."""
    return many_tiny(200)


SETS = {
    "resnet50": resnet50,
    "vit-b16": vit_b16,
    "gpt2-medium": gpt2_medium,
    "many-tiny": many_tiny,
    "few-tiny": few_tiny,
}
