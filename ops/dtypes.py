"""The op's dtype contract, shared by the compiled path and the reference (see ``ops.criss_cross``).

Under ``torch.autocast`` the inputs are cast to the autocast dtype; the softmax over the slots
runs in float32 at least and the attention map is then cast to the value's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _autocast_device_types() -> frozenset[str]:
    found = set()
    for name in ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "xla", "privateuseone"):
        try:
            if torch.amp.is_autocast_available(name):
                found.add(name)
        except RuntimeError:  # a device type this build does not know
            pass
    return frozenset(found)


# Read once at import: torch.compile (dynamo) cannot trace torch.amp.is_autocast_available in
# every PyTorch release (2.11 graph-breaks on it), while a set lookup traces everywhere.
AUTOCAST_DEVICE_TYPES = _autocast_device_types()


def autocast_inputs(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Under ``torch.autocast`` for the inputs' device: float32/16/bf16 inputs cast to the autocast dtype."""
    first = tensors[0]
    if not isinstance(first, Tensor):
        return tensors
    device_type = first.device.type
    if device_type not in AUTOCAST_DEVICE_TYPES or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if castable(t) else t for t in tensors)


def castable(t) -> bool:
    """What autocast casts: float32, float16 and bfloat16 tensors (never float64), as PyTorch's own."""
    return isinstance(t, Tensor) and t.dtype in (torch.float32, torch.float16, torch.bfloat16)


def softmax_slots(energy: Tensor, dtype: torch.dtype, dim: int = 1) -> Tensor:
    """Softmax over the slots in float32 at least (float64 stays float64), cast to ``dtype``."""
    return torch.softmax(energy, dim=dim, dtype=torch.promote_types(energy.dtype, torch.float32)).to(dtype)
