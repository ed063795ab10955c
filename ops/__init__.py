"""Criss-cross attention (CCNet, Huang et al., ICCV 2019) as a PyTorch custom operator.

    import ops
    out = ops.criss_cross_attention(q, k, v)   # q, k (N, C', H, W), v (N, C, H, W)

CPU (C++) and CUDA kernels registered under ``torch.ops.ccnet_ops``, built on first use
(``python -m ops.build`` builds ahead of time); ``ops.reference`` is the pure-PyTorch form;
``ops.criss_cross_attention(q, k, v, fused=True)`` never stores the attention map (kernels of
ours on CUDA, ``csrc/cuda/cc_fused.cuh``; ``ops.fused`` elsewhere).
Nothing is built or registered at import time.
"""

from . import reference
from .criss_cross import (
    IMPLEMENTATIONS,
    criss_cross_attention,
    fused_by_default,
    get_implementation,
    load_compiled,
    require_compiled,
    set_implementation,
    use_implementation,
)

__all__ = [
    "IMPLEMENTATIONS",
    "criss_cross_attention",
    "fused_by_default",
    "get_implementation",
    "load_compiled",
    "reference",
    "require_compiled",
    "set_implementation",
    "use_implementation",
]
