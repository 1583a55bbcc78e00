"""``ptscale analyze``: representation spectra and effective rank of saved runs (PT-PEFT §2.3, fig. 4, table 1).

    ptscale analyze RUN_DIR [RUN_DIR ...] [--reference pretrained|RUN_DIR] [--samples N] [--batch-size B]
                    [--split eval] [--threshold 0.9] [--device cpu|cuda] [--out DIR]

For every model (each run, and the reference) and every sample of the first run's data split, one forward
pass gives the last-layer features of three paths:

- ``vision``: the vision encoder's last hidden state (patch tokens + CLS, x hidden), the paper's image
  features;
- ``qformer``: the Q-Former's last hidden state over its query tokens. Not in the paper's figure; here
  because the default recipes never touch the vision encoder (its spectrum is the reference's, exactly),
  while prefixes and LoRA do change the Q-Former, the rest of BLIP-2's image path;
- ``text``: the language model's last hidden state over the text tokens (BOS, prompt, caption, EOS:
  the attention mask minus the image-token positions), conditioned on the image as in BLIP-2. The text is
  each record's training caption, tokenised by the run's own collator.

Per sample the features are decomposed (SVD), the singular values normalised and averaged over samples
(:class:`~ptscale.analysis.effective_rank.SpectrumAccumulator`); the effective rank at ``threshold`` is given
as a count, a fraction of the spectrum length and a percentage of the reference's (table 1).

The default reference is the pre-trained backbone itself (the first run's, loaded fresh: no prefix, no
LoRA/adapter), which every run must share. ``--reference RUN_DIR`` compares against another run instead.

Writes ``analysis.json`` and ``spectrum_<path>.png`` + ``.pdf`` (all models overlaid, as figure 4, labelled by
each run's plan and where its parameters sit) into ``--out``
(default: the run directory when one run is given; required for several), and each run's own
``RUN_DIR/analysis.json`` (the reference and that run), which ``ptscale report`` reads.

Models are analysed one at a time in a single process: the runs' weights load without DeepSpeed
(:func:`ptscale.runs.load_run`), so a model that fits one device needs no sharding. Launched on several
ranks, only rank 0 works and the others return at once (no features are gathered).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptscale.analysis.effective_rank import (
    DEFAULT_THRESHOLD,
    EffectiveRank,
    SpectrumAccumulator,
    cumulative,
    effective_rank,
)
from ptscale.config import RunConfig
from ptscale.labels import placement, run_label  # noqa: F401  (placement: re-exported for callers)

PATHS: dict[str, str] = {
    "vision": "vision encoder, last hidden state (tokens x hidden per image)",
    "qformer": "Q-Former, last hidden state over the query tokens",
    "text": "language model, last hidden state over BOS + prompt + caption + EOS (attention mask)",
}
PRETRAINED = "pretrained"
ANALYSIS_JSON = "analysis.json"


@dataclass(frozen=True)
class AnalyzeRequest:
    run_dirs: list[Path]
    reference: str = PRETRAINED  # "pretrained" or a run directory
    samples: int | None = None  # None: the split's size in the first run's recipe
    batch_size: int = 64
    split: str = "eval"
    threshold: float = DEFAULT_THRESHOLD
    device: str | None = None  # None: cuda if available, else cpu
    out_dir: Path | None = None  # None: the run directory (one run only)


@dataclass
class Subject:
    """One model to analyse, with what it needs to build its batches."""

    name: str
    role: str  # "reference" or "run"
    model: nn.Module  # PrefixTunedModel or a bare Blip2ForConditionalGeneration
    collator: Any  # CaptionCollator
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Spectra:
    """Mean normalised spectrum per path, and how long the features and SVDs took."""

    spectra: dict[str, torch.Tensor]
    seconds: float
    samples: int


# --- Features -----------------------------------------------------------------------------------------------

@torch.no_grad()
def last_layer_features(model: nn.Module, batch: dict[str, torch.Tensor],
                        image_token_id: int) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """path -> (features (N, T, C), mask (N, T) of the tokens that belong to the sample, or None)."""
    out = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"], output_hidden_states=True, use_cache=False)
    lm = out.language_model_outputs
    if getattr(lm, "hidden_states", None) is None:
        raise ValueError("the text path reads a decoder-only language model's hidden states; this "
                                  f"model's language model returned {type(lm).__name__} without them")
    # Text positions: real tokens (attention mask) that are not the image (query-token) placeholders.
    text_mask = batch["attention_mask"].bool() & (batch["input_ids"] != image_token_id)
    return {"vision": (out.vision_outputs.last_hidden_state, None),
            "qformer": (out.qformer_outputs.last_hidden_state, None),
            "text": (lm.hidden_states[-1], text_mask)}


def update_masked(acc: SpectrumAccumulator, features: torch.Tensor, mask: torch.Tensor) -> None:
    """Add each sample's unmasked rows; samples with equal token counts go through one batched SVD
    (the accumulator's own masked path decomposes one sample at a time)."""
    counts = mask.sum(dim=1)
    if (counts == 0).any():
        raise ValueError("a sample has no unmasked tokens")
    for n in counts.unique().tolist():
        rows = (counts == n).nonzero().squeeze(1)
        # Boolean indexing walks (sample, token) row-major: each sample's n rows stay together and in order.
        acc.update(features[rows][mask[rows]].reshape(len(rows), n, features.shape[-1]))


def _batches(records: Sequence[dict], size: int) -> Iterator[list[dict]]:
    """Lists of up to ``size`` records; items a lazy dataset skipped (bad data) are falsy and left out."""
    chunk: list[dict] = []
    for i in range(len(records)):
        record = records[i]
        if record:
            chunk.append(record)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@torch.no_grad()
def subject_spectra(subject: Subject, records: Sequence[dict], batch_size: int, device: torch.device) -> Spectra:
    """Mean normalised spectra (eq. 2-4) of every path over ``records``."""
    model = subject.model.to(device).eval()
    image_token_id = model.config.image_token_id
    accs = {path: SpectrumAccumulator() for path in PATHS}
    t0 = time.perf_counter()
    for chunk in _batches(records, batch_size):
        full = subject.collator.train_batch(chunk)  # teacher-forcing layout: image tokens, BOS, caption, EOS
        batch = {k: full[k].to(device) for k in ("pixel_values", "input_ids", "attention_mask")}
        for path, (features, mask) in last_layer_features(model, batch, image_token_id).items():
            if mask is None:
                accs[path].update(features)
            else:
                update_masked(accs[path], features, mask)
    return Spectra({path: acc.compute() for path, acc in accs.items()}, time.perf_counter() - t0,
                   accs["vision"].count)


# --- Models -------------------------------------------------------------------------------------------------

def _backbone_dir(cfg: RunConfig) -> Path:
    from ptscale.models.backbone import default_backbone_dir

    return Path(cfg.model.path or default_backbone_dir(cfg.model)).resolve()


def _run_names(run_dirs: list[Path]) -> list[str]:
    """The directory name, or parent/name where two runs share a name."""
    names = [p.name for p in run_dirs]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in run_dirs]


