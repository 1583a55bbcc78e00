"""Language-model prefixes to and from HF PEFT's prefix-tuning adapters (peft 0.21).

PEFT's prefix tuning stores, per adapter, ``prompt_embeddings``: the (P, layers * 2 * token_dim) output of its
prefix encoder (saved in inference mode, i.e. already folded: with ``prefix_projection`` the MLP's output, never
its weights). ``PeftModel.get_prompt`` views it as (P, layers * 2, heads, head_dim) and permutes it to
``2 * layers`` tensors (B, heads, P, head_dim): entry ``2 l`` is layer l's keys, ``2 l + 1`` its values, handed to
the model as a pre-filled cache with ``ones(B, P)`` in front of the attention mask. ``token_dim`` and
``num_attention_heads`` are the key/value width and heads (grouped-query attention: the KV heads).

ptscale's ``language_model`` prefix of a decoder-only LM is the same object, (layers, 2, heads, P, head_dim):
the conversion is a reshape, exact in both directions. What differs is the position convention (README
"Prefixes"): PEFT's forward numbers the real tokens P..P+L-1 (``prefix.positions=shift``); a model trained with
``keep`` reproduces its own outputs through PEFT only when ``position_ids`` (0..L-1) are passed explicitly.

Only the ``language_model`` target has a PEFT counterpart: PEFT's prefix reaches attention through
``past_key_values``, which the Q-Former and the vision encoder do not take.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ptscale.dist import gathered
from ptscale.prefix.encoder import FoldedPrefix, PrefixEncoder
from ptscale.prefix.model import LM_TARGET, PrefixTunedModel, position_family

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PROMPT_KEY = "prompt_embeddings"


class PeftPrefixError(ValueError):
    """A prefix cannot be converted to or from PEFT's prefix tuning; the message says why."""


def language_model(base: torch.nn.Module) -> torch.nn.Module:
    """The causal LM PEFT wraps: BLIP-2's ``language_model``, or the model itself."""
    return base.language_model if base.config.model_type == "blip-2" else base


def lm_prefix_kv(model: PrefixTunedModel) -> torch.Tensor:
    """The ``language_model`` prefix as static keys/values (layers, 2, heads, P, head_dim) on the CPU, at least fp32
    (float64 stays float64): the encoder's output (the folded form), whatever the model's encoder."""
    if model.kind != "classic":
        raise PeftPrefixError("prefix.kind=plus has no PEFT counterpart (its memory is outside the softmax)")
    if LM_TARGET not in model.prefixes:
        raise PeftPrefixError(f"the model has no {LM_TARGET!r} prefix (targets: {', '.join(model.prefixes) or 'none'})")
    if position_family(model.base) is None:
        raise PeftPrefixError(f"{type(model.base).__name__}: only decoder-only language models (OPT, Llama, Qwen2, "
                              "BLIP-2 with OPT) have PEFT prefix-tuning counterparts here")
    module = model.prefixes[LM_TARGET]
    with torch.no_grad(), gathered(list(module.parameters())):
        kv = module().detach().to("cpu")
    return (kv if kv.dtype == torch.float64 else kv.float()).contiguous()


def peft_prefix_config(model: PrefixTunedModel, *, base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """adapter_config.json of the LM prefix, as ``PeftModel.save_pretrained`` writes it for prefix tuning."""
    from peft import PrefixTuningConfig

    shape = model.prefixes[LM_TARGET].shape
    lm = language_model(model.base)
    cfg = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=shape.length, num_layers=shape.num_layers,
                             token_dim=shape.width, num_attention_heads=shape.num_heads,
                             num_transformer_submodules=1, prefix_projection=False, inference_mode=True,
                             base_model_name_or_path=base_model_name_or_path)
    out = cfg.to_dict()
    out["auto_mapping"] = {"base_model_class": type(lm).__name__, "parent_library": type(lm).__module__}
    return out


