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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from ptscale.checkpoint import (
    Progress,
    first_nonfinite,
    list_checkpoints,
    newest_sound_checkpoint,
    read_checkpoint,
    rng_state,
    save_safetensors_atomic,
    set_rng_state,
    write_checkpoint,
    write_text_atomic,
)
from ptscale.config import RecipeError, RunConfig, StageConfig
from ptscale.console import progress
from ptscale.data.bad_data import BadDataReport, Collated, EmptySplitError, collate_skipping
from ptscale.data.collate import make_collator
from ptscale.data.sources import load_splits
from ptscale.errors import RunInterrupted, TrainingStopped
from ptscale.eval.evaluate import SUITE_HEADLINE, eval_data, generate_gathered, score
from ptscale.models.backbone import resolve_source
from ptscale.models.build import build_model, check_buildable
from ptscale.models.feature_cache import VisionFeatureCache, cache_for_stage
from ptscale.models.groups import group_of, group_sizes, set_trainable
from ptscale.models.sharded import build_backbone, cast_added_parameters
from ptscale.plans import prefixes_active
from ptscale.prefix.model import prefix_parameter_report
from ptscale.rundir import Resume, check_backbone, open_run_dir
from ptscale.runs import load_trained_weights
from ptscale.training import engine as ds
from ptscale.training.logger import MetricLogger

log = logging.getLogger("ptscale")

METRICS = ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
VQA_METRICS = ("VQA_accuracy",)


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


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start mid-epoch (resume: same data order, skipping consumed batches)."""

    skip = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self) -> int:
        return super().__len__() - self.skip


class NonFiniteLossError(TrainingStopped):
    pass


class StopRequest:
    """SIGINT / SIGTERM: inside the training loop the run finishes its step, checkpoints and stops (every rank
    agrees at the step boundary); outside it (setup, evaluation), or at a second Ctrl-C, it stops at once.
    Under the deepspeed launcher a rank sees the terminal's SIGINT and then the launcher's SIGTERM: one stop."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.in_loop = False

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        again = self.signum is not None
        self.signum = self.signum or signum
        if not self.in_loop or (again and signum == signal.SIGINT):
            raise RunInterrupted(self.signum)


