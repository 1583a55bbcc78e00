"""Named stage plans of the paper, expanded into explicit stages (pure; no model needed).

X is a second-stage method: lora, adapter (sequential or parallel, per the recipe's adapter section) or
full (full fine-tuning; embeddings and LM head stay frozen).

    prefix                 prefix-tuning only
    X                      X only (a baseline)
    prefix->X              PT-PEFT: prefix-tuning, then X with the prefixes still training
    X->prefix              reversed order (table 2): X, then prefix-tuning with X still training
    prefix+X               both at once in one stage (parallel, table 5b)
    alternate(prefix,X,N)  N rounds of prefix-only then X-only stages (table 9)

Each stage takes its hyper-parameters from ``methods[<method>]``; a joint stage (prefix and X) uses X's.
"""

from __future__ import annotations

import dataclasses
import re

from ptscale.config import RecipeError, StageConfig

METHODS = ("prefix", "lora", "adapter", "full")
_ALTERNATE = re.compile(r"^alternate\((\w+),(\w+),(\d+)\)$")


def _stage(methods: dict[str, StageConfig], hyper: str, train: list[str], name: str) -> StageConfig:
    if hyper not in methods:
        raise RecipeError(f"methods.{hyper}: the plan needs this method's stage hyper-parameters "
                          f"(epochs or steps, lr, batch_size, ...)")
    return dataclasses.replace(methods[hyper], name=name, train=list(train))


def _check(method: str, plan: str) -> str:
    if method not in METHODS:
        raise RecipeError(f"plan: {plan!r} names unknown method {method!r}; known: {', '.join(METHODS)}")
    return method


def expand_plan(plan: str, methods: dict[str, StageConfig]) -> list[StageConfig]:
    spec = plan.replace(" ", "")
    if m := _ALTERNATE.match(spec):
        a, b, rounds = _check(m[1], plan), _check(m[2], plan), int(m[3])
        if rounds < 1:
            raise RecipeError(f"plan: {plan!r} needs at least one round")
        return [_stage(methods, x, [x], f"round{r + 1}-{x}") for r in range(rounds) for x in (a, b)]
    if "->" in spec:
        first, second = spec.split("->", 1)
        first, second = _check(first, plan), _check(second, plan)
        if first == second:
            raise RecipeError(f"plan: {plan!r} repeats one method; use a single stage")
        hyper = second if second != "prefix" else first
        return [_stage(methods, first, [first], first),
                _stage(methods, hyper, [first, second], f"{first}+{second}")]
    if "+" in spec:
        a, b = (_check(x, plan) for x in spec.split("+", 1))
        hyper = b if a == "prefix" else a
        return [_stage(methods, hyper, [a, b], f"{a}+{b}")]
    return [_stage(methods, _check(spec, plan), [spec], spec)]
