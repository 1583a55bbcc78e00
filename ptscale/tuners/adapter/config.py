"""The ``adapter:`` section of a recipe (torch-free: read when the recipe is validated)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ptscale.errors import RecipeError
from ptscale.models.groups import COMPONENTS, Component

KINDS: tuple[str, ...] = ("sequential", "parallel")
NONLINEARITIES: tuple[str, ...] = ("relu", "gelu")


@dataclass
class AdapterConfig:
    kind: Literal["sequential", "parallel"] = field(default="sequential", metadata={"help": (
        "sequential: Houlsby et al. 2019, x -> x + s*A(x) after each attention output projection and each FFN "
        "output; parallel: He et al. 2022, FFN(x) + s*A(x) beside each FFN")})
    components: list[Component] = field(default_factory=lambda: ["qformer"], metadata={
        "help": "components whose layers get adapters (BLIP-2: vision, qformer, language_model; BLIP: vision, "
                "text_encoder, text_decoder; VinVL: bert; OFA: language_model)"})
    bottleneck: int | None = field(default=None, metadata={
        "help": "bottleneck width; give this or budget, not both"})
    budget: int | None = field(default=None, metadata={
        "help": "target adapter parameter count; the bottleneck whose count is closest is used (paper table 2 "
                "compares methods at matched trainable-parameter budgets)"})
    scale: float = field(default=1.0, metadata={
        "help": "multiplies the adapter output (He et al. use 4 for the parallel adapter; 1 is Houlsby's form)"})
    nonlinearity: Literal["relu", "gelu"] = field(default="relu", metadata={"help": "between down and up projection"})
    dropout: float = field(default=0.0, metadata={"help": "on the bottleneck activations, training only"})

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise RecipeError(f"adapter.kind: {self.kind!r} is not one of {', '.join(KINDS)}")
        if not self.components:
            raise RecipeError(f"adapter.components: empty; name at least one of {', '.join(COMPONENTS)}")
        for comp in self.components:
            if comp not in COMPONENTS:
                raise RecipeError(f"adapter.components: unknown component {comp!r}; known: {', '.join(COMPONENTS)}")
        if len(set(self.components)) != len(self.components):
            raise RecipeError(f"adapter.components: listed twice in {self.components}")
        if (self.bottleneck is None) == (self.budget is None):
            given = "both" if self.bottleneck is not None else "neither"
            raise RecipeError(f"adapter.bottleneck / adapter.budget: give exactly one (got {given}); budget picks "
                              "the bottleneck whose adapter parameter count is closest to it")
        for key in ("bottleneck", "budget"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise RecipeError(f"adapter.{key}: must be > 0, got {value}")
        if self.scale <= 0:
            raise RecipeError(f"adapter.scale: must be > 0, got {self.scale}")
        if self.nonlinearity not in NONLINEARITIES:
            raise RecipeError(f"adapter.nonlinearity: {self.nonlinearity!r} is not one of {', '.join(NONLINEARITIES)}")
        if not 0.0 <= self.dropout < 1.0:
            raise RecipeError(f"adapter.dropout: must be in [0, 1), got {self.dropout}")
