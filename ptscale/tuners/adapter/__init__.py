"""Bottleneck adapters: sequential (Houlsby et al., 2019) and parallel (He et al., 2022)."""

from ptscale.tuners.adapter.config import AdapterConfig
from ptscale.tuners.adapter.layer import (
    ADAPTER_PARAM_PATTERN,
    Bottleneck,
    ParallelAdapterLinear,
    SequentialAdapterLinear,
)
from ptscale.tuners.adapter.model import (
    AdapterInjection,
    adapter_param_count,
    adapter_sites,
    bottleneck_for_budget,
    has_adapters,
    inject_adapters,
)

__all__ = [
    "ADAPTER_PARAM_PATTERN",
    "AdapterConfig",
    "AdapterInjection",
    "Bottleneck",
    "ParallelAdapterLinear",
    "SequentialAdapterLinear",
    "adapter_param_count",
    "adapter_sites",
    "bottleneck_for_budget",
    "has_adapters",
    "inject_adapters",
]