def run_subject(run_dir: Path, name: str, role: str = "run") -> Subject:
    from ptscale.runs import load_run

    run = load_run(run_dir)
    label = run_label(run.cfg)
    info = {"label": label if role == "run" else f"reference: {label}", "run_dir": str(run_dir),
            "checkpoint": str(run.checkpoint), "backbone": str(_backbone_dir(run.cfg))}
    return Subject(name, role, run.model, run.collator, info)


def pretrained_subject(cfg: RunConfig) -> Subject:
    """The backbone a run started from, loaded fresh: no prefix modules, no tuners."""
    from ptscale.data.collate import make_collator
    from ptscale.models.backbone import load_backbone

    path = _backbone_dir(cfg)
    backbone = load_backbone(path, cfg.model.dtype, cfg.model.quantization, cfg.model.family or "blip2")
    collator = make_collator(backbone, cfg.data)
    return Subject("pre-trained", "reference", backbone.model.eval(), collator,
                   {"label": "pre-trained backbone", "run_dir": None, "checkpoint": None, "backbone": str(path)})


def _check_same_backbone(run_dirs: list[Path]) -> None:
    """Every model reads the same preprocessed samples and is compared with one reference: one backbone."""
    from ptscale.config import load_recipe

    dirs = {str(_backbone_dir(load_recipe(p / "recipe.yaml", user_file=False))) for p in run_dirs}
    if len(dirs) > 1:
        raise ValueError(f"the runs (and the reference) start from different backbones ({', '.join(sorted(dirs))});"
                         " analyse runs of one backbone together")


