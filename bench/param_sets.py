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


SETS = {"resnet50": resnet50, "gpt2-medium": gpt2_medium, "many-tiny": many_tiny}
