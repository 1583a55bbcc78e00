"""``ptscale export RUN_DIR``: a run's trained weights in the formats other tools load.

- ``--trainable FILE``: every parameter the run trained (prefixes, LoRA, adapters, ...), fp32 safetensors;
- ``--peft DIR``: the LoRA weights in PEFT's format (``PeftModel.from_pretrained(base, DIR)``);
- ``--merged DIR``: LoRA merged into the base weights, ``save_pretrained`` (loadable by ``from_pretrained``),
  with the prefixes folded into static keys/values beside it (``ptscale.tuners.export.load_merged``).
Weights come from the run's newest checkpoint: already gathered (full tensors), so no DeepSpeed is needed.
A run trained on a quantised base (``model.quantization``) exports against the full-precision base.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path)
    p.add_argument("--ckpt", type=Path, default=None, help="a checkpoint directory (default: the newest)")
    p.add_argument("--trainable", type=Path, default=None, help="write the trained weights to this safetensors")
    p.add_argument("--peft", type=Path, default=None, help="write LoRA in PEFT's format to this directory")
    p.add_argument("--merged", type=Path, default=None, help="write the merged model + folded prefixes here")


def run_export_command(args: argparse.Namespace) -> int:
    from ptscale.checkpoint import read_checkpoint, save_safetensors_atomic
    from ptscale.runs import load_run
    from ptscale.tuners.export import export_lora_peft, export_merged

    if not (args.trainable or args.peft or args.merged):
        raise SystemExit("ptscale export: name at least one of --trainable, --peft, --merged")
    run = load_run(args.run_dir, args.ckpt, full_precision=True)
    if run.cfg.model.quantization != "none":
        print(f"the run trained on a {run.cfg.model.quantization}-quantised base: exporting against the "
              "full-precision base weights (the QLoRA convention)")
    if args.trainable:
        _, tuned, _ = read_checkpoint(run.checkpoint)
        meta = {"run": str(run.run_dir), "checkpoint": run.checkpoint.name}
        save_safetensors_atomic(tuned, args.trainable, metadata=meta)
        print(f"trained weights ({len(tuned)} tensors): {args.trainable}")
    if args.peft:
        export_lora_peft(run.model, args.peft, run.cfg.lora)
        print(f"LoRA in PEFT format: {args.peft}")
    if args.merged:
        export_merged(run.model, args.merged, tokenizer=run.backbone.tokenizer,
                      image_processor=run.backbone.image_processor)
        print(f"merged model with folded prefixes: {args.merged}")
    return 0
