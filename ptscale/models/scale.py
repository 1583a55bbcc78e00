"""Backbones too large for one rank: built sharded from the first parameter, and planned before any run.

``build_sharded_backbone`` builds a named preset (e.g. ``blip2-opt-2.7b``) with random weights under
DeepSpeed ZeRO-3's ``zero.Init``, through transformers' own path: while an ``HfDeepSpeedConfig`` is
alive, ``Blip2ForConditionalGeneration._from_config`` enters ``zero.Init`` (every module's parameters
are partitioned as soon as that module is constructed) and then initialises the weights one module at
a time, gathered (``initialize_weights_zero3``). No rank ever holds the whole model. Wrapping the plain
constructor in ``deepspeed.zero.Init`` instead fails in transformers 5.23: ``post_init`` indexes the
already partitioned (0,)-shaped word embeddings (``IndexError`` at ``weight[padding_idx]``).
``load_sharded_backbone`` is the same for a checkpoint directory (``model.path``) via ``from_pretrained``.

``count_parameters`` / ``plan_rank`` size every parameter group exactly on the meta device (no
memory) and turn the counts into bytes per rank for a ZeRO-3 stage plan; ``memory_report`` measures
what a rank actually used (peak host RSS; peak device memory on CUDA).
"""

from __future__ import annotations

import contextlib
import resource
import sys
import weakref
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ptscale.config import LoraConfig, PrefixConfig
from ptscale.models.backbone import DTYPES, Backbone
from ptscale.models.groups import GROUPS, expand_groups, group_of
from ptscale.models.presets import preset_parts

if TYPE_CHECKING:
    pass

# --- Measuring a rank ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryReport:
    rank: int
    peak_rss: int  # bytes: host high-water mark since the last reset_peaks() (or process start)
    rss: int  # bytes: host resident set now
    device_peak: int | None  # bytes: torch.cuda.max_memory_allocated since the last reset; None without CUDA

    def line(self, label: str) -> str:
        device = "" if self.device_peak is None else f", device peak {gib(self.device_peak):.2f} GiB"
        return (f"rank {self.rank} {label}: peak RSS {gib(self.peak_rss):.2f} GiB, "
                f"RSS now {gib(self.rss):.2f} GiB{device}")


def gib(n: float) -> float:
    return n / 2**30


def _status_kib(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (Linux); None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def return_freed_memory_promptly(threshold: int = 64 * 1024) -> bool:
    """Make glibc hand freed blocks above ``threshold`` bytes back to the OS at once (process-wide).

    glibc serves allocations below its mmap threshold from the heap and raises that threshold (up to
    32 MiB) after each large free, so the full-size tensors that zero.Init builds and frees module by
    module, and ZeRO-3's gathered parameters, stay resident as fragmented heap. Measured here (1.1 B
    parameter BLIP-2, 2 CPU ranks): construction peak 2.50 / 3.02 GiB per rank by default, 2.11 / 2.10
    GiB with a fixed 64 KiB threshold. Returns False where mallopt is unavailable (not glibc)."""
    import ctypes

    m_mmap_threshold = -3  # M_MMAP_THRESHOLD in malloc.h; setting it also disables the dynamic raise
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(m_mmap_threshold, threshold))
    except (OSError, AttributeError):
        return False


