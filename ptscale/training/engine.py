"""Every DeepSpeed call of ptscale lives here: init, one engine per stage, release, gather.

ZeRO-3 builds its optimizer, fp32 partitions and gradient hooks once, from the parameters that
require grad at ``deepspeed.initialize``; flipping ``requires_grad`` on a live engine trains nothing,
silently (see ../shared/notes/deepspeed-zero3-stages.md). So each stage gets its own engine on the
same module, and the previous one is destroyed with its top-level hooks removed (they otherwise keep
the old engine and optimizer alive: DeepSpeed issue #7204).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import hashlib
import json
import math
import os
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param
from torch import nn

from ptscale.console import without_known_prints
from ptscale.dist import DistInfo, barrier, broadcast_object, free_port, gather_objects  # noqa: F401 (re-exported)
from ptscale.errors import RecipeError
from ptscale.plans import StageConfig


def init_distributed() -> DistInfo:
    """Works under ``deepspeed``, ``torchrun`` (single or multi-node) and plain ``python``."""
    if "RANK" not in os.environ:  # plain python: a world of one, on a port nobody else holds
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port())
    with without_known_prints():  # DeepSpeed prints a line when its CPU allreduce op loads
        deepspeed.init_distributed(dist_backend=None)
    info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    if get_accelerator().device_name() == "cpu":
        unlink_shm_segment(info.rank)
        if "OMP_NUM_THREADS" not in os.environ:
            # CPU ranks on one host share its cores; oversubscribed OpenMP threads spin and crawl.
            local = int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))
    return info


def unlink_shm_segment(rank: int) -> None:
    """DeepSpeed's CPU shared-memory allreduce (ops/csrc/cpu/comm/shm.cpp) creates a 66 MiB
    /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank> per rank and never unlinks it, so every
    launch would leak RAM-backed tmpfs. Each rank maps every segment inside init_distributed; after the
    barrier that is true everywhere, and unlinking keeps the mappings while the memory goes back at exit."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")  # as shm.cpp names it
    barrier()
    Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}").unlink(missing_ok=True)


# --- DeepSpeed config: the recipe owns what the JSON marks "auto" -----------------------------------

RECIPE_OWNED = ("optimizer", "scheduler")


