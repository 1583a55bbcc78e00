"""Planning memory before renting a GPU: every parameter group sized exactly on the meta device (no memory),
turned into bytes per rank for a ZeRO-3 stage plan (launchers/memory_plan.py, docs/memory_plan.md)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ptscale.config import LoraConfig, PrefixConfig
from ptscale.models.groups import GROUPS, expand_groups, group_of

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
