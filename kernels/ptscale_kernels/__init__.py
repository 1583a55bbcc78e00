"""Triton kernels for ptscale: fused attention over a batch-shared prefix, classic and Prefix-Tuning+.
Imports nothing from ptscale."""

from ptscale_kernels.reference import prefix_attention_mask, prefix_attention_reference
from ptscale_kernels.triton_prefix_attention import (
    KernelConfig,
    default_config,
    prefix_attention,
    triton_available,
)
from ptscale_kernels.triton_prefix_plus import (
    PlusConfig,
    default_plus_config,
    plus_memory,
    prefix_plus_attention,
)

__all__ = [
    "KernelConfig",
    "PlusConfig",
    "default_config",
    "default_plus_config",
    "plus_memory",
    "prefix_attention",
    "prefix_attention_mask",
    "prefix_attention_reference",
    "prefix_plus_attention",
    "triton_available",
]
