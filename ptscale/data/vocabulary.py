"""Can the model's tokenizer express the data? The share of caption / question / answer tokens it maps to
its unknown token, measured when the data is loaded, before any compute.

A tokenizer built for another corpus (the embedded tiny model's word-level vocabulary knows only the
synthetic task's ~40 words) turns nearly every COCO word into ``<unk>``: training then teaches the model to
emit ``<unk>`` and scores go to zero with no error anywhere. Above :data:`UNKNOWN_TOKEN_LIMIT` the run stops
with the rate and the fix.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from torch.utils.data import Subset

from ptscale.config import RecipeError
from ptscale.data.images import LazyImageDataset

# A tokenizer that covers the data maps (almost) nothing to <unk>: byte-level BPE exactly nothing, WordPiece
# on English captions well under 0.1% (rare symbols). A word-level vocabulary missing a few rare words (names,
# typos) stays far below 5%; at 5% about one word in every second caption (~10 words each) is lost, enough
# to teach the model to emit <unk> and to cost scores, so the limit sits there.
UNKNOWN_TOKEN_LIMIT = 0.05
# The texts measured per split (from its start): the rate of a few thousand texts is within a percent of
# the whole split's, and tokenizing them takes milliseconds, even for COCO's 566k training captions.
SAMPLE_TEXTS = 2000
EXAMPLE_WORDS = 5  # unknown words quoted in the message


@dataclass(frozen=True)
class UnknownRate:
    unknown: int
    tokens: int
    texts: int
    examples: tuple[str, ...] = ()  # the most frequent unknown words, when the tokenizer gives offsets

    @property
    def rate(self) -> float:
        return self.unknown / self.tokens if self.tokens else 0.0


def unknown_token_rate(tokenizer: Any, texts: Sequence[str]) -> UnknownRate:
    """How many of the tokens of ``texts`` are the tokenizer's unknown token.

    A tokenizer without an unknown token (byte-level BPE, as OPT's and GPT-2's) encodes every string into
    known byte tokens: its rate is 0 by construction and nothing is tokenized.
    """
    unk = getattr(tokenizer, "unk_token_id", None)
    texts = [t for t in texts if t]
    if unk is None or not texts:
        return UnknownRate(0, 0, len(texts))
    offsets = bool(getattr(tokenizer, "is_fast", False))  # only fast tokenizers return character offsets
    encoded = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=offsets)
    unknown, tokens, words = 0, 0, Counter()
    for k, ids in enumerate(encoded["input_ids"]):
        tokens += len(ids)
        hits = [j for j, i in enumerate(ids) if i == unk]
        unknown += len(hits)
        if offsets:
            words.update(texts[k][slice(*encoded["offset_mapping"][k][j])] for j in hits)
    return UnknownRate(unknown, tokens, len(texts), tuple(w for w, _ in words.most_common(EXAMPLE_WORDS)))


def _rows(split: Sequence[dict], limit: int) -> list[dict[str, Any]]:
    """The first records of a split as dicts of their text fields, without decoding any image.

    In-memory splits (synthetic) are lists of records; real ones are LazyImageDatasets whose ``rows`` hold
    the text, possibly capped by a ``Subset`` (several items of a training split may share one image row).
    """
    base, indices = (split.dataset, split.indices) if isinstance(split, Subset) else (split, range(len(split)))
    if not isinstance(base, LazyImageDataset):
        return [base[int(i)] for i in list(indices)[:limit]]
    rows: dict[int, None] = {}  # ordered set
    for i in indices:
        rows[base.row_of(int(i))] = None
        if len(rows) >= limit:
            break
    return list(base.rows.select(list(rows)))


def split_texts(split: Sequence[dict], limit: int = SAMPLE_TEXTS) -> tuple[str, list[str]]:
    """(what the texts are, up to ``limit`` texts): captions (every reference), or VQA questions and
    answers."""
    rows = _rows(split, limit)
    if rows and "question" in rows[0]:
        texts = [r["question"] for r in rows] + [a for r in rows for a in _answers(r)]
        return "questions and answers", texts[:limit]
    return "captions", [c for r in rows for c in r.get("captions") or [r["target"]]][:limit]


def _answers(row: dict[str, Any]) -> Iterable[str]:
    # The training target, once per question (the other human answers mostly repeat it).
    return [row["target"]] if row.get("target") else []


def check_vocabulary(data_name: str, tokenizer: Any, splits: dict[str, Sequence[dict]],
                     limit: float = UNKNOWN_TOKEN_LIMIT) -> dict[str, UnknownRate]:
    """Measure every split ({"training": ..., "eval": ...}); raise RecipeError at the first whose rate is
    above ``limit``. Returns the rates."""
    rates = {}
    for label, split in splits.items():
        kind, texts = split_texts(split)
        rate = rates[label] = unknown_token_rate(tokenizer, texts)
        if rate.rate > limit:
            unk = getattr(tokenizer, "unk_token", None) or "unk"
            examples = f" (e.g. {', '.join(map(repr, rate.examples))})" if rate.examples else ""
            raise RecipeError(
                f"data.name={data_name}: {100 * rate.rate:.1f}% of tokens in the {label} {kind} are unknown to "
                f"the model's tokenizer ({unk}){examples}, measured on {rate.texts} texts ({rate.tokens} tokens),"
                f" above the {100 * limit:.0f}% limit; use a model whose tokenizer covers the data "
                "(model.path=DIR)")
    return rates
