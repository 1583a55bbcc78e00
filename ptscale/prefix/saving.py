"""Prefix weights to and from safetensors.

The file holds every parameter under ``model.prefixes`` by its full name (``prefixes.<target>...``), and
its metadata says what they are: the format, the prefix kind, and per target whether it is folded (static
keys/values) or an encoder, with the (layers, 2, heads, P, head_dim) shape it produces. Loading checks all
of that before it writes anything: a folded file loads into a folded model, an unfolded file into an
unfolded one (then fold), and any other mismatch is an error that says which.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ptscale.dist import gathered
from ptscale.prefix.model import PrefixTunedModel

FORMAT = "ptscale-prefixes/1"


def _describe(model: PrefixTunedModel) -> dict[str, dict]:
    folded = model.folded()
    return {t: {"folded": folded[t], "shape": list(m.shape.kv_shape)} for t, m in model.prefixes.items()}


def save_prefixes(model: PrefixTunedModel, path: str | Path) -> None:
    """Write the prefix parameters (full tensors, also under ZeRO-3) and their description."""
    params = dict(model.prefixes.named_parameters(prefix="prefixes"))
    with gathered(list(params.values())):
        tensors = {name: p.detach().to("cpu", copy=True).contiguous() for name, p in params.items()}
    metadata = {"format": FORMAT, "kind": model.kind, "targets": json.dumps(_describe(model), sort_keys=True)}
    save_file(tensors, str(path), metadata=metadata)


def load_prefixes(model: PrefixTunedModel, path: str | Path) -> None:
    """Copy a :func:`save_prefixes` file into ``model``'s prefix parameters (cast to their dtype)."""
    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a ptscale prefix file (format {meta.get('format')!r}, want {FORMAT!r})")
        if meta["kind"] != model.kind:
            raise ValueError(f"{path}: holds {meta['kind']!r} prefixes, the model has {model.kind!r} (prefix.kind)")
        saved, mine = json.loads(meta["targets"]), _describe(model)
        if set(saved) != set(mine):
            raise ValueError(f"{path}: prefix targets {sorted(saved)} do not match the model's {sorted(mine)}")
        for t in sorted(mine):
            if saved[t]["folded"] != mine[t]["folded"]:
                state = {True: "folded (static keys/values)", False: "unfolded (encoder weights)"}
                fix = ("call model.fold_prefixes() before loading" if saved[t]["folded"]
                       else "load into an unfolded model, then fold")
                raise ValueError(f"{path}: prefix {t!r} is {state[saved[t]['folded']]} in the file but "
                                 f"{state[mine[t]['folded']]} in the model; {fix}")
            if saved[t]["shape"] != mine[t]["shape"]:
                raise ValueError(f"{path}: prefix {t!r} has shape {saved[t]['shape']} (layers, 2, heads, length, "
                                 f"head_dim) in the file, {mine[t]['shape']} in the model")
        params = dict(model.prefixes.named_parameters(prefix="prefixes"))
        missing, unexpected = sorted(set(params) - set(f.keys())), sorted(set(f.keys()) - set(params))
        if missing or unexpected:
            raise ValueError(f"{path}: parameters missing from the file {missing}, not in the model {unexpected} "
                             "(a different prefix.encoder or type_embedding setting?)")
        tensors = {name: f.get_tensor(name) for name in params}
    for name, p in params.items():  # all checked before anything is written
        full = tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3: the unpartitioned shape
        if tuple(tensors[name].shape) != full:
            raise ValueError(f"{path}: {name} has shape {tuple(tensors[name].shape)} in the file, {full} in the model")
    with gathered(list(params.values()), modifier_rank=0), torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])
