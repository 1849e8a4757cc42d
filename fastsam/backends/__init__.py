"""Backend selection: explicit ``backend=`` > ``FASTSAM_BACKEND`` > automatic.

Automatic: CUDA tensors get ``cuda`` (the extension's CUDA kernels) when ``fastsam._C`` was
built with them for this GPU, else ``triton`` when Triton is importable, else ``torch``; CPU
tensors get ``cpu`` when the extension is built, else ``torch``. A request that cannot be
honoured raises a ``RuntimeError`` that names every backend and why it was or was not usable,
so the fix is in the message.
"""
from __future__ import annotations

import os

import torch

from ..functional import Backend

BACKENDS = ("torch", "triton", "cpu", "cuda")
ENV_VAR = "FASTSAM_BACKEND"


def _refusal(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on ``device`` (None when it can)."""
    if name == "torch":
        return None
    if name == "triton":
        from . import triton as triton_backend

        return triton_backend.unavailable_reason(device)
    if name in ("cpu", "cuda"):
        from . import native

        return native.unavailable_reason(name, device)
    return f"unknown backend (choose from {', '.join(BACKENDS)})"


def _build(name: str) -> Backend:
    if name == "torch":
        from .torch import TorchBackend

        return TorchBackend()
    if name == "triton":
        from .triton import TritonBackend

        return TritonBackend()
    from .native import NativeBackend

    return NativeBackend(name)


def select_backend(requested: str | None, device: torch.device) -> Backend:
    """Return a backend instance for parameters on ``device``.

    Args:
        requested: a backend name, or None to consult ``FASTSAM_BACKEND`` and then choose
            automatically.
        device: the device every parameter lives on.
    """
    source = "backend="
    if requested is None:
        requested = os.environ.get(ENV_VAR) or None
        source = f"{ENV_VAR}="
    if requested is None:
        order = ("cuda", "triton", "torch") if device.type == "cuda" else ("cpu", "torch")
        for name in order:
            if _refusal(name, device) is None:
                return _build(name)
        requested, source = order[-1], "automatic choice "
    if not isinstance(requested, str):
        raise TypeError(f"backend must be a string or None, got {type(requested).__name__}")
    name = requested.lower()
    reason = _refusal(name, device)
    if reason is None:
        return _build(name)
    lines = [f"fastsam: {source}{requested!r} cannot run on {device.type} parameters."]
    for candidate in BACKENDS:
        why = _refusal(candidate, device)
        lines.append(f"  {candidate}: {'available' if why is None else why}")
    if name not in BACKENDS:
        lines.append(f"  {requested!r}: {reason}")
    raise RuntimeError("\n".join(lines))
