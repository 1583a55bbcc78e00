"""Backbones: a local HF BLIP-2 checkpoint (``model.path``) or the embedded default.

The default is a tiny BLIP-2 pre-trained once on the broad synthetic distribution and cached like a
download (``$PTSCALE_CACHE`` or ``~/.cache/ptscale``): an ordinary HF checkpoint directory, so both
cases load through the same ``from_pretrained`` path.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoImageProcessor, AutoTokenizer, Blip2ForConditionalGeneration

from ptscale.config import ModelConfig

log = logging.getLogger(__name__)

PRETRAIN_VERSION = 2  # bump when the pre-training recipe changes: it re-keys the cache
MARKER = "ptscale_backbone.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Backbone:
    model: Blip2ForConditionalGeneration
    tokenizer: object
    image_processor: object
    path: Path
    family: str = "blip2"  # ptscale.models.families

    @property
    def kind(self) -> str:
        return family_kind(self.family)

    @property
    def config(self):
        return self.model.config

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    @property
    def num_query_tokens(self) -> int:
        return self.model.config.num_query_tokens


def family_kind(family: str) -> str:
    """vision-language, causal-lm or seq2seq-lm: what a family's data and evaluation are."""
    from ptscale.models.families import FAMILIES

    return FAMILIES[family].kind


def cache_root() -> Path:
    return Path(os.environ.get("PTSCALE_CACHE", Path.home() / ".cache" / "ptscale"))


def default_backbone_dir(cfg: ModelConfig) -> Path:
    from ptscale.data.synthetic import DATA_VERSION
    from ptscale.models.presets import preset_family, preset_spec

    # Everything the cached weights depend on: the geometry, the steps, the pre-training recipe and, for the
    # BLIP-2 and BLIP defaults, the synthetic world they are pre-trained on
    spec = {"preset": preset_spec(cfg.preset), "steps": cfg.pretrain_steps, "v": PRETRAIN_VERSION}
    if preset_family(cfg.preset) in ("blip2", "blip", "vinvl", "ofa"):
        spec["data"] = DATA_VERSION
    if preset_family(cfg.preset) == "vinvl":  # and on how its region features are made from the scenes
        from ptscale.data.region_features import REGIONS_VERSION

        spec["regions"] = REGIONS_VERSION
    key = json.dumps(spec, sort_keys=True)
    return cache_root() / "backbones" / f"{cfg.preset}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


WEIGHT_SUFFIXES = (".safetensors", ".bin")


