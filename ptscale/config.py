"""Run recipes: typed dataclasses, their defaults, and validation across keys.

A recipe is YAML plus ``key=value`` overrides laid over the defaults below: the dataclass defaults are the
only defaults (the embedded default recipe only names a plan). Every key is checked before any model is
built: unknown keys, wrong types, impossible combinations and keys the plan would ignore raise
:class:`RecipeError` naming the dotted key and the fix.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from ptscale.errors import RecipeError
from ptscale.plans import METHODS, MethodConfig, StageConfig, expand_plan, plan_methods
from ptscale.plans import documented as _doc
from ptscale.prefix.config import PREFIX_TARGETS, PrefixConfig, check_prefix
from ptscale.tuners.adapter.config import AdapterConfig
from ptscale.tuners.lora.config import LoraConfig, check_lora

# the per-component sections are defined beside their components and composed here
__all__ = ["PREFIX_TARGETS", "AdapterConfig", "LoraConfig", "MethodConfig", "PrefixConfig", "RecipeError",
           "RunConfig", "StageConfig", "dump_recipe", "load_recipe", "to_dict", "validate"]

log = logging.getLogger("ptscale")


@dataclass
class ModelConfig:
    preset: str = _doc("tiny-blip2-opt", "a named architecture (`ptscale ls presets`); tiny-blip2-opt (and tiny-blip, "
                       "its BLIP captioning counterpart) is pre-trained once and cached, the others are geometries "
                       "(random weights without model.path)")
    path: str | None = _doc(None, "local HF checkpoint directory (weights, tokenizer; BLIP-2 and BLIP also its image "
                            "processor): BLIP-2, BLIP (captioning or VQA), OPT, Llama, Qwen2 or T5; overrides the "
                            "preset's weights")
    family: str | None = _doc(None, (
        "blip2, blip, opt, llama, qwen2 or t5 (ptscale.models.families); null: detected from model.path's config.json "
        "model_type, else the preset's. A language-model family trains on text data (data.name: text)"))
    pretrain_steps: int = _doc(2400, "pre-training steps of the embedded default backbone (once, cached); "
                               "0: random weights")
    dtype: Literal["fp32", "bf16", "fp16"] = _doc("fp32", "parameter and compute dtype")
    gradient_checkpointing: bool = _doc(False, "recompute activations in the backward pass (less memory)")
    quantization: Literal["none", "nf4", "fp4", "int8"] = _doc("none", (
        "frozen base weights stored in 4 bits (nf4 / fp4, QLoRA-style: double quantisation, packed in the model "
        "dtype so ZeRO-3 can shard them) or 8 bits (int8) through bitsandbytes; for prefix / LoRA / adapter stages. "
        "Needs a checkpoint (model.path or the embedded default); int8 is not sharded by ZeRO-3 (zero2 only)"))


@dataclass
class DataConfig:
    name: Literal["synthetic", "coco", "flickr30k", "vqav2", "text", "synthetic-text"] = _doc("synthetic", (
        "the dataset (README 'Data'); text: local text files (data.train_file / data.eval_file) for a language "
        "model; synthetic-text: the text default's built-in tasks (README 'The text default')"))
    task: str = _doc("downstream", (
        "synthetic: downstream (narrow captioning in a new style), vqa (narrow question answering) or pretrain "
        "(the broad captions); downstream and vqa are evaluated on a test, a generalisation (gen/) and a retention "
        "(ret/) group, data.eval_size each (README 'The embedded default'). synthetic-text: pretrain (the broad "
        "distribution) or downstream (the adaptation task)"))
    train_size: int = _doc(512, "synthetic: the training split's size; real datasets: a cap on the examples "
                           "used (the first N; 0 = all)")
    eval_size: int = _doc(32, "synthetic: the size of each evaluation group (test, gen, ret); real datasets: a cap "
                          "(the first N; 0 = all)")
    seed: int = _doc(1234, "seed of the synthetic data")
    prompt: str = _doc("", "text before the caption (BLIP-2 uses 'a photo of'); VQA: a template with {} for the "
                       "question. Synthetic: empty keeps each record's own task prompt")
    max_text_len: int = _doc(32, "caption tokens kept per example (a longer caption is cut before its EOS); text: the "
                             "longest record in tokens (prompt + completion), a longer one is bad data")
    on_bad_data: Literal["error", "skip"] = _doc("error", (
        "a missing/corrupt image, an empty caption, ...: error stops the run naming the record (exit 3); skip "
        "drops it and counts it at each epoch end"))
    karpathy_json: str | None = _doc(None, "coco / flickr30k: the Karpathy split file (dataset_coco.json, "
                                     "dataset_flickr30k.json)")
    image_root: str | None = _doc(None, "coco / flickr30k / vqav2: the directory the image paths are relative to")
    region_features: str | None = _doc(None, (
        "VinVL: the directory of the images' region features, <image_id>.npy (num_regions x (feature_dim + 6)) and "
        "<image_id>.json ({\"tags\": [...]}) each (README 'Region features'); the synthetic task makes its own "
        "without it"))
    train_split: str = _doc("train", "coco / flickr30k: the Karpathy split used for training")
    eval_split: str = _doc("test", "coco / flickr30k: the Karpathy split used for evaluation")
    vqa_train_questions: str | None = _doc(None, "vqav2: the official questions JSON of the training split")
    vqa_train_annotations: str | None = _doc(None, "vqav2: the official annotations JSON of the training split")
    vqa_eval_questions: str | None = _doc(None, "vqav2: the official questions JSON of the evaluation split")
    vqa_eval_annotations: str | None = _doc(None, "vqav2: the official annotations JSON of the evaluation split")
    train_file: str | None = _doc(None, (
        "text: the training data, a local .jsonl / .json / .parquet / .csv file, or a directory written by "
        "datasets' save_to_disk (then its split data.train_split)"))
    eval_file: str | None = _doc(None, (
        "text: the held-out data, a file as data.train_file; null with a saved dataset directory: its split "
        "data.eval_split"))
    prompt_column: str = _doc("prompt", "text: the column holding the prompt (no loss on it)")
    completion_column: str = _doc("completion", (
        "text: the column holding the completion (the loss is on it; a file without it is plain text, read from "
        "data.text_column)"))
    text_column: str = _doc("text", "text: the column of plain language-model text (loss on every token)")
    chat_template: Literal["auto", "never"] = _doc("auto", (
        "text: auto wraps each prompt in the tokenizer's chat template (as a user turn) where the tokenizer has "
        "one; never uses the prompt as it is"))


@dataclass
class EvalConfig:
    before_training: bool = _doc(True, "evaluate the model before the first stage")
    num_beams: int = _doc(5, "beam search width of generation (1: greedy)")
    max_new_tokens: int = _doc(32, "longest generated caption / answer, in tokens")
    min_new_tokens: int = _doc(1, "shortest generated caption / answer, in tokens")
    batch_size: int = _doc(32, "images per generate call, per rank")


@dataclass
class CheckpointConfig:
    every_steps: int = _doc(50, "checkpoint every N optimizer steps (also at every stage end); 0 = stage ends only")
    keep_last: int = _doc(2, "complete checkpoints kept (older ones are deleted after a newer one is complete)")


@dataclass
class FeatureCacheConfig:
    enabled: bool = _doc(True, (
        "cache the frozen vision encoder's outputs in stages where it is frozen and carries no prefix or tuner, "
        "and the Q-Former's query tokens are frozen too (e.g. the prefix stage)"))
    directory: str | None = _doc(None, "also keep them on disk (reused by later runs); null = memory only")


def _method(help: str, **kw: Any) -> Any:
    return field(default_factory=lambda: MethodConfig(**kw), metadata={"help": help})


@dataclass
class MethodsConfig:
    """Per-method stage hyper-parameters for a named plan (the rows of the paper's tables 12-14, scaled to the
    tiny default model)."""

    prefix: MethodConfig = _method("prefix-tuning stages", epochs=3.0, lr=5e-3, warmup_ratio=0.05)
    lora: MethodConfig = _method("LoRA stages (and prefix+lora)", epochs=2.0, lr=1e-3, warmup_ratio=0.05)
    adapter: MethodConfig = _method("adapter stages (and prefix+adapter)", epochs=2.0, lr=1e-3, warmup_ratio=0.05)
    full: MethodConfig = _method("full fine-tuning stages (and prefix+full)", epochs=2.0, lr=1e-4, warmup_ratio=0.05)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    prefix: PrefixConfig = field(default_factory=PrefixConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    adapter: AdapterConfig | None = _doc(None, "S-Adapter / P-Adapter for stages that train 'adapter' (no section: "
                                         "no adapters)")
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    plan: str | None = _doc(None, (
        "a named stage plan (`ptscale ls plans`), e.g. prefix->lora; its stages take their hyper-parameters from "
        "methods (the embedded default recipe names prefix->lora). Or explicit stages instead (then no plan and no "
        "methods)"))
    methods: MethodsConfig = field(default_factory=MethodsConfig)
    stages: list[StageConfig] = _doc(help="explicit stages, instead of a plan", factory=list)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    feature_cache: FeatureCacheConfig = field(default_factory=FeatureCacheConfig)
    max_nonfinite_in_row: int = _doc(5, "consecutive skipped non-finite losses before the run stops")
    check_frozen: bool = _doc(True, "hash every parameter around each stage: frozen groups must not move, trained "
                              "ones must")
    seed: int = _doc(0, "seed of initialisation, data order and dropout")
    output_dir: str = _doc("runs", "where run directories are created")
    run_name: str | None = _doc(None, "the run directory's name under output_dir (null: a timestamp)")
    log_every: int = _doc(10, "optimizer steps between metric records (metrics.jsonl, TensorBoard)")


DEFAULT_RECIPE = "default.yaml"
# package data (ptscale/ds_configs; the checkout's top-level ds_configs/ links to it): found after `pip install .`
DEFAULT_DS = Path(str(resources.files("ptscale").joinpath("ds_configs", "zero3.json")))
RESOLVED_HEADER = "# ptscale recipe, fully resolved: every key at its value for this run\n"


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None, *,
                user_file: bool = True) -> RunConfig:
    """Load a recipe (the embedded default when ``path`` is None), apply overrides, validate.

    ``user_file``: the file is the user's own (its keys count as set explicitly, so a key the plan would
    ignore is an error); False for a run directory's saved recipe, which holds every key."""
    if path is None:
        text = resources.files("ptscale.recipes").joinpath(DEFAULT_RECIPE).read_text()
        source, explicit_file = f"<embedded {DEFAULT_RECIPE}>", False
    else:
        path = Path(path)
        if path.is_dir():
            raise RecipeError(f"recipe file {path} is a directory; give a YAML file (e.g. ptscale cp default my.yaml)")
        if not path.is_file():
            raise RecipeError(f"recipe file {path} does not exist")
        try:
            text, source = path.read_text(encoding="utf-8"), str(path)
        except UnicodeDecodeError as e:
            raise RecipeError(f"recipe file {path} is not UTF-8 text ({e.reason} at byte {e.start}); give a YAML "
                              "file") from None
        # a fully resolved recipe (a run's recipe.yaml, `ptscale config` output) sets every key: none of them
        # was chosen for this plan in particular, so unused ones are dropped, not refused
        explicit_file = user_file and not text.startswith(RESOLVED_HEADER)
    raw = _parse_yaml(text, source) or {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: a recipe is a mapping of keys, got {type(raw).__name__}")
    explicit = set(_dotted_keys(raw)) if explicit_file else set()
    if "stages" in raw and "plan" not in raw and raw.get("stages"):
        raw["plan"] = None  # explicit stages replace the plan
    for item in overrides or []:
        key = _apply_override(raw, item)
        explicit.add(key)
        if key == "stages" or key.startswith("stages."):
            raw.setdefault("plan", None)
    cfg = _build(RunConfig, raw, "", RunConfig())
    if cfg.plan is not None:
        if cfg.stages:
            raise RecipeError("plan and stages: give one of them (a named plan expands into stages)")
        cfg.stages = expand_plan(cfg.plan, cfg.methods)
    validate(cfg, explicit)
    return cfg


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{source}:{where}: YAML syntax error ({problem}); fix the file's indentation or "
                          "quoting") from None


