"""The PT-PEFT training recipe, top to bottom.

config -> backbone + prefixes + tuners -> stage plan -> one DeepSpeed engine per stage -> batches ->
loss; evaluation before training and after each stage; results table and results.json at the end.
"""

from __future__ import annotations

import json
import logging
import math
import random
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ptscale.checkpoint import Progress, list_checkpoints, read_checkpoint, set_rng_state, write_text_atomic
from ptscale.config import RecipeError, RunConfig, StageConfig
from ptscale.data.collate import make_collator
from ptscale.data.sources import load_splits
from ptscale.errors import RunInterrupted
from ptscale.eval.evaluate import SUITE_HEADLINE, eval_data, generate_gathered, score
from ptscale.models.backbone import resolve_source
from ptscale.models.build import build_model, check_buildable
from ptscale.models.feature_cache import VisionFeatureCache, cache_for_stage
from ptscale.models.groups import check_stage_changes, group_sizes, set_trainable
from ptscale.plans import prefixes_active
from ptscale.prefix.attention import check_backend_setting
from ptscale.prefix.model import prefix_parameter_report
from ptscale.rundir import Resume, check_backbone, open_run_dir
from ptscale.runs import load_trained_weights
from ptscale.training import engine as ds
from ptscale.training.checkpoints import RunCheckpoints
from ptscale.training.logger import MetricLogger
from ptscale.training.loop import LoopSettings, StageLoop, StopRequest, make_loader
from ptscale.training.sharded import build_backbone, cast_added_parameters

log = logging.getLogger("ptscale")

METRICS = ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
VQA_METRICS = ("VQA_accuracy",)
TEXT_METRICS = ("loss", "perplexity", "exact_match")  # ptscale.eval.text


@dataclass
class EvalPoint:
    point: str  # "before training" or the stage name
    stage_index: int  # -1 before training
    trainable: int
    total: int
    metrics: dict[str, float]
    unavailable: dict[str, str]
    global_step: int = 0  # where on the run's one timeline it was taken
    settings: dict = field(default_factory=dict)  # data, split, size, beams: what makes two evaluations comparable


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def stage_name(stage: StageConfig, index: int) -> str:
    return stage.name or f"stage{index + 1}-" + "+".join(stage.train)