def load_ds_template(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise RecipeError(f"--ds {path}: a directory; give a DeepSpeed JSON file (e.g. ds_configs/zero3.json)")
    if not path.is_file():
        raise RecipeError(f"--ds {path}: file not found (the shipped configs are in ds_configs/)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RecipeError(f"--ds {path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise RecipeError(f"--ds {path}: a DeepSpeed config is a JSON object, got {type(cfg).__name__}")
    for key in RECIPE_OWNED:
        if key in cfg:
            raise RecipeError(f"--ds {path}: remove the {key!r} section; each stage of the recipe builds its "
                              "own AdamW and warm-up/decay schedule")
    zero = cfg.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise RecipeError(f"--ds {path}: zero_optimization must be an object ({{\"stage\": 3, ...}}), got {zero!r}")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise RecipeError(f"--ds {path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    _check_nvme(path, zero)
    return cfg


def _check_nvme(path: Path, zero: dict) -> None:
    """An NVMe offload needs a writable directory: checked here, not when DeepSpeed first swaps (mid-setup)."""
    for key in ("offload_param", "offload_optimizer"):
        offload = zero.get(key)
        if not isinstance(offload, dict) or offload.get("device") != "nvme":
            continue
        where = offload.get("nvme_path")
        if not where:
            raise RecipeError(f"--ds {path}: zero_optimization.{key}.device is nvme but nvme_path is not set; "
                              "set it to a directory on a local NVMe drive")
        if not Path(where).is_dir() or not os.access(where, os.W_OK):
            raise RecipeError(f"--ds {path}: zero_optimization.{key}.nvme_path {where}: not a writable directory; "
                              "create it or point it at one")


def _recipe_values(stage: StageConfig, dtype: str, world_size: int) -> dict[str, object]:
    """What the recipe decides for DeepSpeed, by the config's dotted key."""
    return {
        "train_micro_batch_size_per_gpu": stage.batch_size,
        "gradient_accumulation_steps": stage.grad_accum,
        "train_batch_size": stage.batch_size * stage.grad_accum * world_size,
        "gradient_clipping": stage.max_grad_norm,
        "bf16.enabled": dtype == "bf16",
        "fp16.enabled": dtype == "fp16",
    }


def _dotted(node: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_dotted(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def check_against_recipe(template: dict, stages: list[StageConfig], dtype: str, world_size: int,
                         source: str = "--ds") -> None:
    """A value the recipe owns, written in the JSON as something other than "auto", must agree with the
    recipe in every stage: otherwise one of the two would be silently ignored."""
    given = _dotted(template)
    for i, stage in enumerate(stages):
        resolve_ds_config(template, stage, dtype, world_size)  # an "auto" the recipe does not own fails now
        for key, value in _recipe_values(stage, dtype, world_size).items():
            if key in given and given[key] != "auto" and given[key] != value:
                owner = {"bf16.enabled": "model.dtype", "fp16.enabled": "model.dtype",
                         "gradient_clipping": f"stages.{i}.max_grad_norm"}.get(key, f"stages.{i}.batch_size / "
                                                                                   f"grad_accum and the world size")
                raise RecipeError(f"{source}: {key} is {given[key]!r} but the recipe gives {value!r} in stage "
                                  f"{i + 1} ({owner}); set it to \"auto\" in the JSON and choose the value in the "
                                  "recipe")


def resolve_ds_config(template: dict, stage: StageConfig, dtype: str, world_size: int) -> dict:
    """Fill every "auto" from the stage and the model dtype; an "auto" we do not own is an error."""
    cfg = copy.deepcopy(template)
    values = _recipe_values(stage, dtype, world_size)

    def fill(node: dict, prefix: str) -> None:
        for key, value in node.items():
            dotted = prefix + key
            if isinstance(value, dict):
                fill(value, dotted + ".")
            elif value == "auto":
                if dotted not in values:
                    raise RecipeError(f"DeepSpeed config: {dotted} is 'auto' but the recipe does not own it; "
                                      "give it a value in the JSON")
                node[key] = values[dotted]

    fill(cfg, "")
    cfg.setdefault("train_micro_batch_size_per_gpu", stage.batch_size)
    cfg.setdefault("gradient_accumulation_steps", stage.grad_accum)
    cfg.pop("train_batch_size", None)  # derived by DeepSpeed from the two above (checked against the recipe)
    cfg.setdefault("zero_allow_untested_optimizer", True)  # torch AdamW as the client optimizer
    cfg.setdefault("steps_per_print", 2**31 - 1)
    return cfg


def zero3_config(template: dict, stage: StageConfig, dtype: str, world_size: int) -> dict | None:
    """The resolved config a ZeRO-3 run builds its backbone under (zero.Init), None for other stages."""
    return resolve_ds_config(template, stage, dtype, world_size) if zero_stage(template) == 3 else None


def zero_stage(ds_cfg: dict) -> int:
    return int(ds_cfg.get("zero_optimization", {}).get("stage", 0))


# --- Optimizer and schedule ---------------------------------------------------------------------------

def adamw(module: nn.Module, stage: StageConfig) -> torch.optim.Optimizer:
    """AdamW, betas (0.9, 0.99) as in the paper; weight decay on matrices only (not biases or norm gains)."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            shape = p.ds_shape if hasattr(p, "ds_shape") else p.shape  # ZeRO-3 shards are (0,)-shaped
            (decay if len(shape) >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": stage.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=stage.lr, betas=(0.9, 0.99))


def warmup_linear_decay(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int):
    """Linear warm-up from 0 to the peak lr, then linear decay to 0 (paper appendix B.4)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --- One engine per stage -----------------------------------------------------------------------------

def build_engine(module: nn.Module, stage: StageConfig, ds_cfg: dict, total_steps: int):
    optimizer = adamw(module, stage)
    scheduler = warmup_linear_decay(optimizer, total_steps, math.floor(stage.warmup_ratio * total_steps))
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg)
    return engine


def inference_engine(module: nn.Module, ds_config: str | Path, dtype: str, world_size: int):
    """A ZeRO-3 engine with no optimizer, for generation on several ranks: DeepSpeed builds only its parameter
    partitioning and gather hooks (DeepSpeedZeRoOffload). Nothing requires grad, so no gradient hooks or fp32
    partitions are made. Release it with :func:`release` like a training engine."""
    for p in module.parameters():
        p.requires_grad_(False)
    template = load_ds_template(ds_config)
    if zero_stage(template) != 3:
        raise RecipeError(f"--ds {ds_config}: evaluation on several ranks shards the model with ZeRO stage 3; this "
                          "config sets another stage")
    # batch_size=1: the "auto" micro-batch must resolve to something; inference never reads it.
    cfg = resolve_ds_config(template, StageConfig(train=["prefix"], batch_size=1), dtype, world_size)
    engine, *_ = deepspeed.initialize(model=module, config=cfg)
    return engine


def release(engine) -> None:
    """Destroy a stage's engine so that nothing keeps it (or its optimizer state) alive."""
    optimizer = engine.optimizer
    engine.destroy()
    for sub in engine.module.modules():
        # ZeRO-3 creates each module's pre/post-backward autograd Functions once ("if 'pre_bwd_fn' not in
        # module.__dict__"), closing over the engine that made them: the next stage's engine would reuse this
        # one's, and its coordinator never sees the backward (activation-checkpoint recompute then frees
        # frozen weights it still needs: CheckpointError). Dropping them makes the next engine build its own.
        for attr in ("pre_bwd_fn", "post_bwd_fn"):
            sub.__dict__.pop(attr, None)
    for attr in ("module_forward_pre_hook", "module_forward_post_hook", "first_dataloader_check"):
        handle = getattr(engine, attr, None)
        if handle is not None:
            handle.remove()
    if hasattr(optimizer, "unregister_grad_acc_post_hooks"):  # the optimizer holds the engine's hook
        optimizer.unregister_grad_acc_post_hooks()
    engine.optimizer = engine.lr_scheduler = None
    gc.collect()
    _malloc_trim()


def _malloc_trim() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise, and RSS would look like a leak)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def trainable_fp32(engine) -> dict[str, torch.Tensor]:
    """Full fp32 masters of the trainable parameters (gathered: never the (0,)-shaped shards)."""
    return {name: safe_get_full_fp32_param(p).detach().float().cpu().clone()
            for name, p in engine.module.named_parameters() if p.requires_grad}


def restore_fp32(engine, masters: dict[str, torch.Tensor]) -> None:
    """Carry fp32 masters into a new engine (bf16 module weights alone would round them)."""
    for name, p in engine.module.named_parameters():
        if p.requires_grad and name in masters:
            safe_set_full_fp32_param(p, masters[name].to(p.device))


def gather_state(module: nn.Module, names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Full copies of the named parameters (all when ``names`` is None), one parameter at a time."""
    out = {}
    for name, p in module.named_parameters():
        if names is not None and name not in names:
            continue
        if hasattr(p, "ds_id"):
            with deepspeed.zero.GatheredParameters([p]):
                out[name] = p.detach().float().cpu().clone()
        else:
            out[name] = p.detach().float().cpu().clone()
    return out


def param_digests(module: nn.Module) -> dict[str, str]:
    """sha256 of every parameter's full value: exact evidence of what a stage changed."""
    out = {}
    for name, p in module.named_parameters():
        ctx = deepspeed.zero.GatheredParameters([p]) if hasattr(p, "ds_id") else contextlib.nullcontext()
        with ctx:
            out[name] = hashlib.sha256(p.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()
    return out



# --- Optimizer state: world-size independent save and restore ------------------------------------------

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def _flat_fp32_groups(engine) -> list[torch.Tensor]:
    opt = engine.optimizer
    if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3
        return list(opt.fp32_partitioned_groups_flat)
    if hasattr(opt, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        return list(opt.single_partition_of_fp32_groups)
    raise RuntimeError("resume needs a ZeRO stage 1-3 DeepSpeed config (the shipped zero2/zero3 JSONs)")


def optimizer_step_count(engine) -> int:
    inner = engine.optimizer.optimizer
    steps = [int(inner.state[f]["step"]) for f in _flat_fp32_groups(engine) if f in inner.state]
    return max(steps, default=0)


def materialize_adam_state(engine) -> None:
    """torch AdamW creates its state at the first step; a resumed engine needs it before, to load into."""
    inner = engine.optimizer.optimizer
    for flat in _flat_fp32_groups(engine):
        if flat not in inner.state or "exp_avg" not in inner.state[flat]:
            inner.state[flat] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(flat),
                                 "exp_avg_sq": torch.zeros_like(flat)}


def get_optimizer_state(engine) -> tuple[dict[str, torch.Tensor], int]:
    """Full (gathered) Adam moments per trainable parameter name, and the step count."""
    from deepspeed.utils import safe_get_full_optimizer_state

    materialize_adam_state(engine)
    out = {}
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            for key in ADAM_KEYS:
                out[f"{name}::{key}"] = safe_get_full_optimizer_state(p, key).detach().float().cpu().clone()
    return out, optimizer_step_count(engine)


def set_optimizer_state(engine, state: dict[str, torch.Tensor], step: int) -> None:
    from deepspeed.utils import safe_set_full_optimizer_state

    materialize_adam_state(engine)
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            for key in ADAM_KEYS:
                safe_set_full_optimizer_state(p, state[f"{name}::{key}"].to(p.device), key)
    inner = engine.optimizer.optimizer
    for flat in _flat_fp32_groups(engine):
        inner.state[flat]["step"] = torch.tensor(float(step))
