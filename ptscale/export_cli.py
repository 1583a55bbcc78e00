"""``ptscale export RUN_DIR``: a run's trained weights in the formats other tools load.

- ``--merged DIR``: LoRA merged into the base weights (``DIR/without_prefixes/``, transformers ``from_pretrained``)
  with every prefix folded into static keys/values beside it; ``ptscale.from_pretrained(DIR)`` reproduces the run.
- ``--peft DIR``: the LoRA in PEFT's format (``PeftModel.from_pretrained(base, DIR)``: LoRA only), with the folded
  prefixes beside it for ``ptscale.from_pretrained(DIR)``;
- ``--peft-prefix DIR``: the language model's prefix as a PEFT prefix-tuning adapter;
- ``--trainable FILE``: every parameter the run trained (prefixes, LoRA, adapters, ...), fp32 safetensors.
Each directory gets a ``manifest.json`` (what it holds, the base it needs with its sha256, what it does not
reproduce on its own, how to load it), printed here; what cannot reproduce the run alone is printed as WARNING.
Weights come from the run's newest checkpoint: already gathered (full tensors), so no DeepSpeed is needed.
A run trained on a quantised base (``model.quantization``) exports against the full-precision base.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path)
    p.add_argument("--ckpt", type=Path, default=None, help="a checkpoint directory (default: the newest)")
    p.add_argument("--trainable", type=Path, default=None, help="write the trained weights to this safetensors")
    p.add_argument("--peft", type=Path, default=None,
                   help="write LoRA in PEFT's format (+ the folded prefixes, which PEFT ignores) to this directory")
    p.add_argument("--peft-prefix", type=Path, default=None, dest="peft_prefix",
                   help="write the language model's prefix as a PEFT prefix-tuning adapter to this directory")
    p.add_argument("--merged", type=Path, default=None, help="write the merged model + folded prefixes here")


def run_export_command(args: argparse.Namespace) -> int:
    from ptscale.prefix.peft_interop import PeftPrefixError
    from ptscale.tuners.export import ExportError

    if not (args.trainable or args.peft or args.merged or args.peft_prefix):
        print("ptscale export: name at least one of --trainable, --peft, --peft-prefix, --merged", file=sys.stderr)
        return 2
    for option in ("peft", "merged", "peft_prefix"):  # directories: checked before the run is loaded
        target = getattr(args, option)
        if target is not None and target.exists() and not target.is_dir():
            print(f"ptscale export: --{option.replace('_', '-')} {target} is a file; give a directory to write the "
                  "export into", file=sys.stderr)
            return 2
    try:
        return _export(args)
    except (OSError, ExportError, PeftPrefixError, ValueError) as e:
        # bad input (no run, no checkpoint, nothing of that kind to export): one line, no traceback
        print(f"ptscale export: {e}", file=sys.stderr)
        return 2


def _export(args: argparse.Namespace) -> int:
    from ptscale.checkpoint import read_checkpoint, save_safetensors_atomic
    from ptscale.models.backbone import backbone_digest
    from ptscale.runs import load_run
    from ptscale.tuners.export import export_lm_prefix_peft, export_lora_peft, export_merged, format_manifest

    if not args.run_dir.is_dir():
        raise FileNotFoundError(f"{args.run_dir}: no such run directory")
    run = load_run(args.run_dir, args.ckpt, full_precision=True)
    if run.cfg.model.quantization != "none":
        print(f"the run trained on a {run.cfg.model.quantization}-quantised base: exporting against the "
              "full-precision base weights (the QLoRA convention)")
    base_path, digest = str(run.backbone.path), backbone_digest(run.backbone.path)
    source = {"run": str(run.run_dir), "checkpoint": run.checkpoint.name}
    common = {"base_model_name_or_path": base_path, "base_digest": digest, "source": source}
    if args.trainable:
        _, tuned, _ = read_checkpoint(run.checkpoint)
        meta = {**source, "base": base_path, "base_sha256": digest, "positions": run.cfg.prefix.positions,
                "note": "raw trained parameters by ptscale name; reload with ptscale.runs.load_run(run), or use "
                        "--merged / --peft for a loadable model"}
        save_safetensors_atomic(tuned, args.trainable, metadata=meta)
        print(f"trained weights ({len(tuned)} tensors): {args.trainable}\n  metadata: {json.dumps(meta)}")
    written = []
    if args.peft:
        written.append(export_lora_peft(run.model, args.peft, run.cfg.lora, **common))
    if args.peft_prefix:
        written.append(export_lm_prefix_peft(run.model, args.peft_prefix, **common))
    if args.merged:
        written.append(export_merged(run.model, args.merged, tokenizer=run.backbone.tokenizer,
                                     image_processor=run.backbone.image_processor, **common))
    for out in written:
        print(format_manifest(out, json.loads((out / "manifest.json").read_text())))
    return 0