def backbone_digest(path: str | Path) -> str:
    """Hex sha256 of a backbone directory's weight files (``*.safetensors`` / ``*.bin`` at its top level), their
    bytes hashed one after another in sorted name order. Identifies the exact base an export or a resume needs
    (config and tokenizer files are not part of it). A single-file checkpoint's digest is the plain sha256 of
    ``model.safetensors``: the value the default backbone's :data:`MARKER` records."""
    path = Path(path)
    found = path.iterdir() if path.is_dir() else ()
    files = sorted(f for f in found if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise FileNotFoundError(f"{path}: no weight files (*.safetensors, *.bin) to digest")
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def is_complete(directory: Path) -> bool:
    """True when the marker exists and the weights match its checksum (a torn or edited cache is not)."""
    marker = directory / MARKER
    weights = directory / "model.safetensors"
    if not marker.is_file() or not weights.is_file():
        return False
    try:
        return json.loads(marker.read_text())["sha256"] == _sha256(weights)
    except (ValueError, KeyError):
        return False


@contextmanager
def _build_lock(directory: Path) -> Iterator[None]:
    """One builder per cache entry on this machine: a run started while another builds the same backbone waits
    for it and then reuses its result, instead of building a second copy and replacing the directory under the
    first run's feet."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f".{directory.name}.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is building the cached backbone %s: waiting for it", directory)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_default_backbone(cfg: ModelConfig, *, rank: int = 0, barrier=None) -> Path:
    """Return the cached pre-trained default backbone, building it (rank 0) when missing or corrupt."""
    directory = default_backbone_dir(cfg)
    if rank == 0 and not is_complete(directory):
        with _build_lock(directory):
            if not is_complete(directory):  # else another process built it while this one waited
                if directory.exists():
                    log.warning("cached backbone %s is incomplete or corrupt: rebuilding it", directory)
                build_default_backbone(cfg, directory)
    if barrier is not None:
        barrier()
    if not is_complete(directory):
        raise RuntimeError(f"default backbone at {directory} is missing after rank 0 built it; "
                           "is the cache directory shared by all ranks? Set PTSCALE_CACHE to a shared path.")
    return directory


def build_default_backbone(cfg: ModelConfig, directory: Path) -> None:
    from ptscale.models.presets import BLIP_PRESETS, OFA_PRESETS, VINVL_PRESETS

    if cfg.preset in BLIP_PRESETS:
        from ptscale.models.blip import pretrain_tiny_blip as pretrain
    elif cfg.preset in VINVL_PRESETS:
        from ptscale.models.vinvl import pretrain_tiny_vinvl as pretrain
    elif cfg.preset in OFA_PRESETS:
        from ptscale.models.ofa import pretrain_tiny_ofa as pretrain
    else:
        from ptscale.models.pretrain import pretrain_default as pretrain

    t0 = time.time()
    log.info("pre-training the default %s backbone (%d steps, once; cached at %s)",
                cfg.preset, cfg.pretrain_steps, directory)
    model, tokenizer, image_processor = pretrain(cfg.preset, cfg.pretrain_steps)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if image_processor is not None:  # a language model has none
            image_processor.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({"preset": cfg.preset, "steps": cfg.pretrain_steps,
                                              "sha256": _sha256(tmp / "model.safetensors")}))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)  # atomic: readers see the old directory or the complete new one
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("default backbone ready in %.0f s", time.time() - t0)


def quantization_config(quantization: str, dtype: str):
    """bitsandbytes settings for ``model.quantization``; None for "none".

    4-bit weights are packed into the model dtype (``bnb_4bit_quant_storage``): ZeRO-3 gathers a module's
    parameters in one flat buffer of a single dtype, so packed uint8 beside bf16/fp32 parameters would not
    shard (transformers' and peft's documented QLoRA + ZeRO-3 setting).
    """
    if quantization == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ImportError(f"model.quantization={quantization} needs bitsandbytes: pip install -e '.[quant]'") from e
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization, bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=DTYPES[dtype], bnb_4bit_quant_storage=DTYPES[dtype])


def _keep_cpu_4bit_layout(model: torch.nn.Module) -> None:
    """bitsandbytes repacks a 4-bit weight in place on its first CPU eval forward where the CPU has AVX512-BF16
    (and flags its quant_state). Under ZeRO-3 that repack lands in a temporary gathered copy while the flag
    stays, so every later gather would be read in the wrong layout: keep the portable layout."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def model_class(family: str, config=None):
    """The transformers class a family's checkpoints load as (ptscale.models.families); BLIP's depends on the
    checkpoint's architecture (``config``: captioning or VQA)."""
    from ptscale.models.families import FAMILIES

    if family == "blip":
        from ptscale.models.blip import blip_task
        from ptscale.models.blip import model_class as blip_class

        return blip_class(blip_task(config))
    if family == "vinvl":
        from ptscale.models.vinvl import VinVLForCaptioning

        return VinVLForCaptioning
    if family == "ofa":
        from ptscale.models.ofa import OFAModel

        return OFAModel
    kind = FAMILIES[family].kind
    if kind == "vision-language":
        return Blip2ForConditionalGeneration
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForCausalLM if kind == "causal-lm" else AutoModelForSeq2SeqLM


def new_model(family: str, config):
    """A family's model from its config, with fresh weights (on the current default device, e.g. meta)."""
    cls = model_class(family, config)
    return cls(config) if family in ("blip2", "blip", "vinvl", "ofa") else cls.from_config(config)


def load_backbone(path: str | Path, dtype: str = "fp32", quantization: str = "none",
                  family: str | None = None) -> Backbone:
    """``family``: the recipe's (``model.family``); None: detected from the checkpoint's config.json."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model.path {path}: no config.json there; point it at a local HF checkpoint "
                                "directory (e.g. a copy of Salesforce/blip2-opt-2.7b)")
    quant = quantization_config(quantization, dtype)
    from transformers import AutoConfig

    from ptscale.models.families import family_of_checkpoint

    family = family or family_of_checkpoint(path) or "blip2"
    if family == "vinvl":
        return _load_vinvl(path, dtype, quantization)
    if family == "ofa":
        return _load_ofa(path, dtype, quantization)

    cls = model_class(family, AutoConfig.from_pretrained(path) if family == "blip" else None)
    if quant is None:
        model = cls.from_pretrained(path, dtype=DTYPES[dtype])
    else:  # bitsandbytes quantises while loading, on the device this rank computes on
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
        model = cls.from_pretrained(path, dtype=DTYPES[dtype], quantization_config=quant, device_map={"": device})
        if device == "cpu":
            _keep_cpu_4bit_layout(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if family_kind(family) != "vision-language":  # a language model: no images
        return Backbone(model, tokenizer, None, path, family)
    image_processor = AutoImageProcessor.from_pretrained(path)
    if family == "blip2" and getattr(model.config, "image_token_id", None) is None:
        raise ValueError(f"{path}: config has no image_token_index; re-save it with a transformers 5 processor")
    return Backbone(model, tokenizer, image_processor, path, family)


def _load_vinvl(path: Path, dtype: str, quantization: str) -> Backbone:
    from ptscale.models.vinvl import load_tokenizer, load_vinvl, with_token_ids

    if quantization != "none":
        raise ValueError(f"model.quantization={quantization}: not offered for VinVL")
    tokenizer = load_tokenizer(path)
    model = load_vinvl(path, DTYPES[dtype])
    with_token_ids(model.config, tokenizer)
    return Backbone(model, tokenizer, None, path, "vinvl")


def _load_ofa(path: Path, dtype: str, quantization: str) -> Backbone:
    from ptscale.models.ofa import load_image_processor, load_ofa, load_tokenizer

    if quantization != "none":
        raise ValueError(f"model.quantization={quantization}: not offered for OFA")
    model = load_ofa(path, DTYPES[dtype])
    tokenizer = load_tokenizer(path, model.config)
    return Backbone(model, tokenizer, load_image_processor(path, model.config), path, "ofa")


# --- Where the backbone comes from: checked, identified and tokenised before any model is built --------------

@dataclass
class BackboneSource:
    """What a run's backbone is, known before its weights are loaded: the data and the prefix/LoRA targets are
    checked against it, and its identity is stored with the run (a resume or an evaluation on other weights
    is refused)."""

    path: Path | None  # None: random weights of a geometry preset
    config: object  # Blip2Config
    tokenizer: object
    image_processor: object
    identity: dict[str, str]  # {"source": ..., "digest": ...}
    family: str = "blip2"  # ptscale.models.families

    @property
    def kind(self) -> str:
        return family_kind(self.family)

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    @property
    def num_query_tokens(self) -> int:
        return self.config.num_query_tokens


def _weight_files(path: Path) -> list[Path]:
    return sorted(f for f in path.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))


def check_checkpoint_dir(path: Path) -> None:
    """``model.path`` before anything is built: a checkpoint directory of a supported type with readable weights."""
    from ptscale.errors import RecipeError

    if not path.is_dir():
        raise RecipeError(f"model.path {path}: no such directory; point it at a local HF BLIP-2 checkpoint "
                          "directory (e.g. a copy of Salesforce/blip2-opt-2.7b)")
    config = path / "config.json"
    if not config.is_file():
        raise RecipeError(f"model.path {path}: no config.json there; point it at a local HF BLIP-2 checkpoint "
                          "directory (e.g. a copy of Salesforce/blip2-opt-2.7b)")
    from ptscale.models.families import family_of_checkpoint

    family_of_checkpoint(path)  # a model type ptscale does not train: refused, naming the supported ones
    weights = _weight_files(path)
    if not weights:
        raise RecipeError(f"model.path {path}: no weights (model.safetensors or pytorch_model.bin); the directory "
                          "holds a config only")
    for f in weights:
        if f.suffix == ".safetensors":
            _check_safetensors(f)
        else:
            _check_torch_zip(f)


def _check_torch_zip(f: Path) -> None:
    """A ``pytorch_model.bin`` in torch.save's zip format cut short has no zip directory at its end: one line here
    instead of an unpickling traceback while loading (opening the directory reads only the file's end). A file in
    the legacy (pre-1.6) format is left to torch.load."""
    import zipfile

    from ptscale.errors import DataError

    with open(f, "rb") as fh:
        if fh.read(4) != b"PK\x03\x04":
            return
    try:
        zipfile.ZipFile(f).close()
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{f}: truncated or corrupt weights file ({e}); copy the checkpoint again") from None


def _check_safetensors(f: Path) -> None:
    """A truncated file fails here, in one line, instead of deep inside from_pretrained."""
    from ptscale.errors import DataError

    size = f.stat().st_size
    try:
        with open(f, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError("header longer than the file")
            header = json.loads(fh.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + header_len + end > size:
            raise ValueError(f"{size} bytes, the header promises {8 + header_len + end}")
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{f}: truncated or corrupt safetensors file ({e}); copy the checkpoint again") from None


def resolve_source(cfg: ModelConfig, *, rank: int = 0, barrier=None, build: bool = True) -> BackboneSource:
    """The backbone a recipe names (pre-training the embedded default once if it is not cached), with its
    tokenizer and image processor, without loading its weights. ``build=False`` (a dry run): an embedded default
    that is not cached yet is described by its preset's geometry instead of being pre-trained."""
    from ptscale.models.presets import BLIP_PRESETS, OFA_PRESETS, VINVL_PRESETS, uses_random_weights

    if cfg.path is None and cfg.preset in (*BLIP_PRESETS, *VINVL_PRESETS, *OFA_PRESETS):
        _check_blip_preset(cfg)
    if not build and not cfg.path and not uses_random_weights(cfg) and not is_complete(default_backbone_dir(cfg)):
        if cfg.preset in OFA_PRESETS:
            from ptscale.models.ofa import image_processor, new_tiny_ofa

            with torch.device("meta"):
                model, tokenizer = new_tiny_ofa(cfg.preset)
            return BackboneSource(None, model.config, tokenizer, image_processor(model.config.image_resolution), {
                "source": f"embedded default {cfg.preset} (not pre-trained yet)", "digest": ""}, family="ofa")
        if cfg.preset in VINVL_PRESETS:
            from ptscale.models.vinvl import new_tiny_vinvl

            with torch.device("meta"):
                model, tokenizer = new_tiny_vinvl(cfg.preset)
            return BackboneSource(None, model.config, tokenizer, None, {
                "source": f"embedded default {cfg.preset} (not pre-trained yet)", "digest": ""}, family="vinvl")
        if cfg.preset in BLIP_PRESETS:
            model, tokenizer, processor = _untrained_blip(cfg.preset)
            return BackboneSource(None, model.config, tokenizer, processor, {
                "source": f"embedded default {cfg.preset} (not pre-trained yet)", "digest": ""}, family="blip")
        from ptscale.models.presets import TEXT_PRESETS

        if cfg.preset in TEXT_PRESETS:
            from ptscale.models.pretrain_text import new_text_model

            with torch.device("meta"):
                model, tokenizer = new_text_model(cfg.preset)
            return BackboneSource(None, model.config, tokenizer, None, {
                "source": f"embedded default {cfg.preset} (not pre-trained yet)", "digest": ""}, family=cfg.family)
        from ptscale.models.pretrain import new_tiny_model

        with torch.device("meta"):
            model, tokenizer = new_tiny_model(cfg.preset)
        from ptscale.models.pretrain import tiny_processor

        return BackboneSource(None, model.config, tokenizer, tiny_processor(),
                              {"source": f"embedded default {cfg.preset} (not pre-trained yet)", "digest": ""})
    if uses_random_weights(cfg):
        from ptscale.models.presets import preset_parts

        config, tokenizer, processor = preset_parts(cfg.preset)
        return BackboneSource(None, config, tokenizer, processor,
                              {"source": f"random weights of preset {cfg.preset}", "digest": f"random:{cfg.preset}"})
    path = Path(cfg.path) if cfg.path else ensure_default_backbone(cfg, rank=rank, barrier=barrier)
    check_checkpoint_dir(path)
    from transformers import AutoConfig

    from ptscale.errors import RecipeError
    from ptscale.models.families import family_of_checkpoint

    family = cfg.family or family_of_checkpoint(path) or "blip2"  # set by the recipe's validation; else detected
    if family == "vinvl":
        return _vinvl_source(cfg, path)
    if family == "ofa":
        return _ofa_source(cfg, path)
    config = AutoConfig.from_pretrained(path)
    if family_kind(family) != "vision-language":
        return _language_model_source(cfg, path, config, family)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        image_processor = AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise RecipeError(f"model.path {path}: its tokenizer or image processor cannot be loaded "
                          f"({str(e).splitlines()[0]}); save them beside the weights") from None
    if family == "blip":
        _check_blip_checkpoint(path, config)
    elif getattr(config, "image_token_id", None) is None:
        raise RecipeError(f"model.path {path}: config has no image_token_index; re-save it with a transformers 5 "
                          "processor")
    source = str(path) if cfg.path else f"embedded default {path.name}"
    return BackboneSource(path, config, tokenizer, image_processor,
                          {"source": source, "path": str(path), "digest": backbone_digest(path)}, family=family)


def _language_model_source(cfg: ModelConfig, path: Path, config, family: str) -> BackboneSource:
    from ptscale.errors import RecipeError

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise RecipeError(f"model.path {path}: its tokenizer cannot be loaded ({str(e).splitlines()[0]}); save it "
                          "beside the weights (tokenizer.save_pretrained)") from None
    if tokenizer.eos_token_id is None:
        raise RecipeError(f"model.path {path}: the tokenizer has no EOS token; a completion needs one to end")
    source = str(path) if cfg.path else f"embedded default {path.name}"
    return BackboneSource(path, config, tokenizer, None, {"source": source, "path": str(path),
                                                          "digest": backbone_digest(path)}, family=family)


def _vinvl_source(cfg: ModelConfig, path: Path) -> BackboneSource:
    """A VinVL directory: its config (ours, or a released Oscar/VinVL one) and BERT tokenizer; no image processor
    (VinVL reads region features)."""
    from ptscale.errors import RecipeError
    from ptscale.models.vinvl import load_tokenizer, read_config, with_token_ids

    if cfg.quantization != "none":
        raise RecipeError(f"model.quantization={cfg.quantization}: not offered for VinVL (a BERT-base or smaller); "
                          "set model.quantization: none")
    try:
        tokenizer = load_tokenizer(path)
    except (OSError, ValueError) as e:
        raise RecipeError(f"model.path {path}: its tokenizer cannot be loaded ({str(e).splitlines()[0]}); save it "
                          "beside the weights (VinVL's vocab.txt)") from None
    missing = [t for t in ("cls_token", "sep_token", "mask_token", "pad_token") if getattr(tokenizer, t) is None]
    if missing:
        raise RecipeError(f"model.path {path}: the tokenizer has no {', '.join(missing)}; VinVL needs BERT's [CLS], "
                          "[SEP], [MASK] and [PAD]")
    config = with_token_ids(read_config(path), tokenizer)
    source = str(path) if cfg.path else f"embedded default {path.name}"
    return BackboneSource(path, config, tokenizer, None, {"source": source, "path": str(path),
                                                          "digest": backbone_digest(path)}, family="vinvl")


def _ofa_source(cfg: ModelConfig, path: Path) -> BackboneSource:
    """An OFA directory: its config, BPE tokenizer with codes and bins, and image transform."""
    from ptscale.errors import RecipeError
    from ptscale.models.ofa import load_image_processor, load_tokenizer, read_config

    if cfg.quantization != "none":
        raise RecipeError(f"model.quantization={cfg.quantization}: not offered for OFA; set model.quantization: none")
    try:
        config = read_config(path)
        config.check_supported()
        tokenizer = load_tokenizer(path, config)
    except (OSError, ValueError, TypeError) as e:
        raise RecipeError(f"model.path {path}: {str(e).splitlines()[0]}") from None
    source = str(path) if cfg.path else f"embedded default {path.name}"
    return BackboneSource(path, config, tokenizer, load_image_processor(path, config),
                          {"source": source, "path": str(path), "digest": backbone_digest(path)}, family="ofa")


def _untrained_blip(preset: str) -> tuple[object, object, object]:
    """The tiny BLIP default on the meta device (its config), tokenizer and image processor: a dry run's
    description of a default that is not pre-trained yet."""
    from ptscale.models.blip import new_tiny_blip, tiny_processor

    with torch.device("meta"):
        model, tokenizer = new_tiny_blip(preset)
    return model, tokenizer, tiny_processor(preset)


def _check_blip_preset(cfg: ModelConfig) -> None:
    """A BLIP, VinVL or OFA preset is the embedded default only: pre-trained (no random-weights build),
    unquantised."""
    from ptscale.errors import RecipeError
    from ptscale.models.presets import OFA_PRESETS, VINVL_PRESETS

    name = "VinVL" if cfg.preset in VINVL_PRESETS else "OFA" if cfg.preset in OFA_PRESETS else "BLIP"
    if cfg.pretrain_steps == 0:
        raise RecipeError(f"model.pretrain_steps: 0 (random weights) is not offered for the {name} preset "
                          f"{cfg.preset}; use pretrain_steps > 0, or model.path for a {name} checkpoint")
    if cfg.quantization != "none":
        raise RecipeError(f"model.quantization={cfg.quantization}: not offered for the {name} preset {cfg.preset} (a "
                          "small model); set model.quantization: none")


def _check_blip_checkpoint(path: Path, config) -> None:
    """A BLIP checkpoint ptscale trains: captioning or VQA (one line for any other architecture)."""
    from ptscale.errors import RecipeError
    from ptscale.models.blip import blip_task

    try:
        blip_task(config)
    except ValueError as e:
        raise RecipeError(f"model.path {path}: {e}") from None
