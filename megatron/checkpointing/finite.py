"""The NaN/Inf check every load and conversion makes on the values it reads."""
from __future__ import annotations

import numpy as np
import torch


def all_finite(values: np.ndarray | torch.Tensor) -> bool:
    """True unless ``values`` holds a NaN or an Inf. Min and max propagate NaN and show an Inf,
    in one pass without an array of flags (``torch.isfinite(t).all()`` costs ~30x more here)."""
    if values.size == 0 if isinstance(values, np.ndarray) else values.numel() == 0:
        return True
    if isinstance(values, np.ndarray):  # possibly a read-only view of a mapped file
        return bool(np.isfinite(values.min()) and np.isfinite(values.max()))
    low, high = torch.aminmax(values)
    return bool(torch.isfinite(low) and torch.isfinite(high))