def export_prefix_peft(model: PrefixTunedModel, out_dir: str | Path, *,
                       base_model_name_or_path: str | None = None) -> Path:
    """Writes the ``language_model`` prefix as a PEFT prefix-tuning adapter (``adapter_config.json`` +
    ``adapter_model.safetensors`` with ``prompt_embeddings``), for ``PeftModel.from_pretrained(lm, out_dir)``
    where ``lm`` is the standalone LM, or BLIP-2's ``language_model``."""
    kv = lm_prefix_kv(model)
    layers, _, heads, length, head_dim = kv.shape
    # (layers, 2, H, P, D) -> (P, layers, 2, H, D) -> (P, layers*2*H*D): get_prompt's view + permute, inverted.
    flat = kv.permute(3, 0, 1, 2, 4).reshape(length, layers * 2 * heads * head_dim).contiguous()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = peft_prefix_config(model, base_model_name_or_path=base_model_name_or_path)
    (out / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True))
    save_file({PROMPT_KEY: flat}, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return out


def read_peft_prefix(adapter_dir: str | Path) -> torch.Tensor:
    """A PEFT prefix-tuning adapter's prefix as (layers, 2, heads, P, head_dim) fp32 keys/values."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{adapter_dir}: no {ADAPTER_CONFIG}; not a PEFT adapter directory")
    cfg = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    if cfg.get("peft_type") != "PREFIX_TUNING":
        raise PeftPrefixError(f"{adapter_dir}: a {cfg.get('peft_type')} adapter, not PREFIX_TUNING")
    if cfg.get("num_transformer_submodules", 1) != 1:
        raise PeftPrefixError(f"{adapter_dir}: an encoder-decoder prefix (num_transformer_submodules="
                              f"{cfg['num_transformer_submodules']}); only decoder-only LMs are imported")
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{adapter_dir}: no {ADAPTER_WEIGHTS} (adapters saved as .bin: re-save with "
                                "safe_serialization=True)")
    with safe_open(str(weights), framework="pt") as f:
        if PROMPT_KEY not in f.keys():
            raise PeftPrefixError(f"{weights}: no {PROMPT_KEY!r} tensor (keys: {sorted(f.keys())})")
        flat = f.get_tensor(PROMPT_KEY)
    flat = flat if flat.dtype == torch.float64 else flat.float()
    length, layers, token_dim, heads = (cfg["num_virtual_tokens"], cfg["num_layers"], cfg["token_dim"],
                                        cfg["num_attention_heads"])
    if flat.shape != (length, layers * 2 * token_dim):
        raise PeftPrefixError(f"{weights}: {PROMPT_KEY} has shape {tuple(flat.shape)}, the config gives "
                              f"({length}, {layers} * 2 * {token_dim})")
    return flat.view(length, layers, 2, heads, token_dim // heads).permute(1, 2, 3, 0, 4).contiguous()


def load_peft_prefix(model: PrefixTunedModel, adapter_dir: str | Path) -> None:
    """Copies a PEFT prefix-tuning adapter into ``model``'s ``language_model`` prefix: into its static keys/values
    when folded (evaluation) or when ``prefix.encoder=none`` (initialisation: the keys/values are then the trained
    parameters). An MLP / linear encoder cannot be set to produce given keys/values: fold first, or train with
    ``prefix.encoder=none`` to start from a PEFT prefix."""
    kv = read_peft_prefix(adapter_dir)
    if LM_TARGET not in model.prefixes:
        raise PeftPrefixError(f"the model has no {LM_TARGET!r} prefix; give prefix.lengths.{LM_TARGET}={kv.shape[3]}")
    module = model.prefixes[LM_TARGET]
    if model.kind != "classic":
        raise PeftPrefixError("prefix.kind=plus has no PEFT counterpart (its memory is outside the softmax)")
    if tuple(module.shape.kv_shape) != tuple(kv.shape):
        raise PeftPrefixError(f"{adapter_dir}: prefix of shape {tuple(kv.shape)} (layers, 2, heads, length, head_dim);"
                              f" the model's {LM_TARGET} prefix is {tuple(module.shape.kv_shape)}")
    if not isinstance(module, FoldedPrefix) and not (isinstance(module, PrefixEncoder) and module.kind == "none"):
        raise PeftPrefixError(f"the {LM_TARGET} prefix is a {module.kind!r} encoder, which cannot be set to given "
                              "keys/values: call model.fold_prefixes() first (evaluation), or use "
                              "prefix.encoder=none (to train on from the PEFT prefix)")
    with gathered([module.kv], modifier_rank=0), torch.no_grad():
        module.kv.copy_(kv)


def prefixed_from_peft(base: torch.nn.Module, adapter_dir: str | Path, *, positions: str = "shift",
                       freeze_base: bool = True) -> PrefixTunedModel:
    """``base`` (OPT, Llama, Qwen2, or BLIP-2 with OPT) wrapped with a PEFT prefix-tuning adapter's prefix as its
    ``language_model`` prefix (static keys/values). ``positions="shift"`` reproduces PEFT's forward."""
    from ptscale.config import PrefixConfig

    kv = read_peft_prefix(adapter_dir)
    model = PrefixTunedModel(base, PrefixConfig(lengths={LM_TARGET: kv.shape[3]}, encoder="none",
                                                positions=positions), freeze_base=freeze_base)
    model.fold_prefixes()
    model.prefixes.to(torch.float64 if kv.dtype == torch.float64 else torch.float32)  # the adapter's precision
    load_peft_prefix(model, adapter_dir)
    return model