def _dotted_keys(raw: Any, prefix: str = "") -> list[str]:
    """Every key path in a parsed recipe (``prefix``, ``prefix.lengths``, ``prefix.lengths.qformer``...)."""
    if not isinstance(raw, dict):
        return []
    out = []
    for k, v in raw.items():
        out.append(prefix + str(k))
        out += _dotted_keys(v, f"{prefix}{k}.")
    return out


def _apply_override(raw: dict, item: str) -> str:
    """Apply one ``key=value``; returns the key. A key inside a mapping-valued setting changes that entry and
    keeps the others (``prefix.lengths.qformer=0`` keeps the language model's length); a whole mapping given
    as the value replaces it."""
    if "=" not in item:
        raise RecipeError(f"override {item!r} is not key=value (e.g. methods.lora.lr=1e-4)")
    key, value = item.split("=", 1)
    node: Any = raw
    default: Any = to_dict(RunConfig())
    parts = key.split(".")
    if not all(parts):
        raise RecipeError(f"override {item!r}: empty key part in {key!r}")
    for part in parts[:-1]:
        if isinstance(node, list):
            node = node[_list_index(node, part, key)]
            default = None
        elif part.isdigit() and part not in node:
            raise RecipeError(f"override {key!r}: no list to index with {part!r} (with a plan, set methods.<method>.*)")
        else:
            had_default = isinstance(default, dict) and part in default
            default = default.get(part) if isinstance(default, dict) else None
            if had_default and default is not None and not isinstance(default, (dict, list)):
                raise RecipeError(f"override {key!r}: {part!r} holds a value, not a mapping")
            if node.get(part) is None:
                node[part] = dict(default) if isinstance(default, dict) and part in MAPPING_SETTINGS else {}
            node = node[part]
            if not isinstance(node, (dict, list)):
                raise RecipeError(f"override {key!r}: {part!r} holds a value, not a mapping")
    parsed = _parse_yaml(value, f"override {key}") if value != "" else ""
    if isinstance(node, list):
        node[_list_index(node, parts[-1], key)] = parsed
    else:
        node[parts[-1]] = parsed
    return key


