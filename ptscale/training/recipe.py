"""The PT-PEFT training recipe, top to bottom.

config -> backbone + prefixes + tuners -> stage plan -> one DeepSpeed engine per stage -> batches ->
loss; evaluation before training and after each stage; results table and results.json at the end.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from ptscale.config import RunConfig, StageConfig, to_dict
from ptscale.data.collate import CaptionCollator
from ptscale.data.synthetic import make_split
from ptscale.eval.generate import generate_captions
from ptscale.models.backbone import Backbone, ensure_default_backbone, load_backbone
from ptscale.models.groups import group_of, group_sizes, set_trainable
from ptscale.prefix.model import PrefixTunedModel
from ptscale.training import engine as ds
from ptscale.training.logger import MetricLogger
from ptscale.tuners.lora import inject_lora

log = logging.getLogger("ptscale")

METRICS = ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


@dataclass
class EvalPoint:
    point: str  # "before training" or the stage name
    stage_index: int  # -1 before training
    trainable: int
    total: int
    metrics: dict[str, float]
    unavailable: dict[str, str]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def stage_name(stage: StageConfig, index: int) -> str:
    return stage.name or f"stage{index + 1}-" + "+".join(stage.train)


class PTPEFTRecipe:
    def __init__(self, cfg: RunConfig, ds_template: dict) -> None:
        self.cfg = cfg
        self.ds_template = ds_template

    # --- setup ----------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        self.dist = ds.init_distributed()
        seed_everything(cfg.seed)
        self.run_dir = self._make_run_dir()
        self.logger = MetricLogger(self.run_dir, self.dist.is_main)
        self.backbone = self._load_backbone()
        self.model = self._wrap(self.backbone)
        self.collator = CaptionCollator(self.backbone.image_processor, self.backbone.tokenizer,
                                        self.backbone.num_query_tokens, self.backbone.image_token_id,
                                        prompt=cfg.data.prompt, max_text_len=cfg.data.max_text_len)
        self.train_records, self.eval_records = self._data()
        self.results: list[EvalPoint] = []
        self.zero3 = ds.zero_stage(self.ds_template) == 3

    def _make_run_dir(self) -> Path:
        name = self.cfg.run_name or time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path(ds.broadcast_object(str(Path(self.cfg.output_dir) / name)))
        if self.dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "recipe.yaml").write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
        ds.barrier()
        return run_dir

    def _load_backbone(self) -> Backbone:
        m = self.cfg.model
        path = m.path or ensure_default_backbone(m, rank=self.dist.rank, barrier=ds.barrier)
        return load_backbone(path, m.dtype)

    def _wrap(self, backbone: Backbone) -> PrefixTunedModel:
        model = PrefixTunedModel(backbone.model, self.cfg.prefix)
        if any("lora" in s.train for s in self.cfg.stages):
            inject_lora(model, self.cfg.lora)
        if self.cfg.model.gradient_checkpointing:
            backbone.model.gradient_checkpointing_enable({"use_reentrant": False})
        return model

    def _data(self) -> tuple[list[dict], list[dict]]:
        d = self.cfg.data
        train = make_split(d.task, d.train_size, d.seed, "train")
        evals = make_split(d.task, d.eval_size, d.seed, "eval")
        return self.collator.preprocess(train), self.collator.preprocess(evals)

    # --- train ----------------------------------------------------------------------------------------
    def train(self) -> None:
        if self.cfg.eval.before_training:
            self.evaluate("before training", -1)
        for index, stage in enumerate(self.cfg.stages):
            self.run_stage(index, stage)

    def run_stage(self, index: int, stage: StageConfig) -> None:
        name = stage_name(stage, index)
        trainable, total = set_trainable(self.model, stage.train)
        loader = self._loader(stage, index)
        steps = stage.steps or max(1, math.floor(stage.epochs * len(loader) / stage.grad_accum))
        ds_cfg = ds.resolve_ds_config(self.ds_template, stage, self.cfg.model.dtype, self.dist.world_size)
        engine = ds.build_engine(self.model, stage, ds_cfg, steps)
        if self.dist.is_main:
            tqdm.write(f"[{name}] trains {', '.join(stage.train)}: {trainable:,} of {total:,} parameters "
                       f"({100 * trainable / total:.3f}%), {steps} steps")
        before = ds.param_digests(self.model)
        self._train_steps(engine, loader, steps, name, index)
        after = ds.param_digests(self.model)
        self._check_changes(before, after, stage, name)
        self._save_stage(engine, index, name, before, after)
        if stage.evaluate:  # while the engine lives: its hooks gather ZeRO-3 shards for generation
            self.evaluate(name, index, trainable=trainable, total=total)
        ds.release(engine)

    def _loader(self, stage: StageConfig, index: int) -> DataLoader:
        sampler = DistributedSampler(self.train_records, num_replicas=self.dist.world_size, rank=self.dist.rank,
                                     shuffle=True, seed=self.cfg.seed + index, drop_last=True)
        loader = DataLoader(self.train_records, batch_size=stage.batch_size, sampler=sampler,
                            collate_fn=self.collator.train_batch, drop_last=True)
        if len(loader) == 0:
            raise ValueError(f"stage {index}: {len(self.train_records)} training records give no batch of "
                             f"{stage.batch_size} per rank on {self.dist.world_size} ranks; lower batch_size")
        return loader

    def _train_steps(self, engine, loader: DataLoader, steps: int, name: str, index: int) -> None:
        self.model.train()
        device = engine.device
        bar = tqdm(total=steps, desc=name, disable=not self.dist.is_main, dynamic_ncols=True)
        step, epoch, t0, samples = 0, 0, time.time(), 0
        while step < steps:
            loader.sampler.set_epoch(epoch)
            for batch in loader:
                batch = {k: v.to(device) for k, v in batch.items()}
                loss = engine(**batch).loss
                engine.backward(loss)
                engine.step()
                samples += batch["input_ids"].shape[0] * self.dist.world_size
                if not engine.is_gradient_accumulation_boundary():
                    continue
                step += 1
                rate = samples / (time.time() - t0)
                bar.set_postfix(loss=f"{loss.item():.4f}", samples_s=f"{rate:.1f}")
                bar.update(1)
                if step % self.cfg.log_every == 0 or step == steps:
                    self.logger.log(step, {"kind": "train", "stage": name, "stage_index": index, "step": step,
                                           "loss": loss.item(), "lr": engine.get_lr()[0],
                                           "samples_per_s": rate, "epoch": epoch})
                if step >= steps:
                    break
            epoch += 1
        bar.close()

    def _check_changes(self, before: dict, after: dict, stage: StageConfig, name: str) -> None:
        """Frozen groups must be bit-identical; a trained group that did not move means the stage trained
        nothing (the silent ZeRO-3 failure mode)."""
        changed = {n for n in before if before[n] != after[n]}
        leaked = sorted(n for n in changed if group_of(n) not in stage.train)
        if leaked:
            raise RuntimeError(f"[{name}] frozen parameters changed: {leaked[:5]} (+{max(0, len(leaked) - 5)})")
        for group in stage.train:
            members = [n for n in before if group_of(n) == group]
            if members and not any(n in changed for n in members):
                raise RuntimeError(f"[{name}] group {group!r} was set to train but no parameter of it changed")

    def _save_stage(self, engine, index: int, name: str, before: dict, after: dict) -> None:
        from ptscale.checkpoint import save_safetensors_atomic

        weights = ds.trainable_fp32(engine)
        if self.dist.is_main:
            stage_dir = self.run_dir / f"stage-{index + 1}-{name}"
            stage_dir.mkdir(parents=True, exist_ok=True)
            save_safetensors_atomic(weights, stage_dir / "trainable.safetensors",
                                    metadata={"stage": name, "groups": ",".join(self.cfg.stages[index].train)})
            (stage_dir / "param_digests.json").write_text(json.dumps({"before": before, "after": after}))
        ds.barrier()

    # --- evaluate -------------------------------------------------------------------------------------
    def evaluate(self, point: str, index: int, trainable: int = 0, total: int | None = None) -> None:
        from ptscale.eval.captioning import score_captions

        synced = self.zero3 and self.dist.world_size > 1
        mine = generate_captions(self.model, self.collator, self.eval_records, self.cfg.eval,
                                 rank=self.dist.rank, world=self.dist.world_size, synced=synced)
        preds: dict[str, str] = {}
        for part in ds.gather_objects(mine):
            preds.update(part)  # duplicates from shard padding collapse here
        if total is None:
            total = sum(group_sizes(self.model).values())
        if self.dist.is_main:
            refs = {r["image_id"]: r["captions"] for r in self.eval_records}
            scores = score_captions(preds, refs)
            self.results.append(EvalPoint(point, index, trainable, total, scores.metrics, scores.unavailable))
            safe = point.replace(" ", "_")
            (self.run_dir / f"captions-{safe}.json").write_text(json.dumps(
                [{"image_id": k, "caption": v, "references": refs[k]} for k, v in sorted(preds.items())], indent=1))
            self.logger.log(0, {"kind": "eval", "stage": point, **scores.metrics})
            tqdm.write(f"[eval: {point}] " + "  ".join(f"{k} {scores.metrics[k]:.4f}" for k in METRICS))
            self._write_results()
        ds.barrier()

    def _write_results(self) -> None:
        from ptscale.checkpoint import write_text_atomic

        write_text_atomic(self.run_dir / "results.json", json.dumps(
            {"run_dir": str(self.run_dir), "world_size": self.dist.world_size,
             "evaluations": [asdict(r) for r in self.results]}, indent=1))

    # --- cleanup --------------------------------------------------------------------------------------
    def cleanup(self) -> None:
        if self.dist.is_main:
            print(results_table(self.results))
            print(f"run directory: {self.run_dir}")
        self.logger.close()
        ds.barrier()


def results_table(results: list[EvalPoint]) -> str:
    head = ["evaluated", "trainable", "share %", *METRICS]
    rows = [[r.point, f"{r.trainable:,}", f"{100 * r.trainable / r.total:.3f}",
             *(f"{r.metrics.get(m, float('nan')):.4f}" for m in METRICS)] for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep, *map(line, rows)])
