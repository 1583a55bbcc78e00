"""LoRA through peft: the recipe section (``config``, torch-free) and the injection (``model``).

``from ptscale.tuners.lora import inject_lora`` loads ``model`` (peft, torch) on first use only, so reading a
recipe never imports them."""

from __future__ import annotations

import importlib


def __getattr__(name: str):
    # import_module, not "from ptscale.tuners.lora import model": that would ask this very
    # __getattr__ for the submodule before importing it
    for sub in ('model',):
        module = importlib.import_module(f"{__name__}.{sub}")
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
