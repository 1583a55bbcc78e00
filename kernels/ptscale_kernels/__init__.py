"""Triton kernels for ptscale: fused attention over a batch-shared prefix. Imports nothing from ptscale."""

from ptscale_kernels.reference import prefix_attention_mask, prefix_attention_reference
from ptscale_kernels.triton_prefix_attention import (
    KernelConfig,
    default_config,
    prefix_attention,
    triton_available,
)

__all__ = [
    "KernelConfig",
    "default_config",
    "prefix_attention",
    "prefix_attention_mask",
    "prefix_attention_reference",
    "triton_available",
]
