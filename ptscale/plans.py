"""Stages and named stage plans of the paper, expanded into explicit stages (pure: no model, no torch).

X is a second-stage method: lora, adapter (sequential or parallel, per the recipe's adapter section) or
full (full fine-tuning; embeddings and LM head stay frozen).

    prefix                 prefix-tuning only
    X                      X only (a baseline)
    prefix->X              PT-PEFT: prefix-tuning, then X with the prefixes still training
    X->prefix              reversed order (table 2): X, then prefix-tuning with X still training
    prefix+X               both at once in one stage (parallel, table 5b)
    alternate(prefix,X,N)  N rounds of prefix-only then X-only stages (table 9)

Each stage takes its hyper-parameters from ``methods.<method>``; a joint stage (prefix and X) uses X's.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from ptscale.errors import RecipeError


def documented(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING) -> Any:
    """A recipe field with its meaning (``help``) beside its default: docs/recipe.md and ``ptscale ls keys`` are
    generated from these (ptscale.docs)."""
    return field(default=default, default_factory=factory, metadata={"help": help})


METHODS = ("prefix", "lora", "adapter", "full")
MAX_ROUNDS = 100  # alternate(prefix,X,N): the paper's table 9 alternates a handful of times
_ALTERNATE = re.compile(r"^alternate\((\w+),(\w+),(\d+)\)$")


@dataclass
class MethodConfig:
    """One method's stage hyper-parameters (a row of the paper's tables 12-14). The plan decides which
    parameter groups each stage trains, so there is no ``train`` here."""

    epochs: float = field(default=1.0, metadata={"help": "passes over the training split"})
    steps: int | None = field(default=None, metadata={"help": "optimizer steps; overrides epochs when set"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate of AdamW (betas 0.9, 0.99)"})
    warmup_ratio: float = field(default=0.0, metadata={
        "help": "share of the stage's steps with linear warm-up (then linear decay to 0)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    batch_size: int = field(default=16, metadata={"help": "micro-batch per rank"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches accumulated per optimizer step"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm"})
    evaluate: bool = field(default=True, metadata={"help": "evaluate at the end of this stage"})


@dataclass
class StageConfig(MethodConfig):
    name: str = field(default="", metadata={"help": "the stage's name in logs, checkpoints and results"})
    train: list[str] = field(default_factory=list, metadata={
        "help": "parameter groups that train in this stage (`ptscale ls groups`)"})


def _check(method: str, plan: str) -> str:
    if method not in METHODS:
        raise RecipeError(f"plan: {plan!r} names unknown method {method!r}; known: {', '.join(METHODS)}")
    return method


def plan_layout(plan: str) -> list[tuple[str, list[str], str]]:
    """(the method whose hyper-parameters the stage takes, the groups it trains, its name) per stage."""
    spec = plan.replace(" ", "")
    if m := _ALTERNATE.match(spec):
        a, b, rounds = _check(m[1], plan), _check(m[2], plan), int(m[3])
        if not 1 <= rounds <= MAX_ROUNDS:
            raise RecipeError(f"plan: {plan!r} needs 1 to {MAX_ROUNDS} rounds")
        if a == b:
            raise RecipeError(f"plan: {plan!r} alternates one method with itself")
        return [(x, [x], f"round{r + 1}-{x}") for r in range(rounds) for x in (a, b)]
    if spec.count("->") > 1 or spec.count("+") > 1:
        raise RecipeError(f"plan: {plan!r} chains more than two methods; a plan is X, X->Y, X+Y or "
                          "alternate(X,Y,N) (write explicit stages: for anything longer)")
    if "->" in spec:
        first, second = (_check(x, plan) for x in spec.split("->", 1))
        if first == second:
            raise RecipeError(f"plan: {plan!r} repeats one method; use a single stage")
        hyper = second if second != "prefix" else first  # the joint stage takes the PEFT method's settings
        return [(first, [first], first), (hyper, [first, second], f"{first}+{second}")]
    if "+" in spec:
        a, b = (_check(x, plan) for x in spec.split("+", 1))
        if a == b:
            raise RecipeError(f"plan: {plan!r} joins one method with itself")
        return [(b if a == "prefix" else a, [a, b], f"{a}+{b}")]
    return [(_check(spec, plan), [spec], spec)]


def plan_methods(plan: str) -> list[str]:
    """The methods whose hyper-parameters (``methods.<method>``) the plan's stages take, in order."""
    return list(dict.fromkeys(hyper for hyper, _, _ in plan_layout(plan)))


def expand_plan(plan: str, methods: object) -> list[StageConfig]:
    """``methods``: an object with one MethodConfig attribute per method (``config.MethodsConfig``)."""
    return [StageConfig(**dataclasses.asdict(getattr(methods, hyper)), name=name, train=list(train))
            for hyper, train, name in plan_layout(plan)]


def prefixes_active(stages: list[StageConfig], index: int) -> bool:
    """Prefixes take part in the forward from the first stage that trains them on: in X->prefix they do not
    exist for X (the paper's reverse order), and before training the model is the pre-trained one."""
    return index >= 0 and any("prefix" in s.train for s in stages[: index + 1])
