"""What the dense MLP and the experts share: canonical linear specs and the activation."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron.core.pieces import CanonicalSpec


def linear_specs(name: str, out_f: int, in_f: int, std: float, bias: bool) -> tuple[CanonicalSpec, CanonicalSpec | None]:
    """The canonical weight ``[out_f, in_f]`` (and bias) of one linear layer called ``name``."""
    w = CanonicalSpec(f"{name}.weight", (out_f, in_f), "normal", std)
    b = CanonicalSpec(f"{name}.bias", (out_f,), "zeros", weight_decay=False) if bias else None
    return w, b


def activate(y: torch.Tensor, swiglu: bool, gelu_approximate: str) -> torch.Tensor:
    """SwiGLU on a fused ``[gate, up]`` output, else GeLU."""
    if swiglu:
        gate, up = y.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(y, approximate=gelu_approximate)
