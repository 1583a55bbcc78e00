"""AdapterConfig lives with the other recipe dataclasses in ``ptscale.config`` (a recipe's ``adapter:``)."""

from ptscale.config import COMPONENTS, KINDS, NONLINEARITIES, AdapterConfig, Component

__all__ = ["COMPONENTS", "KINDS", "NONLINEARITIES", "AdapterConfig", "Component"]