def reset_peaks() -> bool:
    """Start a new measuring window: host high-water mark (Linux ``clear_refs`` 5) and CUDA peak.
    Returns False when the host peak cannot be reset (then peak_rss is the peak since process start)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_report(rank: int) -> MemoryReport:
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        peak = hwm * 1024
    else:  # no /proc: getrusage has no reset; ru_maxrss is KiB on Linux, bytes on macOS
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = maxrss if sys.platform == "darwin" else maxrss * 1024
    now = _status_kib("VmRSS")
    if now is None:
        import psutil  # a DeepSpeed dependency

        now_bytes = psutil.Process().memory_info().rss
    else:
        now_bytes = now * 1024
    device = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return MemoryReport(rank, peak, now_bytes, device)


# --- Building sharded -----------------------------------------------------------------------------------

# HfDeepSpeedConfig registers itself with transformers through a weak reference only; it must outlive
# every ZeRO-3-aware transformers call on the model (construction here; from_pretrained; resizing
# embeddings). Keyed weakly by the model: the config lives exactly as long as the model it built.
_LIVE_DS_CONFIGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_zero3_config(ds_config: dict, dtype: str) -> None:
    """A resolved ZeRO-3 config whose precision matches ``dtype`` (zero.Init takes its dtype from it)."""
    if int(ds_config.get("zero_optimization", {}).get("stage", 0)) != 3:
        raise ValueError("building sharded needs a ZeRO stage-3 DeepSpeed config (ds_configs/zero3.json)")

    def autos(node: dict, prefix: str = "") -> list[str]:
        found = []
        for key, value in node.items():
            if isinstance(value, dict):
                found += autos(value, f"{prefix}{key}.")
            elif value == "auto":
                found.append(prefix + key)
        return found

    if unresolved := autos(ds_config):
        raise ValueError(f"DeepSpeed config still has 'auto' at {', '.join(unresolved)}; resolve it first "
                         "(ptscale.training.engine.resolve_ds_config)")
    enabled = {name for name in ("bf16", "fp16") if ds_config.get(name, {}).get("enabled", False)}
    expected = {dtype} & {"bf16", "fp16"}
    if enabled != expected:
        raise ValueError(f"model dtype {dtype} but the DeepSpeed config enables {sorted(enabled) or 'neither'} of "
                         "bf16/fp16: zero.Init would build in another precision than the engine trains in")


def build_sharded_backbone(preset: str, ds_config: dict, dtype: str) -> Backbone:
    """A random-weights preset, partitioned over the current ZeRO-3 world while it is built.

    ``ds_config`` is a resolved DeepSpeed config (no "auto"); torch.distributed must be initialised
    (``ptscale.training.engine.init_distributed``). The tokenizer is the synthetic word tokenizer: the
    preset's vocabulary (50304 for OPT) is larger than it, which only leaves rows unused.
    """
    from transformers import Blip2ForConditionalGeneration

    cfg, tokenizer, processor = preset_parts(preset)
    with _zero3_transformers(ds_config, dtype) as hf_ds_config:
        model = Blip2ForConditionalGeneration._from_config(cfg, dtype=DTYPES[dtype])
        _finish_sharding(model, ds_config, hf_ds_config)
    return Backbone(model, tokenizer, processor, Path(f"<random {preset}>"))


def build_random_backbone(preset: str, dtype: str) -> Backbone:
    """The same random-weights preset, whole on this rank (no ZeRO-3)."""
    from transformers import Blip2ForConditionalGeneration

    cfg, tokenizer, processor = preset_parts(preset)
    model = Blip2ForConditionalGeneration._from_config(cfg, dtype=DTYPES[dtype])
    return Backbone(model, tokenizer, processor, Path(f"<random {preset}>"))


def load_sharded_backbone(path: str | Path, ds_config: dict, dtype: str) -> Backbone:
    """``model.path`` under ZeRO-3: ``from_pretrained`` with an HfDeepSpeedConfig alive builds under
    zero.Init and loads the checkpoint into the partitions (no rank materialises the whole model)."""
    from ptscale.models.backbone import load_backbone

    with _zero3_transformers(ds_config, dtype) as hf_ds_config:
        backbone = load_backbone(path, dtype)
        _finish_sharding(backbone.model, ds_config, hf_ds_config)
    return backbone


@contextlib.contextmanager
def _zero3_transformers(ds_config: dict, dtype: str) -> Iterator[object]:
    """An HfDeepSpeedConfig for the block: transformers' from_config / from_pretrained see ZeRO-3 and
    enter zero.Init themselves (transformers holds only a weak reference to it)."""
    from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled

    check_zero3_config(ds_config, dtype)
    hf_ds_config = HfDeepSpeedConfig(ds_config)
    if not is_deepspeed_zero3_enabled():
        raise RuntimeError("transformers does not see ZeRO-3 although an HfDeepSpeedConfig is alive")
    yield hf_ds_config


def _finish_sharding(model: nn.Module, ds_config: dict, hf_ds_config: object) -> None:
    if any(not hasattr(p, "ds_id") for p in model.parameters()):
        # zero.Init partitions a module's own parameters right after its __init__; a parameter assigned
        # to an already built submodule escapes (Blip2Attention sets its qkv Linear's bias afterwards:
        # 3 x hidden elements per ViT layer). Partition those now, broadcast from rank 0.
        import deepspeed

        deepspeed.zero.Init(module=model, config_dict_or_path=ds_config)
    whole = [n for n, p in model.named_parameters() if not hasattr(p, "ds_id")]
    if whole:  # a silent fallback to plain construction would put the whole model on every rank
        raise RuntimeError(f"{len(whole)} parameters were built outside zero.Init, e.g. {whole[:3]}")
    # Later ZeRO-3-aware transformers calls on this model (resizing embeddings, generation) need the
    # config too: it now lives exactly as long as the model.
    _LIVE_DS_CONFIGS[model] = hf_ds_config


def cast_added_parameters(model: nn.Module, dtype: str) -> int:
    """Cast the parameters added after a zero.Init build (prefix encoders, LoRA, adapters: created in
    fp32) to the model dtype; returns how many were cast (0 for a model not built under zero.Init).

    DeepSpeed casts a module to bf16/fp16 at initialize only when it was not built under zero.Init
    (engine._cast_module_mixed_precision); otherwise the fp32 additions stay fp32 and ZeRO-3 stops at
    ``assert len(set(t.dtype for t in tensors)) == 1`` (zero/utils.py defragment). They stay whole
    (not partitioned) so a checkpoint can still be copied into them; initialize partitions them,
    broadcasting rank 0's values.
    """
    params = list(model.parameters())
    if not any(hasattr(p, "ds_id") for p in params):
        return 0  # not built sharded: the engine casts the whole module itself
    target = DTYPES[dtype]
    cast = 0
    for p in params:
        if not hasattr(p, "ds_id") and p.is_floating_point() and p.dtype != target:
            p.data = p.data.to(target)
            cast += 1
    return cast


# --- Counting parameters (meta device) ------------------------------------------------------------------

STAGE_PLANS: dict[str, list[str]] = {
    "prefix": ["prefix"],
    "prefix+lora": ["prefix", "lora"],
    "prefix+full": expand_groups(["prefix", "full"]),  # full keeps word embeddings and LM head frozen
}


@dataclass(frozen=True)
class ParamCounts:
    preset: str
    groups: dict[str, int]  # group -> elements (tied weights counted once)
    largest_module: int  # most elements directly owned by one module: DeepSpeed's "largest layer"

    @property
    def total(self) -> int:
        return sum(self.groups.values())

    def trainable(self, stage: str) -> int:
        return sum(self.groups[g] for g in STAGE_PLANS[stage])


def count_parameters(preset: str, prefix: PrefixConfig | None = None, lora: LoraConfig | None = None,
                     vocab_size: int | None = None) -> ParamCounts:
    """Exact per-group sizes of preset + prefixes + LoRA, built on the meta device (no memory, seconds)."""
    from transformers import Blip2ForConditionalGeneration

    from ptscale.models.presets import blip2_config
    from ptscale.prefix.model import PrefixTunedModel
    from ptscale.tuners.lora import inject_lora

    with torch.device("meta"):
        model = PrefixTunedModel(Blip2ForConditionalGeneration(blip2_config(preset, vocab_size=vocab_size)),
                                 prefix or PrefixConfig())
        inject_lora(model, lora or LoraConfig())
    return ParamCounts(preset, _group_sizes(model), _largest_module(model))


def _group_sizes(model: nn.Module) -> dict[str, int]:
    sizes = dict.fromkeys(GROUPS, 0)
    for name, p in model.named_parameters():  # named_parameters yields a tied parameter once
        sizes[group_of(name)] += p.numel()
    return sizes


def _largest_module(model: nn.Module) -> int:
    # deepspeed's model_to_params deduplicates by data_ptr(), which is 0 for every meta tensor: count here.
    return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())


# --- Bytes per rank under ZeRO-3 ------------------------------------------------------------------------

# bf16 weights and gradient partitions; fp32 master copy plus Adam's two moments for trainables only.
LOW, FP32, ADAM = 2, 4, 12


@dataclass(frozen=True)
class ZeroBuffers:
    """The DeepSpeed settings that size ZeRO-3's working buffers (DeepSpeed's defaults when unset)."""

    reduce_bucket_size: int  # elements of the gradient reduce (IPG) bucket, allocated whole at initialize
    sub_group_size: int  # elements the optimizer steps at once: its fp32 gradient copy is this large
    max_live_parameters: int  # elements kept gathered at once (upper bound of the gathered working set)
    prefetch_bucket_size: int  # elements fetched ahead of use
    offload_param: bool
    offload_optimizer: bool

    @classmethod
    def from_ds_config(cls, ds_config: dict) -> ZeroBuffers:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
        from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum

        z = DeepSpeedZeroConfig(**ds_config.get("zero_optimization", {}))

        def offloaded(section: object | None) -> bool:
            return section is not None and section.device != OffloadDeviceEnum.none

        return cls(z.reduce_bucket_size, z.sub_group_size, z.max_live_parameters, z.prefetch_bucket_size,
                   offloaded(z.offload_param), offloaded(z.offload_optimizer))


@dataclass(frozen=True)
class RankPlan:
    """Bytes one rank holds for one stage (activations excluded: they depend on batch and sequence)."""

    preset: str
    stage: str
    gpus: int
    offload: bool
    trainable_params: int
    frozen_params: int
    trainable_bytes: int  # bf16 partitions of the trained parameters
    frozen_bytes: int  # bf16 partitions of the frozen parameters
    gradient_bytes: int  # bf16 gradient partitions + the fp32 copy the optimizer steps on
    optimizer_bytes: int  # fp32 master + Adam exp_avg + exp_avg_sq
    buffer_bytes: int  # reduce bucket + gathered-parameter working set (always on the device)
    device_bytes: int  # what sits on the GPU
    host_bytes: int  # what sits in host memory for this rank (offload)

    def as_dict(self) -> dict:
        return asdict(self)


def plan_rank(counts: ParamCounts, stage: str, gpus: int, buffers: ZeroBuffers) -> RankPlan:
    """ZeRO-3 partitions every parameter, gradient and optimizer state over ``gpus`` ranks.

    Gradients: DeepSpeed keeps bf16 gradient partitions (grad_accum_dtype = model dtype) and, at the
    step, an fp32 copy of one optimizer sub-group (min(partition, sub_group_size)); with the optimizer
    offloaded, fp32 gradient buffers for the whole partition live in host memory instead.
    Working set: the reduce bucket (bf16, reduce_bucket_size elements) exists whenever something trains;
    gathered parameters are bounded by max_live_parameters + prefetch_bucket_size (and the model size).
    """
    trainable = counts.trainable(stage)
    frozen = counts.total - trainable
    part = -(-trainable // gpus)  # this rank's share of the trained elements (ceil)
    trainable_bytes, frozen_bytes = LOW * part, LOW * -(-frozen // gpus)
    optimizer_bytes = ADAM * part
    if buffers.offload_optimizer:
        gradient_bytes = (LOW + FP32) * part
    else:
        gradient_bytes = LOW * part + FP32 * min(part, buffers.sub_group_size)
    gathered = min(counts.total, buffers.max_live_parameters + buffers.prefetch_bucket_size)
    buffer_bytes = LOW * gathered + (LOW * buffers.reduce_bucket_size if trainable else 0)
    weights = trainable_bytes + frozen_bytes
    device = buffer_bytes
    host = 0
    device, host = (device, host + weights) if buffers.offload_param else (device + weights, host)
    state = gradient_bytes + optimizer_bytes
    device, host = (device, host + state) if buffers.offload_optimizer else (device + state, host)
    return RankPlan(counts.preset, stage, gpus, buffers.offload_param or buffers.offload_optimizer, trainable,
                    frozen, trainable_bytes, frozen_bytes, gradient_bytes, optimizer_bytes, buffer_bytes, device,
                    host)


def deepspeed_estimate(counts: ParamCounts, gpus: int, offload: bool) -> dict[str, int]:
    """DeepSpeed's own ZeRO-3 model-states estimate (the numbers ``estimate_zero3_model_states_mem_needs_all_cold``
    prints; it assumes every parameter trains and zero.Init, 1.5x host buffer factor)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cpu, gpu, largest = estimate_zero3_model_states_mem_needs(
        total_params=counts.total, largest_layer_params=counts.largest_module, num_gpus_per_node=gpus,
        num_nodes=1, cpu_offload=offload, cpu_offload_params=offload, zero_init=True)
    return {"gpus": gpus, "offload": offload, "host_per_node_bytes": cpu, "device_bytes": gpu,
            "largest_layer_bytes": largest}


def activation_headroom(plan: RankPlan, device_bytes: int, reserve: float = 0.10) -> int:
    """Bytes a rank has left for activations once ``reserve`` of the device (CUDA context, allocator
    fragmentation, communication buffers) and the plan are taken; negative: the plan does not fit."""
    return int(device_bytes * (1 - reserve)) - plan.device_bytes