class PTPEFTRecipe:
    """``prepare()`` checks everything that can fail on the user's input (backbone, data, the model on the
    meta device, the checkpoint to resume) before a run directory exists; ``setup()`` then creates it and
    builds the model; ``train()`` runs the stages; ``cleanup()`` prints the results."""

    def __init__(self, cfg: RunConfig, ds_template: dict, resume: Resume | None = None, command: str = "") -> None:
        self.cfg = cfg
        self.ds_template = ds_template
        self.resume = resume
        self.command = command  # how the run was launched: the resume hint repeats it
        self._prepared = False

    # --- setup ----------------------------------------------------------------------------------------
    def prepare(self, build_backbone: bool = True) -> None:
        """``build_backbone=False`` (dry run): an uncached embedded default is not pre-trained."""
        cfg = self.cfg
        self.dist = ds.init_distributed()
        check_backend_setting(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        self.stop = StopRequest()
        self.stop.install()
        seed_everything(cfg.seed)
        self.zero3 = ds.zero_stage(self.ds_template) == 3
        if cfg.model.quantization == "int8" and self.zero3:
            raise RecipeError("model.quantization=int8 under ZeRO-3: bitsandbytes keeps each int8 matrix whole on "
                              "every rank beside its shard (Int8Params.CB), so ZeRO-3 would save nothing; use nf4 / "
                              "fp4, or --ds ds_configs/zero2.json")
        self.source = resolve_source(cfg.model, rank=self.dist.rank, barrier=ds.barrier, build=build_backbone)
        if self.resume is not None:
            check_backbone(self.resume.run_dir, self.source.identity, "--resume")
        self.collator = make_collator(self.source, cfg.data)
        self.splits = load_splits(cfg.data, self.collator)  # data errors before the model is built
        self.train_records, self.eval_records = self.splits.train, self.splits.eval
        self.eval_data = eval_data(cfg.data, self.splits)
        self._check_batches()
        check_buildable(cfg, self.source)
        self._checkpoint_read = None
        if self.resume is not None and self.resume.checkpoint is not None:
            self._checkpoint_read = read_checkpoint(self.resume.checkpoint)  # a torn checkpoint fails here
        self._prepared = True

    def _check_batches(self) -> None:
        """Every stage gets at least one full batch per rank (the loader drops the last partial one)."""
        per_rank = len(self.train_records) // self.dist.world_size
        for i, stage in enumerate(self.cfg.stages):
            if stage.batch_size > per_rank:
                raise RecipeError(f"stages.{i}.batch_size: {stage.batch_size} per rank, but {len(self.train_records)} "
                                  f"training records on {self.dist.world_size} rank(s) give {per_rank} per rank; "
                                  "lower the batch size (methods.<method>.batch_size) or raise data.train_size")

    def summary(self, dry_run: bool = False) -> str:
        """What will run, in one line: model, plan, stages, data, world."""
        cfg = self.cfg
        stages = " -> ".join(f"{stage_name(s, i)} ({s.steps} steps)" if s.steps else
                             f"{stage_name(s, i)} ({s.epochs:g} ep)" for i, s in enumerate(cfg.stages))
        data = f"{cfg.data.name}/{cfg.data.task}" if cfg.data.name.startswith("synthetic") else cfg.data.name
        head = "dry run OK (nothing written): " if dry_run else ""
        return (f"{head}{self.source.identity['source']}, plan {cfg.plan or 'explicit stages'}: {stages}; data "
                f"{data} {len(self.train_records)} train / {len(self.eval_records)} eval; "
                f"{self.dist.world_size} rank(s), ZeRO-{ds.zero_stage(self.ds_template)}")

    def setup(self) -> None:
        if not self._prepared:
            self.prepare()
        cfg = self.cfg
        self.run_dir = self._open_run_dir()
        if self.dist.is_main:
            tqdm.write(f"{self.summary()}; run directory {self.run_dir}")
        self.logger = MetricLogger(self.run_dir, self.dist.is_main)
        self.checkpoints = RunCheckpoints(self.run_dir, self.dist, cfg.checkpoint.keep_last, self.logger.log)
        m = cfg.model  # whole, or sharded from the first parameter under ZeRO-3 (each rank's peak memory printed)
        self.backbone = build_backbone(self.source, m, ds.zero3_config(self.ds_template, cfg.stages[0], m.dtype,
                                                                       self.dist.world_size))
        self.model = build_model(cfg, self.backbone)
        cast_added_parameters(self.model, cfg.model.dtype)  # prefixes/tuners beside a zero.Init-built backbone
        self.cache: VisionFeatureCache | None = None
        self.progress, self._optimizer_state, self._tuned = Progress(world_size=self.dist.world_size), None, None
        if self._checkpoint_read is not None:
            self._load_checkpoint(self.resume.checkpoint, *self._checkpoint_read)
            self._checkpoint_read = None
        self.results = [EvalPoint(**r) for r in self.progress.results]

    def _open_run_dir(self) -> Path:
        """Rank 0 creates (or, resuming, reopens) the run directory; every rank learns where it is."""
        run_dir = open_run_dir(self.cfg, self.resume, self.source.identity) if self.dist.is_main else None
        return Path(ds.broadcast_object(str(run_dir)))

    def _load_checkpoint(self, path: Path, progress: Progress, tuned: dict, optimizer: dict | None) -> None:
        load_trained_weights(self.model, tuned, path)  # before any engine exists
        self.progress, self._optimizer_state, self._tuned = progress, optimizer, tuned
        if self.dist.is_main:
            tqdm.write(f"resuming from {path}: stage {progress.stage_index + 1}, step {progress.step}"
                       f" (saved on {progress.world_size} ranks, now {self.dist.world_size})")

    # --- train ----------------------------------------------------------------------------------------
    def train(self) -> None:
        p = self.progress
        try:
            for index in range(p.stage_index, len(self.cfg.stages)):
                self.run_stage(index, self.cfg.stages[index])
        except RunInterrupted as e:
            raise RunInterrupted(e.signum, self._interrupt_message(e.signum)) from None

    def run_stage(self, index: int, stage: StageConfig) -> None:
        name = stage_name(stage, index)
        trainable, total = set_trainable(self.model, stage.train)
        loader = make_loader(self.train_records, self.collator.train_batch, stage, index, self.cfg.seed, self.dist,
                             skip_bad=self.cfg.data.on_bad_data == "skip")
        steps = stage.steps or max(1, math.floor(stage.epochs * len(loader) / stage.grad_accum))
        engine = self._engine(stage, index, steps)
        if self.cfg.eval.before_training and index == 0 and self.progress.step == 0 and not self.results:
            # with the first engine alive, before its first step: its hooks gather a partitioned backbone.
            # The pre-trained model as it is: no prefix yet.
            self.model.dormant = True
            self.evaluate("before training", -1)
        self.model.dormant = not prefixes_active(self.cfg.stages, index)
        self._announce(name, stage, trainable, total, steps)
        before = ds.param_digests(self.model) if self.cfg.check_frozen else {}
        self.cache = cache_for_stage(self.model, stage.train, self.cfg.feature_cache, self.cfg.prefix.lengths,
                                     self.cfg.data, self.backbone.image_processor,
                                     before or ds.param_digests(self.model), self.cache)
        self.logger.log(self.progress.global_step, {"kind": "stage_start", "stage": name, "stage_index": index,
                                                    "steps": steps, "trainable": trainable})
        self._loop(engine, index, name, steps, loader).run(self.model)
        if self.cache is not None:
            self._report_cache(name)
        after = ds.param_digests(self.model) if self.cfg.check_frozen else {}
        check_stage_changes(before, after, stage.train, name)
        self.checkpoints.save_stage(engine, index, name, stage.train, (before, after))
        self.logger.log(self.progress.global_step, {"kind": "stage_end", "stage": name, "stage_index": index})
        if stage.evaluate:  # while the engine lives: its hooks gather ZeRO-3 shards for generation
            self.evaluate(name, index, trainable=trainable, total=total)
        self.progress = Progress(stage_index=index + 1, world_size=self.dist.world_size,
                                 global_step=self.progress.global_step, results=[asdict(r) for r in self.results])
        self._checkpoint(engine, index, with_optimizer=False)
        ds.release(engine)

    def _engine(self, stage: StageConfig, index: int, steps: int):
        """The stage's own DeepSpeed engine (ZeRO-3 fixes what trains at initialize); resuming, with the saved
        fp32 masters, Adam moments, schedule and RNG restored into it."""
        ds_cfg = ds.resolve_ds_config(self.ds_template, stage, self.cfg.model.dtype, self.dist.world_size)
        if self._resuming(index) and self.progress.step == 0:
            self._restore_rng()  # a stage-boundary checkpoint was saved before this engine was built
        engine = ds.build_engine(self.model, stage, ds_cfg, steps)
        self._restore_into(engine, index)
        return engine

    def _announce(self, name: str, stage: StageConfig, trainable: int, total: int, steps: int) -> None:
        if not self.dist.is_main:
            return
        tqdm.write(f"[{name}] trains {', '.join(stage.train)}: {trainable:,} of {total:,} parameters "
                   f"({100 * trainable / total:.3f}%), {steps} steps")
        if "prefix" in stage.train:
            per_target = prefix_parameter_report(self.model)
            tqdm.write(f"[{name}] prefix parameters: " + ", ".join(
                f"{t} {r['params']:,} ({100 * r['share']:.3f}%)" for t, r in per_target.items()))

    def _interrupt_message(self, signum: int) -> str:
        newest = list_checkpoints(self.run_dir / "checkpoints") if hasattr(self, "run_dir") else []
        where = f"newest checkpoint: {newest[-1]}" if newest else "no checkpoint was written yet"
        how = f"resume with: {self.command} --resume {self.run_dir}" if newest else "start it again"
        return f"stopped by {signal.Signals(signum).name} at a step boundary; {where}; {how}"

    def _report_cache(self, name: str) -> None:
        c = self.cache
        if self.dist.is_main:
            tqdm.write(f"[{name}] vision feature cache: {c.hits} hits, {c.misses} misses")
            c.save()
        self.logger.log(self.progress.global_step, {"kind": "feature_cache", "stage": name, "hits": c.hits,
                                             "misses": c.misses})

    def _resuming(self, index: int) -> bool:
        return self.progress.stage_index == index and self._tuned is not None

    def _restore_rng(self) -> None:
        p = self.progress
        if p.world_size == self.dist.world_size and p.rng:
            set_rng_state(p.rng[self.dist.rank])
        elif self.dist.is_main:
            log.warning("resuming on %d ranks a run saved on %d: the data order and random streams per rank "
                        "change", self.dist.world_size, p.world_size)

    def _restore_into(self, engine, index: int) -> None:
        """Resume: fp32 masters; mid-stage also optimizer moments, step count, schedule and RNG."""
        p = self.progress
        if not self._resuming(index):
            return
        ds.restore_fp32(engine, self._tuned)  # bf16 module weights alone would round the masters
        self._tuned = None  # used once: later stages start from the weights this process trained
        if p.step == 0:
            return
        ds.set_optimizer_state(engine, self._optimizer_state, p.optimizer_step)
        sched = engine.lr_scheduler
        sched.load_state_dict(p.scheduler)
        for group, lr in zip(sched.optimizer.param_groups, sched.get_last_lr(), strict=True):
            group["lr"] = lr  # load_state_dict restores the schedule's position, not the optimizer's lr
        self._restore_rng()  # saved after this stage's engine was built, so restored after it too

    def _loop(self, engine, index: int, name: str, steps: int, loader: DataLoader) -> StageLoop:
        p = self.progress
        if p.stage_index != index:
            self.progress = Progress(stage_index=index, world_size=self.dist.world_size, global_step=p.global_step,
                                     results=[asdict(r) for r in self.results])
        cfg = self.cfg
        settings = LoopSettings(cfg.max_nonfinite_in_row, cfg.log_every, cfg.checkpoint.every_steps,
                                cfg.data.train_split, cfg.data.name)
        return StageLoop(engine, loader, steps, name, index, self.progress, settings, self.dist, self.logger.log,
                         checkpoint=lambda optimizer: self._checkpoint(engine, index, with_optimizer=optimizer),
                         sound_advice=self.checkpoints.sound_advice, stop=self.stop,
                         cached_images=self._cached_images if self.cache is not None else None)

    def _cached_images(self, batch: dict, keys: list) -> dict:
        """Image embeddings in place of pixels: computed once per image while the vision tower is frozen."""
        pixels = batch.pop("pixel_values")
        batch["image_embeds"] = self.cache.image_embeds(self.model.base.vision_model, keys, pixels)
        return batch

    def _checkpoint(self, engine, index: int, *, with_optimizer: bool) -> None:
        self.progress.results = [asdict(r) for r in self.results]
        trained = [g for s in self.cfg.stages[: index + 1] for g in s.train]  # every group trained so far
        self.checkpoints.save(engine, self.model, self.progress, trained, index,
                              stage_name(self.cfg.stages[index], index), with_optimizer=with_optimizer)

    # --- evaluate -------------------------------------------------------------------------------------
    def evaluate(self, point: str, index: int, trainable: int = 0, total: int | None = None) -> None:
        """The one evaluation path (ptscale.eval.evaluate), while the stage's engine lives: its hooks gather
        ZeRO-3 shards for generation."""
        synced = self.zero3 and self.dist.world_size > 1
        preds = generate_gathered(self.model, self.collator, self.eval_data.records, self.cfg.eval, self.dist,
                                  synced=synced)
        if total is None:
            total = sum(group_sizes(self.model).values())
        if self.dist.is_main:
            scored = score(preds, self.eval_data)
            metrics, unavailable = scored.fields["metrics"], scored.fields["unavailable"]
            step = self.progress.global_step
            self.results.append(EvalPoint(point, index, trainable, total, metrics, unavailable, step,
                                          self._eval_settings()))
            safe = point.replace(" ", "_")
            rows_file = "predictions" if self.eval_data.task == "text" else "captions"
            write_text_atomic(self.run_dir / f"{rows_file}-{safe}.json", json.dumps(scored.rows, indent=1))
            self.logger.log(step, {"kind": "eval", "stage": point, **metrics})
            shown = METRICS + VQA_METRICS + TEXT_METRICS + SUITE_HEADLINE
            tqdm.write(f"[eval: {point}] " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k in shown))
            self._write_results()
        self.results = ds.broadcast_object(self.results)
        ds.barrier()

    def _eval_settings(self) -> dict:
        d, e = self.cfg.data, self.cfg.eval
        split = {"synthetic": "eval", "synthetic-text": "eval", "vqav2": Path(d.vqa_eval_questions or "").name,
                 "text": Path(d.eval_file).name if d.eval_file else d.eval_split}.get(d.name, d.eval_split)
        return {"data": d.name, "task": d.task if d.name.startswith("synthetic") else self.splits.task,
                "split": split, "size": len(self.eval_records),
                "num_beams": e.num_beams, "max_new_tokens": e.max_new_tokens, "min_new_tokens": e.min_new_tokens}

    def _write_results(self) -> None:
        write_text_atomic(self.run_dir / "results.json", json.dumps(
            {"run_dir": str(self.run_dir), "world_size": self.dist.world_size,
             "evaluations": [asdict(r) for r in self.results]}, indent=1))

    # --- cleanup --------------------------------------------------------------------------------------
    def cleanup(self) -> None:
        if self.dist.is_main:
            if self.results:
                self._write_results()
                print(results_table(self.results))
            print(f"run directory: {self.run_dir}")
        self.logger.close()
        ds.barrier()


def results_table(results: list[EvalPoint]) -> str:
    names = VQA_METRICS if any("VQA_accuracy" in r.metrics for r in results) else METRICS
    names += tuple(m for m in SUITE_HEADLINE if any(m in r.metrics for r in results))
    if any("perplexity" in r.metrics for r in results):
        names = tuple(m for m in TEXT_METRICS if any(m in r.metrics for r in results))
    head = ["evaluated", "trainable", "share %", *names]
    rows = [[r.point, f"{r.trainable:,}", f"{100 * r.trainable / r.total:.3f}",
             *(f"{r.metrics.get(m, float('nan')):.4f}" for m in names)] for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep, *map(line, rows)])