# --- The analysis -------------------------------------------------------------------------------------------

def _rank_entry(spec: torch.Tensor, ref: EffectiveRank, threshold: float) -> dict[str, Any]:
    rank = effective_rank(spec, threshold)
    return {"effective_rank": rank.count, "fraction": rank.fraction, "length": rank.length,
            "percent_of_reference": rank.relative_to(ref),
            "spectrum": spec.tolist(), "cumulative": cumulative(spec).tolist()}


def _entry(subject_info: dict[str, Any], name: str, role: str, result: Spectra,
           reference: Spectra, threshold: float) -> dict[str, Any]:
    paths = {path: _rank_entry(spec, effective_rank(reference.spectra[path], threshold), threshold)
             for path, spec in result.spectra.items()}
    return {"name": name, "role": role, **subject_info, "seconds": round(result.seconds, 3),
            "samples_per_s": round(result.samples / max(result.seconds, 1e-9), 1), "paths": paths}


def _analyse(subject: Subject, records: Sequence[dict], request: AnalyzeRequest, device: torch.device) -> Spectra:
    """Compute one model's spectra, then free it: one model in memory at a time."""
    result = subject_spectra(subject, records, request.batch_size, device)
    subject.model = None  # type: ignore[assignment]  # drop the weights before the next model loads
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def _document(request: AnalyzeRequest, data: dict[str, Any], device: torch.device,
              entries: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    return {"threshold": request.threshold, "reference": request.reference, "data": data,
            "batch_size": request.batch_size, "device": str(device), "paths": PATHS, "models": entries,
            "seconds": round(seconds, 2)}


def _out_dir(request: AnalyzeRequest) -> Path:
    if request.out_dir is not None:
        return Path(request.out_dir)
    if len(request.run_dirs) == 1:
        return Path(request.run_dirs[0])
    raise ValueError("several runs: give --out DIR for the combined analysis.json and plots")


def analyze_runs(request: AnalyzeRequest) -> dict[str, Any] | None:
    """Analyse every run and the reference; write the JSON files and plots. None on ranks other than 0."""
    from ptscale.analysis.effective_rank import plot_spectra
    from ptscale.config import load_recipe
    from ptscale.eval.evaluate import load_eval_data

    if int(os.environ.get("RANK", "0")) != 0:
        return None  # one process does the whole analysis; see the module docstring
    if not request.run_dirs:
        raise ValueError("no run directory given")
    if request.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {request.batch_size}")
    run_dirs = [Path(p) for p in request.run_dirs]
    out_dir = _out_dir(request)
    device = torch.device(request.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t0 = time.perf_counter()
    pretrained = request.reference == PRETRAINED
    _check_same_backbone(run_dirs if pretrained else [*run_dirs, Path(request.reference)])
    first_cfg = load_recipe(run_dirs[0] / "recipe.yaml", user_file=False)
    if first_cfg.model.family in ("vinvl", "ofa"):
        from ptscale.errors import RecipeError

        why = ("VinVL has none of them (its images are region features)" if first_cfg.model.family == "vinvl" else
               "OFA's image tokens are ResNet cells inside one encoder-decoder, not separate towers")
        name = "a VinVL" if first_cfg.model.family == "vinvl" else "an OFA"
        raise RecipeError(f"ptscale analyze: {run_dirs[0]} is {name} run; the analysis reads a vision encoder's, a "
                          f"Q-Former's and a language model's features, and {why}")
    ref_subject = (pretrained_subject(first_cfg) if pretrained else
                   run_subject(Path(request.reference), f"reference: {Path(request.reference).name}", "reference"))
    # The first run's data; preprocessed by the reference's image processor, which every model shares
    # (one backbone, checked above).
    loaded = load_eval_data(first_cfg, ref_subject.collator, request.split, request.samples)
    records, data = loaded.records, loaded.description
    ref = _analyse(ref_subject, records, request, device)
    ref_entry = _entry(ref_subject.info, ref_subject.name, "reference", ref, ref, request.threshold)
    run_entries = []
    for run_dir, name in zip(run_dirs, _run_names(run_dirs), strict=True):
        subject = run_subject(run_dir, name)  # loaded only now: the previous model is already freed
        result = _analyse(subject, records, request, device)
        run_entries.append(_entry(subject.info, name, "run", result, ref, request.threshold))

    document = _document(request, data, device, [ref_entry, *run_entries], time.perf_counter() - t0)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / ANALYSIS_JSON, document)
    for run_dir, entry in zip(run_dirs, run_entries, strict=True):
        if run_dir.resolve() != out_dir.resolve():  # each run keeps its own numbers for `ptscale report`
            _write_json(run_dir / ANALYSIS_JSON, {**document, "models": [ref_entry, entry]})
    labels = legend_labels(document["models"])
    for path, description in PATHS.items():
        curves = {label: torch.tensor(e["paths"][path]["cumulative"], dtype=torch.float64)
                  for label, e in zip(labels, document["models"], strict=True)}
        plot_spectra(curves, out_dir / f"spectrum_{path}.png", threshold=request.threshold, reference=labels[0],
                     title=f"{description} ({data['size']} {request.split} samples)")
    return {**document, "out_dir": str(out_dir)}


def legend_labels(entries: list[dict[str, Any]]) -> list[str]:
    """Each model's label; runs with the same plan and placement (seeds, learning rates) get their name added."""
    labels = [e.get("label", e["name"]) for e in entries]
    return [f"{label} [{e['name']}]" if labels.count(label) > 1 else label for label, e in zip(labels, entries,
                                                                                             strict=True)]


def _write_json(path: Path, document: dict[str, Any]) -> None:
    from ptscale.checkpoint import write_text_atomic

    write_text_atomic(path, json.dumps(document, indent=1))


# --- Command line -------------------------------------------------------------------------------------------

def add_analyze_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories to analyse")
    p.add_argument("--reference", default=PRETRAINED, metavar="pretrained|RUN_DIR",
                   help="the model the effective ranks are relative to (default: the pre-trained backbone)")
    p.add_argument("--samples", type=int, default=None,
                   help="samples of the split (default: the split's size in the first run's recipe; the synthetic "
                        "suite: per group)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per forward pass (default 64)")
    p.add_argument("--split", default="eval", help="data split (default: eval)")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help="cumulative spectrum level of the effective rank (default 0.9)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--out", type=Path, default=None,
                   help="directory for analysis.json and spectrum_*.png (default: the run directory, one run)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher


def summary_table(document: dict[str, Any]) -> str:
    head = ["model", *(f"{p} eff. rank" for p in PATHS), "samples/s"]
    rows = [[e["name"], *(f"{e['paths'][p]['effective_rank']}/{e['paths'][p]['length']} "
                          f"({e['paths'][p]['percent_of_reference']:.1f}%)" for p in PATHS),
             f"{e['samples_per_s']:.0f}"] for e in document["models"]]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([fmt(head), *map(fmt, rows)])


def run_analyze_command(args: argparse.Namespace) -> int:
    request = AnalyzeRequest(run_dirs=args.run_dirs, reference=args.reference, samples=args.samples,
                             batch_size=args.batch_size, split=args.split, threshold=args.threshold,
                             device=args.device, out_dir=args.out)
    document = analyze_runs(request)
    if document is not None:
        print(f"{document['data']['size']} samples, effective rank at {document['threshold']} "
              f"(% of {document['models'][0]['name']}):")
        print(summary_table(document))
        print(f"analysis directory: {document['out_dir']}")
    return 0