class PTPEFTRecipe:
    """``prepare()`` checks everything that can fail on the user's input (backbone, data, the model on the
    meta device, the checkpoint to resume) before a run directory exists; ``setup()`` then creates it and
    builds the model; ``train()`` runs the stages; ``cleanup()`` prints the results."""

    stop = StopRequest()  # class default: a recipe built by hand (tests) has one too

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
        data = f"{cfg.data.name}/{cfg.data.task}" if cfg.data.name == "synthetic" else cfg.data.name
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
        m = cfg.model  # whole, or sharded from the first parameter under ZeRO-3 (each rank's peak memory printed)
        self.backbone = build_backbone(self.source, m, ds.zero3_config(self.ds_template, cfg.stages[0], m.dtype,
                                                                       self.dist.world_size))
        self.model = build_model(cfg, self.backbone)
        cast_added_parameters(self.model, cfg.model.dtype)  # prefixes/tuners beside a zero.Init-built backbone
        self.bad_data = BadDataReport()
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
        loader = self._loader(stage, index)
        steps = stage.steps or max(1, math.floor(stage.epochs * len(loader) / stage.grad_accum))
        ds_cfg = ds.resolve_ds_config(self.ds_template, stage, self.cfg.model.dtype, self.dist.world_size)
        if self._resuming(index) and self.progress.step == 0:
            self._restore_rng()  # a stage-boundary checkpoint was saved before this engine was built
        engine = ds.build_engine(self.model, stage, ds_cfg, steps)
        self._restore_into(engine, index)
        if self.cfg.eval.before_training and index == 0 and self.progress.step == 0 and not self.results:
            # with the first engine alive, before its first step: its hooks gather a partitioned backbone.
            # The pre-trained model as it is: no prefix yet.
            self.model.dormant = True
            self.evaluate("before training", -1)
        self.model.dormant = not prefixes_active(self.cfg.stages, index)
        if self.dist.is_main:
            tqdm.write(f"[{name}] trains {', '.join(stage.train)}: {trainable:,} of {total:,} parameters "
                       f"({100 * trainable / total:.3f}%), {steps} steps")
            if "prefix" in stage.train:
                per_target = prefix_parameter_report(self.model)
                tqdm.write(f"[{name}] prefix parameters: " + ", ".join(
                    f"{t} {r['params']:,} ({100 * r['share']:.3f}%)" for t, r in per_target.items()))
        before = ds.param_digests(self.model) if self.cfg.check_frozen else {}
        self.cache = cache_for_stage(self.model, stage.train, self.cfg.feature_cache, self.cfg.prefix.lengths,
                                     self.cfg.data, self.backbone.image_processor,
                                     before or ds.param_digests(self.model), self.cache)
        self.logger.log(self.progress.global_step, {"kind": "stage_start", "stage": name, "stage_index": index,
                                                    "steps": steps, "trainable": trainable})
        self._train_steps(engine, loader, steps, name, index)
        if self.cache is not None:
            self._report_cache(name)
        after = ds.param_digests(self.model) if self.cfg.check_frozen else {}
        self._check_changes(before, after, stage, name)
        self._save_stage(engine, index, name, before, after)
        self.logger.log(self.progress.global_step, {"kind": "stage_end", "stage": name, "stage_index": index})
        if stage.evaluate:  # while the engine lives: its hooks gather ZeRO-3 shards for generation
            self.evaluate(name, index, trainable=trainable, total=total)
        self.progress = Progress(stage_index=index + 1, world_size=self.dist.world_size,
                                 global_step=self.progress.global_step, results=[asdict(r) for r in self.results])
        self._checkpoint(engine, index, with_optimizer=False)
        ds.release(engine)

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

    def _loader(self, stage: StageConfig, index: int) -> DataLoader:
        sampler = ResumableSampler(self.train_records, num_replicas=self.dist.world_size, rank=self.dist.rank,
                                   shuffle=True, seed=self.cfg.seed + index, drop_last=True)
        collate = self.collator.train_batch
        if self.cfg.data.on_bad_data == "skip":
            collate = collate_skipping(collate)  # batches carry their skip counts (Collated)
        # Its own generator: iterator creation must not draw from the global RNG, which resume restores.
        loader = DataLoader(self.train_records, batch_size=stage.batch_size, sampler=sampler,
                            collate_fn=collate, drop_last=True,
                            generator=torch.Generator().manual_seed(self.cfg.seed))
        return loader

    def _train_steps(self, engine, loader: DataLoader, steps: int, name: str, index: int) -> None:
        self.model.train()
        p = self.progress
        if p.stage_index != index:
            p = self.progress = Progress(stage_index=index, world_size=self.dist.world_size,
                                         global_step=p.global_step, results=[asdict(r) for r in self.results])
        bar = progress(total=steps, initial=p.step, desc=name, rank=self.dist.rank)
        self.stop.in_loop = True
        try:
            self._step_loop(engine, loader, steps, name, index, bar)
        finally:
            self.stop.in_loop = False
            bar.close()

    def _step_loop(self, engine, loader: DataLoader, steps: int, name: str, index: int, bar: tqdm) -> None:
        p = self.progress
        self._t0, self._samples0, self._in_row = time.time(), p.samples, 0
        while p.step < steps:
            loader.sampler.set_epoch(p.epoch)
            loader.sampler.skip = p.batch_in_epoch * loader.batch_size
            epoch_report = BadDataReport()
            for batch in loader:
                if isinstance(batch, Collated):
                    batch, report = batch
                    epoch_report.merge(report)
                p.batch_in_epoch += 1
                loss = self._step(engine, batch, name)
                if loss is None:
                    continue
                p.step += 1
                p.global_step += 1
                self._after_step(engine, loss, steps, name, index, bar)
                if p.step >= steps:
                    break
            else:
                p.epoch, p.batch_in_epoch = p.epoch + 1, 0
            self._report_bad_data(epoch_report, name)

    def _step(self, engine, batch: dict | None, name: str) -> torch.Tensor | None:
        """Forward, backward and step on one micro-batch; its loss when an optimizer step completed. None: a batch
        empty on some rank (all items bad), a non-finite loss (skipped and counted), or inside accumulation."""
        # Collectives follow: every rank skips a batch that is empty on any rank.
        if not self._all_ranks(batch is not None):
            return None
        keys = batch.pop("image_keys", None)
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        if self.cache is not None:
            pixels = batch.pop("pixel_values")
            batch["image_embeds"] = self.cache.image_embeds(self.model.base.vision_model, keys, pixels)
        loss = engine(**batch).loss
        if not self._all_finite(loss):
            self._skip_nonfinite(name)
            return None
        self._in_row = 0
        engine.backward(loss)
        engine.step()
        self.progress.samples += batch["input_ids"].shape[0] * self.dist.world_size
        return loss if engine.is_gradient_accumulation_boundary() else None

    def _skip_nonfinite(self, name: str) -> None:
        p = self.progress
        p.nonfinite_skipped += 1
        self._in_row += 1
        self.logger.log(p.global_step, {"kind": "nonfinite", "stage": name, "skipped": p.nonfinite_skipped})
        if self._in_row >= self.cfg.max_nonfinite_in_row:
            raise NonFiniteLossError(f"[{name}] {self._in_row} non-finite losses in a row (step {p.step}); "
                                     f"stopping. {self._sound_checkpoint_advice()}")

    def _after_step(self, engine, loss: torch.Tensor, steps: int, name: str, index: int, bar: tqdm) -> None:
        """Progress, logging, a requested stop (every rank agrees at this boundary), periodic checkpoints."""
        p = self.progress
        rate = (p.samples - self._samples0) / (time.time() - self._t0)
        bar.set_postfix(loss=f"{loss.item():.4f}", samples_s=f"{rate:.1f}")
        bar.update(1)
        if p.step % self.cfg.log_every == 0 or p.step == steps:
            self.logger.log(p.global_step, {
                "kind": "train", "stage": name, "stage_index": index, "step": p.step, "loss": loss.item(),
                "lr": engine.get_lr()[0], "samples_per_s": rate, "epoch": p.epoch,
                "nonfinite_skipped": p.nonfinite_skipped})
        if not self._all_ranks(self.stop.signum is None):  # a signal reached some rank
            self._checkpoint(engine, index, with_optimizer=True)
            raise RunInterrupted(self.stop.signum or signal.SIGTERM)
        every = self.cfg.checkpoint.every_steps
        if every and p.step % every == 0 and p.step < steps:
            self._checkpoint(engine, index, with_optimizer=True)

    def _report_bad_data(self, epoch_report: BadDataReport, name: str) -> None:
        """Counted at each epoch end (all ranks summed); never a silent zero-length epoch."""
        total = BadDataReport.merged(ds.gather_objects(epoch_report))
        if not total.counts:
            return
        self.bad_data.merge(total)
        if self.dist.is_main:
            tqdm.write(f"[{name}] skipped bad data this epoch: {total.summary()}")
            self.logger.log(self.progress.global_step, {"kind": "bad_data", "stage": name, **total.counts})
        if total.kept == 0:
            raise EmptySplitError(self.cfg.data.train_split, self.cfg.data.name, "every example was skipped")

    @staticmethod
    def _all_ranks(ok: bool) -> bool:
        """Every rank must take the same branch: forward, backward and step are collectives under ZeRO."""
        flag = torch.tensor([float(ok)])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())

    def _all_finite(self, loss: torch.Tensor) -> bool:
        return self._all_ranks(bool(torch.isfinite(loss.detach()).all()))

    def _checkpoint(self, engine, index: int, *, with_optimizer: bool) -> None:
        """All ranks gather and check; rank 0 writes atomically. Never from non-finite weights or moments:
        every rank sees the same gathered values, so every rank stops together."""
        trained = {g for s in self.cfg.stages[: index + 1] for g in s.train}
        names = {n for n, _ in self.model.named_parameters() if group_of(n) in trained}
        tuned = ds.gather_state(self.model, names)
        tuned.update(ds.trainable_fp32(engine))  # fp32 masters, not the (maybe bf16) module copies
        p = self.progress
        optimizer = None
        if with_optimizer:
            optimizer, p.optimizer_step = ds.get_optimizer_state(engine)
            p.scheduler = engine.lr_scheduler.state_dict()
        if bad := first_nonfinite(tuned) or first_nonfinite(optimizer or {}):
            raise NonFiniteLossError(f"[{stage_name(self.cfg.stages[index], index)}] {bad[0]} is not finite at step "
                                     f"{p.step} ({bad[1]:,} of {bad[2]:,} values): no checkpoint written. "
                                     f"{self._sound_checkpoint_advice()}")
        p.rng = ds.gather_objects(rng_state())
        p.world_size = self.dist.world_size
        p.results = [asdict(r) for r in self.results]
        if self.dist.is_main:
            path = write_checkpoint(self.run_dir / "checkpoints", p, tuned, optimizer, self.cfg.checkpoint.keep_last)
            self.logger.log(p.global_step, {"kind": "checkpoint", "stage_index": index, "path": str(path)})
        ds.barrier()

    def _sound_checkpoint_advice(self) -> str:
        sound = newest_sound_checkpoint(self.run_dir / "checkpoints")
        if sound is None:
            return "No sound checkpoint exists: lower the learning rate and start a new run"
        return (f"The newest sound checkpoint is {sound}: lower the learning rate (a resume keeps the recipe, so "
                f"start a new run) or resume from it with --resume {sound}")

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
        weights = ds.trainable_fp32(engine)
        if self.dist.is_main:
            stage_dir = self.run_dir / f"stage-{index + 1}-{name}"
            stage_dir.mkdir(parents=True, exist_ok=True)
            save_safetensors_atomic(weights, stage_dir / "trainable.safetensors",
                                    metadata={"stage": name, "groups": ",".join(self.cfg.stages[index].train)})
            if before:
                write_text_atomic(stage_dir / "param_digests.json", json.dumps({"before": before, "after": after}))
        ds.barrier()

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
            write_text_atomic(self.run_dir / f"captions-{safe}.json", json.dumps(scored.rows, indent=1))
            self.logger.log(step, {"kind": "eval", "stage": point, **metrics})
            tqdm.write(f"[eval: {point}] " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                                       if k in METRICS + VQA_METRICS + SUITE_HEADLINE))
            self._write_results()
        self.results = ds.broadcast_object(self.results)
        ds.barrier()

    def _eval_settings(self) -> dict:
        d, e = self.cfg.data, self.cfg.eval
        split = {"synthetic": "eval", "vqav2": Path(d.vqa_eval_questions or "").name}.get(d.name, d.eval_split)
        return {"data": d.name, "task": d.task if d.name == "synthetic" else self.splits.task,
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
    head = ["evaluated", "trainable", "share %", *names]
    rows = [[r.point, f"{r.trainable:,}", f"{100 * r.trainable / r.total:.3f}",
             *(f"{r.metrics.get(m, float('nan')):.4f}" for m in names)] for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep, *map(line, rows)])
