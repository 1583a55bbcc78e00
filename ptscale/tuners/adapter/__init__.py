"""Bottleneck adapters: sequential (Houlsby et al., 2019) and parallel (He et al., 2022): the recipe section
(``config``, torch-free), the layers (``layer``) and their injection (``model``).

``from ptscale.tuners.adapter import inject_adapters`` loads ``model``/``layer`` (torch) on first use only, so
reading a recipe never imports them."""

from __future__ import annotations

import importlib


def __getattr__(name: str):
    # import_module, not "from ptscale.tuners.adapter import model": that would ask this very
    # __getattr__ for the submodule before importing it
    for sub in ('model', 'layer', 'config'):
        module = importlib.import_module(f"{__name__}.{sub}")
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
