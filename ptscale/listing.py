"""``ptscale ls`` and ``ptscale cp``: what the code supports, read from its registries (presets, plans, parameter
groups, LoRA target modules, shipped recipes, recipe keys), and a shipped recipe copied as a starting point.

    ptscale ls [presets|plans|groups|targets|recipes|keys] [--model PRESET | --path DIR]
    ptscale cp RECIPE FILE [--force]

``presets``, ``plans``, ``recipes`` and ``keys`` import no torch; ``groups`` and ``targets`` build the model on
the meta device (no memory, seconds) to read its modules and sizes.
"""

from __future__ import annotations

import argparse
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

from ptscale.errors import RecipeError
from ptscale.plans import METHODS, plan_layout

SECTIONS = ("presets", "plans", "groups", "targets", "recipes", "keys")
DEFAULT_PRESET = "tiny-blip2-opt"


# --- registries -----------------------------------------------------------------------------------------------

def shipped_recipes() -> dict[str, str]:
    """name (file stem) -> the first sentence of its leading comment, for every recipe shipped in ptscale/recipes."""
    out = {}
    for entry in sorted(resources.files("ptscale.recipes").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            out[entry.name[:-5]] = _description(entry.read_text())
    return out


def _description(text: str) -> str:
    comment = " ".join(line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#"))
    return comment.split(". ")[0].rstrip(".")


def recipe_text(name: str) -> str:
    recipes = shipped_recipes()
    stem = name[:-5] if name.endswith(".yaml") else name
    if stem not in recipes:
        raise RecipeError(f"no shipped recipe {name!r}; shipped: {', '.join(recipes)} (ptscale ls recipes)")
    return resources.files("ptscale.recipes").joinpath(f"{stem}.yaml").read_text()


def plan_forms() -> list[str]:
    """Every plan form of ptscale.plans for every method, one example round count for alternate()."""
    peft = [m for m in METHODS if m != "prefix"]
    plans = list(METHODS)
    for form in ("prefix->{}", "{}->prefix", "prefix+{}", "alternate(prefix,{},2)"):
        plans += [form.format(m) for m in peft]
    return plans


def plan_stages(plan: str) -> str:
    """``prefix [prefix] -> prefix+lora [prefix, lora] (methods.prefix, methods.lora)``, read from plan_layout."""
    layout = plan_layout(plan)
    stages = " -> ".join(f"{name} [{', '.join(train)}]" for _, train, name in layout)
    used = ", ".join(f"methods.{m}" for m in dict.fromkeys(hyper for hyper, _, _ in layout))
    return f"{stages}   (settings: {used})"


def preset_summary(name: str) -> str:
    from ptscale.models.presets import PRESETS, PRETRAINABLE

    spec = PRESETS[name]
    parts = []
    for label, key in (("vision", "vision_config"), ("Q-Former", "qformer_config"), ("LM", "text_config")):
        c = spec[key]
        kind = f"{c['model_type'].upper()} " if "model_type" in c else ""
        parts.append(f"{label} {kind}{c['num_hidden_layers']}x{c['hidden_size']}")
    weights = "pre-trained once and cached" if name in PRETRAINABLE else "random weights without model.path"
    return f"{', '.join(parts)}, {spec['num_query_tokens']} queries; {weights}"


def _vocab_size(preset: str) -> int | None:
    """The embedded default's word vocabulary (what its cached checkpoint has); None: the preset's own."""
    from ptscale.models.presets import PRETRAINABLE

    if preset not in PRETRAINABLE:
        return None
    from ptscale.data.synthetic import vocabulary
    from ptscale.models.tokenizer import word_tokenizer

    return len(word_tokenizer(vocabulary()))


def meta_model(preset: str | None, path: str | None) -> Any:
    """The model a default recipe builds (prefixes at their default lengths, no tuners) on the meta device."""
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    from ptscale.config import PrefixConfig
    from ptscale.models.presets import blip2_config
    from ptscale.prefix.model import PrefixTunedModel

    if path is not None and not (Path(path) / "config.json").is_file():
        raise RecipeError(f"--path {path}: no config.json (a HF checkpoint directory)")
    family = _family(preset, path)
    if family.is_language_model or family.name in ("blip", "vinvl", "ofa"):
        with torch.device("meta"):
            return PrefixTunedModel(_meta_family_model(family.name, preset, path),
                                    PrefixConfig(lengths=dict(family.prefix_lengths)))
    if path is not None:
        config = Blip2Config.from_pretrained(path)
    else:
        preset = preset or DEFAULT_PRESET
        config = blip2_config(preset, vocab_size=_vocab_size(preset))
    with torch.device("meta"):
        return PrefixTunedModel(Blip2ForConditionalGeneration(config), PrefixConfig())


def _meta_family_model(family: str, preset: str | None, path: str | None) -> Any:
    """A language model, BLIP, VinVL or OFA from a checkpoint's config, or its embedded preset's geometry (word
    vocabulary)."""
    if family == "ofa":
        from ptscale.models.ofa import OFAModel, new_tiny_ofa, read_config

        return OFAModel(read_config(path)) if path is not None else new_tiny_ofa(preset)[0]
    if family == "vinvl":
        from ptscale.models.vinvl import VinVLForCaptioning, new_tiny_vinvl, read_config

        return VinVLForCaptioning(read_config(path)) if path is not None else new_tiny_vinvl(preset)[0]
    if path is not None:
        from transformers import AutoConfig

        from ptscale.models.backbone import new_model

        return new_model(family, AutoConfig.from_pretrained(path))
    if family == "blip":
        from ptscale.models.blip import new_tiny_blip

        return new_tiny_blip(preset)[0]
    from ptscale.models.pretrain_text import new_text_model

    return new_text_model(preset)[0]


def _family(preset: str | None, path: str | None):
    """The model family of ``--path`` (detected from its config.json), else of the preset."""
    from ptscale.models.families import FAMILIES, family_of_checkpoint
    from ptscale.models.presets import check_preset, preset_family

    if path is not None:
        return FAMILIES[family_of_checkpoint(path) or "blip2"]
    preset = preset or DEFAULT_PRESET
    check_preset(preset, "--model")
    return FAMILIES[preset_family(preset)]


def group_sizes(preset: str | None, path: str | None) -> dict[str, int]:
    """Parameters per group with the default prefix lengths and LoRA targets (adapters: set by their size)."""
    from ptscale.config import LoraConfig
    from ptscale.models.groups import group_sizes as sizes
    from ptscale.tuners.lora import inject_lora

    model = meta_model(preset, path)
    family = _family(preset, path)
    inject_lora(model, LoraConfig(targets=family.lora_targets) if family.lora_targets else LoraConfig())
    return sizes(model)


def lora_targets(model: Any) -> dict[str, dict[str, int]]:
    """component -> {target name -> Linear modules it matches}: each Linear module's path below its layer index
    (``attention.attention.query``), or its whole path below the component when it is in no numbered layer."""
    from torch import nn

    from ptscale.tuners.lora import COMPONENT_ROOTS

    if any(hasattr(model.base, t) for t in ("qformer", "text_decoder", "bert")):  # BLIP-2's, BLIP's, VinVL's towers
        roots = {c: r for c, r in COMPONENT_ROOTS.items() if any(n.startswith(r) for n, _ in model.named_parameters())}
    else:
        roots = {"language_model": "base."}  # a standalone language model
    out: dict[str, dict[str, int]] = {}
    for component, root in roots.items():
        found: dict[str, int] = {}
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name.startswith(root) and ".lora_" not in name:
                parts = name[len(root):].split(".")
                numbered = [i for i, p in enumerate(parts) if p.isdigit()]
                target = ".".join(parts[numbered[-1] + 1:] if numbered else parts)
                found[target] = found.get(target, 0) + 1
        out[component] = found
    return out


# --- printing ---------------------------------------------------------------------------------------------------

def _table(rows: list[list[str]], indent: str = "  ") -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def show_presets() -> str:
    from ptscale.models.presets import BLIP_PRESETS, OFA_PRESETS, PRESETS, TEXT_PRESETS, VINVL_PRESETS

    rows = [[name + (" (default)" if name == DEFAULT_PRESET else ""), preset_summary(name)] for name in PRESETS]
    for name, c in BLIP_PRESETS.items():
        v, t = c["vision_config"], c["text_config"]
        rows.append([name, f"BLIP captioning: ViT {v['num_hidden_layers']}x{v['hidden_size']}, text "
                           f"{t['num_hidden_layers']}x{t['hidden_size']}; pre-trained once and cached"])
    for name, c in VINVL_PRESETS.items():
        rows.append([name, f"VinVL (Oscar+) captioning: BERT {c['num_hidden_layers']}x{c['hidden_size']}, regions of "
                           f"{c['img_feature_dim'] - 6} + 6 box values; pre-trained once and cached"])
    for name, c in OFA_PRESETS.items():
        rows.append([name, f"OFA captioning / VQA: ResNet {'-'.join(map(str, c['resnet_layers']))} blocks, encoder "
                           f"{c['encoder_layers']}x{c['d_model']}, decoder {c['decoder_layers']}x{c['d_model']}, "
                           f"{c['image_resolution']} px; pre-trained once and cached"])
    for name, c in TEXT_PRESETS.items():  # language models (the text default: ptscale/recipes/text-default.yaml)
        rows.append([name, f"LM {c['model_type'].upper()} {c['num_hidden_layers']}x{c['hidden_size']}, "
                           f"{c['num_attention_heads']} query / {c['num_key_value_heads']} KV heads; pre-trained once "
                           "and cached (the text default)"])
    return "presets (model.preset):\n" + _table(rows)


def show_plans() -> str:
    rows = [[plan, plan_stages(plan)] for plan in plan_forms()]
    return ("plans (plan:; stages [groups they train]; alternate(prefix,X,N) takes any N >= 1; "
            "or write stages: explicitly):\n" + _table(rows))


def show_groups(preset: str | None, path: str | None) -> str:
    from ptscale.models.groups import GROUPS

    sizes = group_sizes(preset, path)
    total = sum(sizes.values())
    family = _family(preset, path)
    groups = [g for g in GROUPS if g in family.groups]
    rows = [[g, f"{sizes[g]:,}", f"{100 * sizes[g] / total:.2f}%"] for g in groups]
    rows = [[g, "set by adapter.bottleneck / adapter.budget", ""] if g == "adapter" else r
            for g, r in zip(groups, rows, strict=True)]
    for alias, members in {"full": family.full}.items():
        n = sum(sizes[g] for g in members)
        rows.append([alias, f"{n:,}", f"{100 * n / total:.2f}%", "= " + " + ".join(members)])
    rows = [r + [""] * (4 - len(r)) for r in rows]
    where = path or preset or DEFAULT_PRESET
    return (f"parameter groups (stages.N.train) of {where}, with prefix.lengths and lora.targets at their defaults "
            f"({total:,} parameters):\n" + _table(rows))


def show_targets(preset: str | None, path: str | None) -> str:
    from ptscale.config import LoraConfig
    from ptscale.models.families import FAMILIES

    family = _family(preset, path)
    defaults = family.lora_targets or LoraConfig().targets  # a family's own (BLIP, VinVL, OFA, LMs), else BLIP-2's
    lines = [f"LoRA targets (lora.targets.<component>: [names]) of {path or preset or DEFAULT_PRESET}; a name "
             "matches module paths ending in it, * = default:"]
    for component, found in lora_targets(meta_model(preset, path)).items():
        lines.append(f"  {component}:")
        chosen = defaults.get(component, [])  # a default matches a listed name ending in it on a dot boundary
        rows = [[("* " if any(t == d or t.endswith("." + d) for d in chosen) else "  ") + t,
                 f"{n} module{'s' * (n != 1)}"] for t, n in sorted(found.items())]
        lines.append(_table(rows, indent="    ") if rows else "    (no Linear modules)")
    if path is None:  # the language-model families' defaults (a checkpoint of one: --path DIR)
        lms = [f for f in FAMILIES.values() if f.is_language_model]
        lines.append("  language models (model.path of an " + " / ".join(f.name for f in lms) + " checkpoint): " +
                     "; ".join(f"{f.name} " + ", ".join(f"lora.targets.{c}: {' '.join(t)}"
                                                         for c, t in f.lora_targets.items()) for f in lms))
    return "\n".join(lines)


def show_recipes() -> str:
    rows = [[name, text] for name, text in shipped_recipes().items()]
    return "shipped recipes (ptscale cp RECIPE FILE; ptscale train --recipe FILE):\n" + _table(rows)


def show_keys() -> str:
    from ptscale.docs import recipe_keys

    rows = [[d.key, d.type, d.default] for d in recipe_keys()]
    return ("recipe keys (key, type, default; meanings in docs/recipe.md, or `ptscale ls keys --help-text`):\n"
            + _table(rows))


def show_keys_with_help() -> str:
    from ptscale.docs import recipe_keys

    return "\n".join(f"{d.key} ({d.type}, default {d.default}): {d.help}" for d in recipe_keys())


# --- command line ---------------------------------------------------------------------------------------------

def add_ls_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", nargs="?", choices=SECTIONS, default=None,
                   help="one section (default: presets, plans, groups of the default model, recipes)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--model", default=None, metavar="PRESET", help="groups / targets of this preset")
    where.add_argument("--path", default=None, metavar="DIR", help="groups / targets of this HF BLIP-2 checkpoint")
    p.add_argument("--help-text", action="store_true", help="keys: each key with its meaning")
    p.add_argument("--markdown", action="store_true", help="keys: the generated docs/recipe.md")


def add_cp_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", metavar="RECIPE", help="a shipped recipe (ptscale ls recipes)")
    p.add_argument("file", type=Path, metavar="FILE", help="where to write it")
    p.add_argument("--force", action="store_true", help="overwrite FILE if it exists")


def run_ls(args: argparse.Namespace) -> int:
    if args.what == "keys":
        from ptscale.docs import markdown

        print(markdown() if args.markdown else show_keys_with_help() if args.help_text else show_keys(),
              end="" if args.markdown else "\n")
        return 0
    shows = {"presets": show_presets, "plans": show_plans, "recipes": show_recipes,
             "groups": lambda: show_groups(args.model, args.path),
             "targets": lambda: show_targets(args.model, args.path)}
    chosen = [args.what] if args.what else ["presets", "plans", "groups", "recipes"]
    print("\n\n".join(shows[w]() for w in chosen))
    if args.what is None:
        print("\nmore: ptscale ls targets [--model PRESET | --path DIR] (LoRA target names), ptscale ls keys "
              "(every recipe key and its default)")
    return 0


def run_cp(args: argparse.Namespace) -> int:
    text = recipe_text(args.recipe)
    if args.file.is_dir():
        raise RecipeError(f"{args.file} is a directory; give a file name (e.g. {args.file / 'my.yaml'})")
    if args.file.exists() and not args.force:
        raise RecipeError(f"{args.file} exists; choose another FILE or add --force to overwrite it")
    args.file.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.file.with_name(f".{args.file.name}.tmp")
    tmp.write_text(text)
    shutil.move(tmp, args.file)
    print(f"wrote {args.file} (from the shipped {args.recipe}); train it: ptscale train --recipe {args.file}")
    return 0