MAPPING_SETTINGS = ("lengths", "targets")  # dict-valued settings (prefix.lengths, lora.targets)


def _list_index(node: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise RecipeError(f"override {key!r}: {part!r} is not an index into a list of {len(node)}")
    return int(part)


def _build(cls: type, raw: Any, prefix: str, default: Any = None) -> Any:
    """``cls`` from ``raw`` laid over ``default`` (the field's default instance: nested sections keep the
    defaults of the keys the recipe does not set)."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{prefix.rstrip('.') or 'recipe'}: expected a mapping, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        where = prefix.rstrip(".") or "recipe"
        hint = ""
        if cls is MethodConfig and {"train", "name"} & set(unknown):
            hint = " (a plan decides what each stage trains and names it; write explicit stages: to choose)"
        raise RecipeError(f"unknown key(s) {', '.join(prefix + k for k in unknown)} in {where}{hint}; "
                          f"known keys: {', '.join(sorted(names))}")
    kwargs = {}
    for k, v in raw.items():
        base = getattr(default, k, None) if default is not None else None
        kwargs[k] = _coerce(hints[k], v, prefix + k, base)
    if default is None:
        return cls(**kwargs)
    return dataclasses.replace(default, **kwargs)


def _coerce(tp: Any, value: Any, key: str, default: Any = None) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".", default if dataclasses.is_dataclass(default) else None)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key, default)
            except RecipeError as e:
                errors.append(str(e))
        raise RecipeError(errors[0])
    if origin is Literal:
        if value not in args:
            raise RecipeError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(args[0], v, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return {str(k): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" as a string
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise RecipeError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value




# bitsandbytes replaces the Linear layers of the vision tower, the language projection and the language model;
# transformers keeps BLIP-2's Q-Former (and the LM head) in full precision (_keep_in_fp32_modules).
QUANTIZED_GROUPS = ("vision", "projection", "language_model")


def validate(cfg: RunConfig, explicit: set[str] | frozenset[str] = frozenset()) -> None:
    """Checks across keys that types alone cannot express. ``explicit``: the dotted keys the user set (in
    their recipe file or as overrides); such a key that the plan would ignore is an error."""
    # the group names are owned by the model side
    from ptscale.models.groups import COMPONENTS, GROUP_ALIASES, GROUPS, expand_groups

    family = _family(cfg, explicit)
    check_prefix(cfg.prefix)
    check_lora(cfg.lora)
    if not cfg.stages:
        raise RecipeError("stages: the recipe has no stages; add at least one (e.g. train: [prefix])")
    has_prefix = any(v > 0 for v in cfg.prefix.lengths.values())
    has_lora = any(cfg.lora.targets.values())
    for i, stage in enumerate(cfg.stages):
        key = f"stages.{i}"
        if not stage.train:
            raise RecipeError(f"{key}.train: empty stage {stage.name or i!r}; name the groups that train")
        for group in stage.train:
            if group not in GROUPS and group not in GROUP_ALIASES:
                known = ", ".join((*GROUPS, *GROUP_ALIASES))
                raise RecipeError(f"{key}.train: unknown parameter group {group!r}; known: {known}")
        stage.train = expand_groups(stage.train, {"full": family.full})
        if missing := [g for g in stage.train if g not in family.groups]:
            raise RecipeError(f"{key}.train: the {family.name} model has no {', '.join(map(repr, missing))} "
                              f"parameters; its groups: {', '.join(family.groups)} "
                              f"(and full = {' + '.join(family.full)})")
        if cfg.model.quantization != "none" and (frozen := set(stage.train) & set(QUANTIZED_GROUPS)):
            raise RecipeError(f"{key}.train: trains {', '.join(sorted(frozen))}, whose Linear weights are stored "
                              f"quantized (model.quantization={cfg.model.quantization}) and cannot train; train "
                              "prefix / lora / adapter on a quantized base, or set model.quantization: none")
        if "prefix" in stage.train and not has_prefix:
            raise RecipeError(f"{key}.train: trains 'prefix' but every prefix.lengths is 0")
        if "lora" in stage.train and not has_lora:
            raise RecipeError(f"{key}.train: trains 'lora' but lora.targets is empty")
        if "adapter" in stage.train and cfg.adapter is None:
            raise RecipeError(f"{key}.train: trains 'adapter' but the recipe has no adapter section "
                              "(e.g. adapter: {kind: sequential, components: [qformer], budget: 12288})")
        if "adapter" in stage.train and (absent := [c for c in cfg.adapter.components if c not in family.groups]):
            towers = [c for c in COMPONENTS if c in family.groups]
            raise RecipeError(f"adapter.components: the {family.name} model has no {', '.join(map(repr, absent))}; "
                              f"its components: {', '.join(towers)}")
        _check_stage(stage, key)
    _drop_unused(cfg, explicit)
    _check_run(cfg)
    _validate_quantization(cfg)
    _validate_data(cfg.data)
    if cfg.eval.num_beams < 1:
        raise RecipeError(f"eval.num_beams: must be >= 1, got {cfg.eval.num_beams}")
    if cfg.eval.min_new_tokens > cfg.eval.max_new_tokens:
        raise RecipeError("eval.min_new_tokens: larger than eval.max_new_tokens")


def _family(cfg: RunConfig, explicit: set[str] | frozenset[str]):
    """Resolve ``model.family`` (recorded in the run's recipe) and give a language-model family its own defaults
    for what the user did not set: prefixes in the language model only, LoRA on its q / v projections
    (``ptscale.models.families``). Text data and language models go together."""
    from ptscale.models.families import FAMILIES, resolve_family
    from ptscale.models.presets import check_preset, preset_family

    m = cfg.model
    check_preset(m.preset, "model.preset")
    family = FAMILIES[resolve_family(m.family, m.path, preset_family(m.preset))]
    if m.path is None and family.name != preset_family(m.preset):
        raise RecipeError(f"model.family={family.name}, but preset {m.preset} is a {preset_family(m.preset)} model "
                          f"and there is no model.path; set model.path to a {family.model_type} checkpoint")
    m.family = family.name
    if family.name != "blip2":  # BLIP and the language models: their own prefix targets and LoRA defaults
        cfg.prefix.lengths = _family_mapping(cfg.prefix.lengths, PrefixConfig().lengths, family.prefix_lengths,
                                             "prefix.lengths", explicit)
        cfg.lora.targets = _family_mapping(cfg.lora.targets, LoraConfig().targets, family.lora_targets,
                                           "lora.targets", explicit)
    if cfg.data.region_features is not None:
        if family.name != "vinvl":
            raise RecipeError(f"data.region_features: region features are VinVL's input, but model.family is "
                              f"{family.name}; remove data.region_features")
        if not Path(cfg.data.region_features).is_dir():
            raise RecipeError(f"data.region_features: {cfg.data.region_features} is not a directory")
    if family.is_language_model:
        if cfg.data.name not in TEXT_DATA:
            raise RecipeError(f"data.name: {cfg.data.name} is image data, but model.family {family.name} is a language "
                              "model; set data.name: text with data.train_file (README 'Language models')")
        if m.path is None and m.pretrain_steps == 0:
            raise RecipeError(f"model.pretrain_steps: 0 (random weights) is for BLIP-2 geometries; the text preset "
                              f"{m.preset} is pre-trained (> 0 steps) or loaded from model.path")
    elif cfg.data.name in TEXT_DATA:
        raise RecipeError(f"data.name: text trains a language model, but the model is {family.name}; set model.path to "
                          "a language-model checkpoint (opt, llama, qwen2, t5)")
    return family


TEXT_DATA = ("text", "synthetic-text")  # what a language model trains on


def _family_mapping(value: dict, blip2: dict, family: dict, key: str, explicit: set[str] | frozenset[str]) -> dict:
    """A mapping-valued setting (prefix.lengths, lora.targets) for a family other than BLIP-2: the family's default
    where the user set nothing; else what the user set, without the BLIP-2 default entries an override kept
    (``lora.targets.language_model=[k_proj]`` alone means no Q-Former entry)."""
    if not _set_under(explicit, key) and value == blip2:
        return {k: v if isinstance(v, int) else list(v) for k, v in family.items()}
    if key in explicit:  # given whole (a recipe file's mapping replaces the default)
        return value
    towers = [k for k in blip2 if k not in family]  # BLIP-2 default entries the family does not use
    return {k: v for k, v in value.items() if k not in towers or f"{key}.{k}" in explicit}


def _positive(value: float, key: str, *, zero_ok: bool = False) -> None:
    """A finite number > 0 (>= 0 with ``zero_ok``): NaN, inf and negatives never reach the optimizer."""
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        raise RecipeError(f"{key}: must be a finite number {'>= 0' if zero_ok else '> 0'}, got {value}")


def _check_stage(stage: StageConfig, key: str) -> None:
    for name in ("lr", "batch_size", "grad_accum", "max_grad_norm"):
        _positive(getattr(stage, name), f"{key}.{name}")
    _positive(stage.weight_decay, f"{key}.weight_decay", zero_ok=True)
    if stage.steps is not None:
        if stage.steps < 1:
            raise RecipeError(f"{key}.steps: must be >= 1 (or leave it unset to train by epochs), got {stage.steps}")
    else:
        _positive(stage.epochs, f"{key}.epochs")
    if not 0.0 <= stage.warmup_ratio < 1.0:
        raise RecipeError(f"{key}.warmup_ratio: must be in [0, 1), got {stage.warmup_ratio}")


def _check_run(cfg: RunConfig) -> None:
    """Where the run writes and how it logs: a run name is one plain directory name inside output_dir."""
    name = cfg.run_name
    if name is not None and (not name or name in (".", "..") or "/" in name or "\\" in name):
        raise RecipeError(f"run_name: {name!r} is not a plain directory name (no '/', not '.' or '..'); the run lives "
                          "in output_dir/run_name")
    if not cfg.output_dir:
        raise RecipeError("output_dir: empty; name the directory that holds the runs (default: runs)")
    if cfg.model.path is not None and not cfg.model.path.strip():
        raise RecipeError("model.path: empty; give a checkpoint directory, or remove the key for the embedded default")
    for key in ("log_every", "eval.batch_size", "max_nonfinite_in_row", "data.max_text_len"):
        section, _, name = key.rpartition(".")
        value = getattr(getattr(cfg, section) if section else cfg, name)
        if value < 1:
            raise RecipeError(f"{key}: must be >= 1, got {value}")
    if cfg.model.pretrain_steps < 0:
        raise RecipeError(f"model.pretrain_steps: must be >= 0 (0: random weights), got {cfg.model.pretrain_steps}")
    if cfg.checkpoint.every_steps < 0 or cfg.checkpoint.keep_last < 0:
        raise RecipeError("checkpoint.every_steps / checkpoint.keep_last: must be >= 0")


def _set_under(explicit: set[str] | frozenset[str], section: str) -> list[str]:
    return sorted(k for k in explicit if k == section or k.startswith(section + "."))


def _drop_unused(cfg: RunConfig, explicit: set[str] | frozenset[str]) -> None:
    """A model holds only what its plan trains: no stage trains prefixes -> no prefix module at all (random
    untrained prefixes would change every attention layer of the baseline). A key the user set for a part
    the plan never uses is an error naming it, never silently ignored."""
    trained = {g for s in cfg.stages for g in s.train}
    what = f"plan {cfg.plan}" if cfg.plan else "the recipe's stages"
    for section, group, example in (("prefix", "prefix", "plan=prefix->lora"), ("lora", "lora", "plan=prefix->lora"),
                                    ("adapter", "adapter", "plan=prefix->adapter")):
        if group in trained:
            continue
        if keys := _set_under(explicit, section):
            raise RecipeError(f"{keys[0]}: set, but {what} trains no {group}; remove {section}.* from the recipe, "
                              f"or use a plan that trains it (e.g. {example})")
    if "prefix" not in trained and cfg.prefix.lengths:
        if any(n > 0 for n in cfg.prefix.lengths.values()):
            log.info("prefix.lengths ignored: %s trains no prefix, so the model gets none", what)
        cfg.prefix.lengths = {}
    if "adapter" not in trained:
        cfg.adapter = None
    if cfg.plan is None:
        if keys := _set_under(explicit, "methods"):
            raise RecipeError(f"{keys[0]}: methods only feed a named plan, and this recipe gives explicit stages; "
                              "set the value on the stage instead (stages.N.<key>)")
        return
    used = plan_methods(cfg.plan)
    for method in METHODS:
        if method not in used and (keys := _set_under(explicit, f"methods.{method}")):
            raise RecipeError(f"{keys[0]}: set, but plan {cfg.plan} takes no stage settings from methods.{method}; "
                              f"remove it (a joint stage takes the PEFT method's; this plan reads "
                              f"methods.{', methods.'.join(used)})")


def _validate_quantization(cfg: RunConfig) -> None:
    q = cfg.model.quantization
    if q == "none":
        return
    from ptscale.models.presets import uses_random_weights

    if uses_random_weights(cfg.model):
        raise RecipeError(f"model.quantization={q}: preset {cfg.model.preset} without model.path has random weights, "
                          "nothing to quantise; set model.path, or use the embedded default with pretrain_steps > 0")
    if cfg.adapter is not None and (towers := set(cfg.adapter.components) & {"vision", "language_model"}):
        raise RecipeError(f"adapter.components: {', '.join(sorted(towers))} are quantised (model.quantization={q}) "
                          "and adapters wrap full-precision Linear layers; use adapter.components: [qformer], "
                          "LoRA (which supports quantised layers), or model.quantization: none")


KARPATHY_SPLITS = ("train", "val", "test", "restval")  # the splits of dataset_coco.json / dataset_flickr30k.json
_DATA_FILES = {
    "coco": ("karpathy_json", "image_root"),
    "flickr30k": ("karpathy_json", "image_root"),
    "vqav2": ("vqa_train_questions", "vqa_train_annotations", "vqa_eval_questions", "vqa_eval_annotations",
              "image_root"),
}


def _synthetic_tasks(name: str) -> tuple[str, ...] | None:
    """The tasks of a generated data set (None for data read from files)."""
    if name == "synthetic":
        from ptscale.data.synthetic import TASKS

        return tuple(TASKS)
    if name == "synthetic-text":
        from ptscale.data.synthetic_text import TEXT_TASKS

        return tuple(TEXT_TASKS)
    return None


def _validate_data(d: DataConfig) -> None:
    if (tasks := _synthetic_tasks(d.name)) is not None:
        if d.task not in tasks:
            raise RecipeError(f"data.task: unknown {d.name} task {d.task!r}; known: {', '.join(tasks)}")
        if d.train_size <= 0 or d.eval_size <= 0:
            raise RecipeError("data.train_size / data.eval_size: must be > 0 (a generated split is never empty, "
                              "and an empty split cannot train or evaluate)")
        return
    if d.train_size < 0 or d.eval_size < 0:
        raise RecipeError("data.train_size / data.eval_size: caps must be >= 0 (0 = the whole split)")
    if d.name == "text":
        _validate_text_data(d)
        return
    if d.name in ("coco", "flickr30k"):
        for key in ("train_split", "eval_split"):
            if getattr(d, key) not in KARPATHY_SPLITS:
                raise RecipeError(f"data.{key}: {getattr(d, key)!r} is not a Karpathy split; use one of "
                                  f"{', '.join(KARPATHY_SPLITS)}")
    for key in _DATA_FILES[d.name]:
        value = getattr(d, key)
        if value is None:
            raise RecipeError(f"data.{key}: required for data.name={d.name}")
        if not Path(value).exists():
            raise RecipeError(f"data.{key}: {value} does not exist")
    if d.name == "vqav2" and d.prompt and "{}" not in d.prompt:
        raise RecipeError(f"data.prompt: a VQA prompt needs a {{}} for the question, got {d.prompt!r}")


def _validate_text_data(d: DataConfig) -> None:
    """The files exist (their contents are read, and checked, with the data: exit 3 there)."""
    if d.train_file is None:
        raise RecipeError("data.train_file: required for data.name=text (a .jsonl / .parquet / .csv file, or a "
                          "datasets save_to_disk directory)")
    for key in ("train_file", "eval_file"):
        value = getattr(d, key)
        if value is not None and not Path(value).exists():
            raise RecipeError(f"data.{key}: {value} does not exist")
    if d.eval_file is None and not Path(d.train_file).is_dir():
        raise RecipeError("data.eval_file: required when data.train_file is a file (a saved dataset directory "
                          "gives its split data.eval_split instead)")
    columns = {k: getattr(d, k) for k in ("prompt_column", "completion_column", "text_column")}
    if empty := [k for k, v in columns.items() if not v]:
        raise RecipeError(f"data.{empty[0]}: empty; name a column of the data files")


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def dump_recipe(cfg: RunConfig) -> str:
    """The fully resolved recipe as YAML, loadable as is (``load_recipe``). A named plan is kept as the plan
    (its stages are derived from it and ``methods`` on load), explicit stages as the stages."""
    raw = to_dict(cfg)
    head = RESOLVED_HEADER
    if cfg.plan is not None:
        raw["stages"] = []
        head += f"# plan {cfg.plan} expands into: " + " -> ".join("+".join(s.train) for s in cfg.stages) + "\n"
    return head + yaml.safe_dump(raw, sort_keys=False)
