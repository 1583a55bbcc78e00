"""OFA (Wang et al., 2022), the PT-PEFT paper's fourth model, written for transformers 5.x.

transformers has no OFA, and the ports that exist (OFA-Sys' transformers branch, ModelScope) do not import
under transformers 5; this is a clean implementation of the same computation, with the released checkpoints'
parameter names (OFA-Sys HF-format folders: ``config.json``, ``pytorch_model.bin``, ``vocab.json``,
``merges.txt``), so ``model.path`` loads them.

The model, top to bottom:

* **Encoder input.** A ResNet (OFA's: bottleneck blocks, three stages, 1024 channels at stride 16) embeds the
  image; ``image_proj`` maps each of its h x w cells to one token, plus a type embedding (1) and
  ``patch_layernorm_embedding``. Text tokens get their word embedding, a type embedding (0) and
  ``layernorm_embedding``. Image tokens come first. Positions enter the token embeddings only with
  ``entangle_position_embedding`` (off in the released models).
* **Attention.** Every self-attention adds a position bias to its scores: an absolute term
  ``pos_q(pos) . pos_k(pos)`` shared by all layers (layer-normed position embeddings, scaled by
  ``(d / heads * attn_scale_factor) ** -0.5``), plus per-layer relative-position tables: 1-D buckets (linear to
  ``token_bucket_size / 2``, then logarithmic to 1024) over text, 2-D (row, column) offsets over the image
  grid. Queries are scaled by ``(head_dim * attn_scale_factor) ** -0.5`` (factor 2); NormFormer's per-head
  scale ``c_attn`` multiplies each head's output, and NormFormer's extra layer norms follow the attention and the
  FFN's activation.
* **Decoder.** Word embedding (positions enter through the attention biases, as in the encoder), causal
  self-attention with the absolute (``self_pos_*``) and 1-D relative bias, cross-attention with the absolute
  bias between decoder and encoder positions (``cross_pos_*``), output projection tied to the embeddings.
  Positions come from the self-attention cache's length: the cache holds sequence keys only (a prefix never
  enters it, ``ptscale.prefix.wrapper``).
* **Vocabulary.** BART's byte-level BPE, then ``<code_0..8191>`` (image codes), then ``<bin_0..999>``
  (location bins): 59,457 tokens for the released models.

Generation is transformers' own (``GenerationMixin``: greedy and beam search) over an ``EncoderDecoderCache``.
What is not ported: image-code generation (the decoder's ``code_masks`` path: text-to-image), a second image
(``patch_images_2``), patch sampling, layer drop and the ResNet's drop path (neither is used by OFA's captioning
and VQA fine-tuning; a config asking for them is refused). Drop path in the encoder and decoder layers is.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ModelOutput, Seq2SeqLMOutput

from ptscale.checkpoint import load_exactly, read_weights

log = logging.getLogger(__name__)

MODEL_TYPE = "ofa"
NUM_CODES, NUM_BINS = 8192, 1000  # the released vocabulary: BART BPE (50,265) + codes + bins = 59,457
# OFA's ResNet depths (blocks per stage; three stages, the fourth is never built). "resnet18"/"resnet34" use
# bottleneck blocks in OFA too, so the names only set depths.
RESNET_LAYERS = {"resnet18": (2, 2, 2), "resnet34": (3, 4, 6), "resnet50": (3, 4, 6), "resnet101": (3, 4, 23),
                 "resnet152": (3, 8, 36)}
TOKEN_MAX_DISTANCE = 1024  # the relative-position buckets grow logarithmically up to this distance (OFA's constant)


# --- configuration ----------------------------------------------------------------------------------------------
class OFAConfig(PretrainedConfig):
    """The released ``config.json`` keys (OFA-Sys), plus three of ptscale's, with OFA-base's vocabulary as
    defaults: ``resnet_layers`` (blocks per ResNet stage; overrides ``resnet_type``, for tiny models),
    ``num_codes`` / ``num_bins`` (the added tokens after the BPE vocabulary) and ``image_resolution`` (the side
    images are resized to; 480 for the released captioning and VQA fine-tuning)."""

    model_type = MODEL_TYPE
    attribute_map = {"num_attention_heads": "encoder_attention_heads", "hidden_size": "d_model"}

    def __init__(self, vocab_size=59457, max_position_embeddings=1024, encoder_layers=4, encoder_ffn_dim=2048,
                 encoder_attention_heads=8, decoder_layers=4, decoder_ffn_dim=2048, decoder_attention_heads=8,
                 encoder_layerdrop=0.0, decoder_layerdrop=0.0, use_cache=True, is_encoder_decoder=True,
                 activation_function="gelu", d_model=512, dropout=0.1, attention_dropout=0.0, activation_dropout=0.0,
                 init_std=0.02, scale_embedding=False, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                 encoder_normalize_before=True, decoder_normalize_before=True, normformer=True,
                 encoder_drop_path_rate=0.0, decoder_drop_path_rate=0.0, layernorm_embedding=True,
                 patch_layernorm_embedding=True, resnet_type="resnet101", resnet_drop_path_rate=0.0,
                 token_bucket_size=256, image_bucket_size=42, add_type_embedding=True,
                 share_decoder_input_output_embed=True, attn_scale_factor=2.0, code_layernorm_embedding=True,
                 code_image_size=128, entangle_position_embedding=False, resnet_layers=None, num_codes=NUM_CODES,
                 num_bins=NUM_BINS, image_resolution=480, **kwargs):
        self.vocab_size, self.max_position_embeddings, self.d_model = vocab_size, max_position_embeddings, d_model
        self.encoder_layers, self.encoder_ffn_dim, self.encoder_attention_heads = (
            encoder_layers, encoder_ffn_dim, encoder_attention_heads)
        self.decoder_layers, self.decoder_ffn_dim, self.decoder_attention_heads = (
            decoder_layers, decoder_ffn_dim, decoder_attention_heads)
        self.encoder_layerdrop, self.decoder_layerdrop = encoder_layerdrop, decoder_layerdrop
        self.use_cache, self.activation_function, self.init_std = use_cache, activation_function, init_std
        self.dropout, self.attention_dropout, self.activation_dropout = dropout, attention_dropout, activation_dropout
        self.scale_embedding, self.normformer = scale_embedding, normformer
        self.encoder_normalize_before, self.decoder_normalize_before = (
            encoder_normalize_before, decoder_normalize_before)
        self.encoder_drop_path_rate, self.decoder_drop_path_rate = encoder_drop_path_rate, decoder_drop_path_rate
        self.resnet_drop_path_rate = resnet_drop_path_rate
        self.layernorm_embedding, self.patch_layernorm_embedding = layernorm_embedding, patch_layernorm_embedding
        self.code_layernorm_embedding, self.code_image_size = code_layernorm_embedding, code_image_size
        self.resnet_type, self.resnet_layers = resnet_type, list(resnet_layers) if resnet_layers else None
        self.token_bucket_size, self.image_bucket_size = token_bucket_size, image_bucket_size
        self.add_type_embedding, self.attn_scale_factor = add_type_embedding, attn_scale_factor
        self.share_decoder_input_output_embed = share_decoder_input_output_embed
        self.entangle_position_embedding = entangle_position_embedding
        self.num_codes, self.num_bins, self.image_resolution = num_codes, num_bins, image_resolution
        self.num_hidden_layers = encoder_layers
        kwargs.pop("decoder_start_token_id", None)  # OFA starts decoding from BOS
        kwargs.setdefault("tie_word_embeddings", share_decoder_input_output_embed)  # what transformers ties on save
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         decoder_start_token_id=bos_token_id, is_encoder_decoder=is_encoder_decoder, **kwargs)

    def stages(self) -> tuple[int, ...]:
        if self.resnet_layers:
            return tuple(self.resnet_layers)
        if self.resnet_type not in RESNET_LAYERS:
            raise ValueError(f"OFA config: resnet_type {self.resnet_type!r}; OFA has {', '.join(RESNET_LAYERS)}")
        return RESNET_LAYERS[self.resnet_type]

    def check_supported(self) -> None:
        """What this port does not compute is refused, not ignored."""
        unsupported = {k: getattr(self, k) for k in ("encoder_layerdrop", "decoder_layerdrop", "resnet_drop_path_rate")
                       if getattr(self, k)}
        if self.d_model % self.encoder_attention_heads or self.d_model % self.decoder_attention_heads:
            raise ValueError(f"OFA config: d_model {self.d_model} is not divisible by the attention heads")
        cells = -(-self.image_resolution // 16)  # the ResNet's stride
        if cells > self.image_bucket_size:
            raise ValueError(f"OFA config: image_resolution {self.image_resolution} px gives {cells} x {cells} image "
                             f"cells, more than image_bucket_size {self.image_bucket_size}; set image_resolution "
                             f"<= {16 * self.image_bucket_size} in config.json (a released config names none: 480)")
        if unsupported:
            raise ValueError(f"OFA config: {unsupported} is not supported by ptscale's OFA (layer drop would have the "
                             "ranks of a ZeRO-3 run skip different layers; OFA's captioning and VQA fine-tuning use "
                             "neither); set them to 0")


# --- the image embedding: OFA's ResNet ----------------------------------------------------------------------------
class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        width = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, width, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.downsample = None
        if stride != 1 or inplanes != width:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, width, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class OFAResNet(nn.Module):
    """Stem (7x7 conv, stride 2, max-pool) and three bottleneck stages (64, 128, 256 planes; strides 1, 2, 2):
    1024 channels at 1/16 of the image side.

    BatchNorm trains (batch statistics, running statistics updated) only while the tower's own weights train, as in
    OFA's captioning and VQA fine-tuning (no ``--freeze-resnet``); a stage that freezes the tower (every prefix,
    LoRA and adapter stage) leaves all of it, statistics included, as it was: there it uses the running
    statistics. Decided at ``train()``, which the training loop calls after setting what trains."""

    def __init__(self, layers: tuple[int, ...]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        for i, (planes, blocks, stride) in enumerate(zip((64, 128, 256), layers, (1, 2, 2), strict=True)):
            stage = [Bottleneck(inplanes, planes, stride)] + [Bottleneck(planes * 4, planes) for _ in range(blocks - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            inplanes = planes * 4

    def train(self, mode: bool = True) -> OFAResNet:
        super().train(mode)
        if not any(p.requires_grad for p in self.parameters()):
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))


# --- position buckets ---------------------------------------------------------------------------------------------
def token_buckets(query_pos: torch.Tensor, key_pos: torch.Tensor, bucket_size: int) -> torch.Tensor:
    """OFA's 1-D relative-position bucket of every (query, key) pair: the offset itself within
    ``bucket_size // 2``, logarithmic beyond (reaching the last bucket at distance 1024); shifted to be >= 0."""
    rel = query_pos[:, None] - key_pos[None, :]
    mid = bucket_size // 2
    near = (rel < mid) & (rel > -mid)
    dist = torch.where(near, torch.full_like(rel, mid - 1), rel.abs())  # mid - 1 keeps log() finite; unused there
    log_pos = torch.ceil(torch.log(dist / mid) / math.log((TOKEN_MAX_DISTANCE - 1) / mid) * (mid - 1)) + mid
    bucket = torch.where(dist <= mid, rel, log_pos.long() * torch.sign(rel))
    return bucket + bucket_size - 1


def image_buckets(h: int, w: int, bucket_size: int, device: torch.device) -> torch.Tensor:
    """OFA's 2-D relative-position bucket between the cells of an h x w grid (row-major): (row offset, column
    offset), each shifted to [0, 2 * bucket_size - 1)."""
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    span = 2 * bucket_size - 1
    return (rows[:, None] - rows[None, :] + bucket_size - 1) * span + (cols[:, None] - cols[None, :] + bucket_size - 1)


def image_position_ids(h: int, w: int, bucket_size: int, device: torch.device) -> torch.Tensor:
    """Each grid cell's row-major index in the ``bucket_size`` x ``bucket_size`` table, + 1 (0 is reserved)."""
    rows, cols = torch.arange(h, device=device)[:, None], torch.arange(w, device=device)[None, :]
    return (rows * bucket_size + cols + 1).view(-1)


def additive_mask(blocked: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean "may not attend" mask as scores to add: the dtype's minimum where blocked, 0 elsewhere."""
    return torch.zeros(blocked.shape, dtype=dtype, device=blocked.device).masked_fill(blocked, torch.finfo(dtype).min)


# --- attention and layers ----------------------------------------------------------------------------------------
class OFAAttention(nn.Module):
    """Multi-head attention with OFA's query scaling ``(head_dim * 2) ** -0.5``, a position bias added to the
    scores, and NormFormer's learned per-head output scale ``c_attn``.

    ``attention_mask`` and ``attn_bias`` are both added to the scores (shapes broadcast to (B, H, Lq, Lk)).
    The cache is transformers' ``EncoderDecoderCache``: self-attention appends this call's keys, cross-attention
    computes the encoder's keys once."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float, layer_idx: int, scale_factor: float = 2.0):
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.layer_idx = layer_idx
        self.scaling = (self.head_dim * scale_factor) ** -0.5
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.attn_dropout = nn.Dropout(dropout)
        self.c_attn = nn.Parameter(torch.ones(num_heads))

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:2], self.num_heads, self.head_dim).transpose(1, 2)

    def project(self, hidden_states: torch.Tensor, key_value_states: torch.Tensor | None,
                past_key_values: EncoderDecoderCache | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as (B, H, L, D); keys and values through the cache."""
        query = self.heads(self.q_proj(hidden_states))
        if key_value_states is None:  # self-attention: this call's keys join the cached ones
            key, value = self.heads(self.k_proj(hidden_states)), self.heads(self.v_proj(hidden_states))
            if past_key_values is not None:
                key, value = past_key_values.self_attention_cache.update(key, value, self.layer_idx)
            return query, key, value
        cache = past_key_values
        if cache is not None and cache.is_updated.get(self.layer_idx):
            layer = cache.cross_attention_cache.layers[self.layer_idx]
            return query, layer.keys, layer.values
        key, value = self.heads(self.k_proj(key_value_states)), self.heads(self.v_proj(key_value_states))
        if cache is not None:
            key, value = cache.cross_attention_cache.update(key, value, self.layer_idx)
            cache.is_updated[self.layer_idx] = True
        return query, key, value

    def finish(self, out: torch.Tensor) -> torch.Tensor:
        """(B, L, H, D) attention output -> per-head scale -> output projection."""
        out = out * self.c_attn.to(out.dtype)[:, None]
        return self.out_proj(out.reshape(*out.shape[:2], self.embed_dim))

    def forward(self, hidden_states: torch.Tensor, key_value_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, attn_bias: torch.Tensor | None = None,
                past_key_values: EncoderDecoderCache | None = None) -> tuple[torch.Tensor, None]:
        query, key, value = self.project(hidden_states, key_value_states, past_key_values)
        scores = (query * self.scaling) @ key.transpose(-1, -2)
        if attn_bias is not None:
            scores = scores + attn_bias
        if attention_mask is not None:
            scores = scores + attention_mask
        # in at least fp32, as fairseq's OFA does (fp16 / bf16 scores)
        probs = self.attn_dropout(scores.softmax(-1, dtype=torch.promote_types(scores.dtype, torch.float32))
                                  .to(scores.dtype))
        return self.finish((probs @ value).transpose(1, 2)), None


def _norm(dim: int, on: bool) -> nn.LayerNorm | None:
    return nn.LayerNorm(dim) if on else None


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: a residual branch dropped for a whole sample with probability ``p`` (training only)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - p)
    return x * keep / (1 - p)


def _drop_rate(total: float, layers: int, layer_idx: int) -> float:
    """OFA's per-layer drop-path rate: 0 for the first layer rising linearly to ``total`` for the last."""
    return total * layer_idx / max(1, layers - 1)


class OFAEncoderLayer(GradientCheckpointingLayer):
    """Pre-norm self-attention and FFN with NormFormer's extra norms (after the attention, after the activation);
    drop path on each residual branch (``encoder_drop_path_rate``, OFA's fine-tuning uses 0.1)."""

    side = "encoder"  # which of the config's encoder_* / decoder_* settings the layer reads

    def __init__(self, config: OFAConfig, layer_idx: int) -> None:
        super().__init__()
        layers, heads, ffn = (getattr(config, f"{self.side}_{k}") for k in ("layers", "attention_heads", "ffn_dim"))
        self.drop_path_rate = _drop_rate(getattr(config, f"{self.side}_drop_path_rate"), layers, layer_idx)
        d = config.d_model
        self.self_attn = OFAAttention(d, heads, config.attention_dropout, layer_idx, config.attn_scale_factor)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.self_attn_mid_layer_norm = _norm(d, config.normformer)
        self._add_cross_attention(config, heads, layer_idx)
        self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.ffn_layer_norm = _norm(ffn, config.normformer)
        self.final_layer_norm = nn.LayerNorm(d)
        self.dropout, self.activation_dropout = nn.Dropout(config.dropout), nn.Dropout(config.activation_dropout)
        self.activation_fn = ACT2FN[config.activation_function]
        self.normalize_before = getattr(config, f"{self.side}_normalize_before")

    def _add_cross_attention(self, config: OFAConfig, heads: int, layer_idx: int) -> None:
        """The encoder's layers have none (registered here, between the self-attention and the FFN, in the decoder:
        the order the modules are initialised in)."""

    def _sublayer(self, x: torch.Tensor, norm: nn.LayerNorm, body) -> torch.Tensor:
        out = body(norm(x) if self.normalize_before else x)
        out = x + drop_path(self.dropout(out), self.drop_path_rate, self.training)
        return out if self.normalize_before else norm(out)

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        x = self.activation_dropout(self.activation_fn(self.fc1(x)))
        return self.fc2(self.ffn_layer_norm(x) if self.ffn_layer_norm is not None else x)

    def _mid(self, x: torch.Tensor, norm: nn.LayerNorm | None) -> torch.Tensor:
        return norm(x) if norm is not None else x

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None, attn_bias: torch.Tensor) -> torch.Tensor:
        x = self._sublayer(x, self.self_attn_layer_norm, lambda h: self._mid(
            self.self_attn(h, attention_mask=attention_mask, attn_bias=attn_bias)[0], self.self_attn_mid_layer_norm))
        return self._sublayer(x, self.final_layer_norm, self._ffn)


class OFADecoderLayer(OFAEncoderLayer):
    """Causal self-attention, cross-attention to the encoder, FFN; each pre-norm with NormFormer's mid norm."""

    side = "decoder"

    def _add_cross_attention(self, config: OFAConfig, heads: int, layer_idx: int) -> None:
        d = config.d_model
        self.cross_attn = OFAAttention(d, heads, config.attention_dropout, layer_idx, config.attn_scale_factor)
        self.cross_attn_layer_norm = nn.LayerNorm(d)
        self.cross_attn_mid_layer_norm = _norm(d, config.normformer)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None, attn_bias: torch.Tensor,
                encoder_hidden_states: torch.Tensor, encoder_mask: torch.Tensor | None, cross_bias: torch.Tensor,
                past_key_values: EncoderDecoderCache | None) -> torch.Tensor:
        x = self._sublayer(x, self.self_attn_layer_norm, lambda h: self._mid(
            self.self_attn(h, attention_mask=attention_mask, attn_bias=attn_bias, past_key_values=past_key_values)[0],
            self.self_attn_mid_layer_norm))
        x = self._sublayer(x, self.cross_attn_layer_norm, lambda h: self._mid(
            self.cross_attn(h, encoder_hidden_states, attention_mask=encoder_mask, attn_bias=cross_bias,
                            past_key_values=past_key_values)[0], self.cross_attn_mid_layer_norm))
        return self._sublayer(x, self.final_layer_norm, self._ffn)


# --- encoder and decoder -------------------------------------------------------------------------------------------
@dataclass
class OFAEncoderOutput(ModelOutput):
    """The encoder's states with what the decoder's cross-attention needs besides them: which positions are
    padding (True) and the (layer-normed) position embedding of every encoder position."""

    last_hidden_state: torch.Tensor | None = None
    padding_mask: torch.Tensor | None = None
    position_embedding: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


def _relative_table(buckets: int, heads: int) -> nn.Embedding:
    table = nn.Embedding(buckets, heads)
    table.zero_init = True  # OFA starts every relative-position bias at 0 (read by _init_weights)
    return table


class OFAPositions(nn.Module):
    """What the encoder and decoder share in form: absolute position tables, their layer norms, and one
    relative-position table (1-D over text, 2-D over image cells) per layer."""

    def _init_positions(self, config: OFAConfig, heads: int, layers: int) -> None:
        d = config.d_model
        self.num_heads = heads
        self.embed_positions = nn.Embedding(config.max_position_embeddings + 2, d)
        self.embed_image_positions = nn.Embedding(config.image_bucket_size ** 2 + 1, d)
        self.pos_ln, self.image_pos_ln = nn.LayerNorm(d), nn.LayerNorm(d)
        self.pos_scaling = (d / heads * config.attn_scale_factor) ** -0.5
        self.token_bucket_size, self.image_bucket_size = config.token_bucket_size, config.image_bucket_size
        self.entangle_position_embedding = config.entangle_position_embedding
        image_tables = (2 * config.image_bucket_size - 1) ** 2 + 3
        self.token_rel_pos_table_list = nn.ModuleList(
            _relative_table(2 * config.token_bucket_size - 1, heads) for _ in range(layers))
        self.image_rel_pos_table_list = nn.ModuleList(_relative_table(image_tables, heads) for _ in range(layers))

    def _abs_bias(self, q_linear: nn.Linear, k_linear: nn.Linear, q_pos: torch.Tensor,
                  k_pos: torch.Tensor) -> torch.Tensor:
        """(B or 1, H, Lq, Lk): the absolute-position term, from layer-normed position embeddings."""
        q = q_linear(q_pos).view(*q_pos.shape[:2], self.num_heads, -1).transpose(1, 2) * self.pos_scaling
        k = k_linear(k_pos).view(*k_pos.shape[:2], self.num_heads, -1).transpose(1, 2)
        return q @ k.transpose(-1, -2)

    def _token_rel(self, idx: int, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """(H, Lq, Lk) relative bias of layer ``idx`` between text positions."""
        return self.token_rel_pos_table_list[idx](token_buckets(q_pos, k_pos, self.token_bucket_size)).permute(2, 0, 1)


class OFAEncoder(OFAPositions):
    main_input_name = "input_ids"  # generate() asks the encoder which argument it reads

    def __init__(self, config: OFAConfig, embed_tokens: nn.Embedding) -> None:
        super().__init__()
        d = config.d_model
        self.padding_idx = config.pad_token_id
        self.embed_scale = math.sqrt(d) if config.scale_embedding else 1.0
        self.embed_tokens = embed_tokens
        self.type_embedding = nn.Embedding(2, d) if config.add_type_embedding else None
        self.embed_images = OFAResNet(config.stages())
        self.image_proj = nn.Linear(1024, d)
        self.patch_layernorm_embedding = _norm(d, config.patch_layernorm_embedding)
        self.layernorm_embedding = _norm(d, config.layernorm_embedding)
        self._init_positions(config, config.encoder_attention_heads, config.encoder_layers)
        self.pos_q_linear, self.pos_k_linear = nn.Linear(d, d), nn.Linear(d, d)
        self.layers = nn.ModuleList(OFAEncoderLayer(config, i) for i in range(config.encoder_layers))
        self.layer_norm = _norm(d, config.encoder_normalize_before)
        self.dropout = nn.Dropout(config.dropout)

    def _embed(self, x: torch.Tensor, token_type: int, norm: nn.LayerNorm | None,
               position: torch.Tensor) -> torch.Tensor:
        x = x * self.embed_scale
        if self.entangle_position_embedding:
            x = x + position
        if self.type_embedding is not None:  # a module call (ZeRO-3 gathers the table), not a weight index
            x = x + self.type_embedding(torch.full(x.shape[:2], token_type, dtype=torch.long, device=x.device))
        return self.dropout(norm(x) if norm is not None else x)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, patch_masks: torch.Tensor | None = None,
                output_hidden_states: bool = False, output_attentions: bool = False,
                return_dict: bool = True) -> OFAEncoderOutput:
        """``attention_mask``: 1 for text tokens, 0 for padding (default: ``input_ids != pad``);
        ``patch_masks`` (B,): False for a row without an image (its image cells are padding)."""
        b, length = input_ids.shape
        pad = input_ids.eq(self.padding_idx) if attention_mask is None else attention_mask == 0
        text_pos = self.embed_positions(torch.arange(length, device=input_ids.device))
        x = self._embed(self.embed_tokens(input_ids), 0, self.layernorm_embedding, text_pos)
        pos = self.pos_ln(text_pos)[None].expand(b, -1, -1)
        cells, grid = 0, None
        if pixel_values is not None:
            feats = self.embed_images(pixel_values)
            grid = feats.shape[-2:]
            if max(grid) > self.image_bucket_size:  # the position tables cover a bucket_size x bucket_size grid
                raise ValueError(f"OFA: {pixel_values.shape[-2]} x {pixel_values.shape[-1]} px images give "
                                 f"{grid[0]} x {grid[1]} cells, more than image_bucket_size {self.image_bucket_size}")
            cells = grid[0] * grid[1]
            image_pos = self.embed_image_positions(image_position_ids(*grid, self.image_bucket_size, x.device))
            image = self._embed(self.image_proj(feats.flatten(2).transpose(1, 2)), 1, self.patch_layernorm_embedding,
                                image_pos)
            image_pad = torch.zeros(b, cells, dtype=torch.bool, device=x.device)
            if patch_masks is not None:
                image_pad |= ~patch_masks.to(torch.bool).view(-1, 1)
            x = torch.cat([image, x], dim=1)
            pad = torch.cat([image_pad, pad], dim=1)
            pos = torch.cat([self.image_pos_ln(image_pos)[None].expand(b, -1, -1), pos], dim=1)
        has_pads = bool(pad.any())
        if has_pads:
            x = x * (~pad)[..., None].to(x.dtype)
        abs_bias = self._abs_bias(self.pos_q_linear, self.pos_k_linear, pos, pos)
        mask = additive_mask(pad[:, None, None, :], x.dtype) if has_pads else None
        text = torch.arange(length, device=x.device)
        image_rel = image_buckets(*grid, self.image_bucket_size, x.device) if grid is not None else None
        states = (x,) if output_hidden_states else None
        for idx, layer in enumerate(self.layers):
            bias = abs_bias.clone()
            bias[:, :, cells:, cells:] += self._token_rel(idx, text, text)
            if image_rel is not None:
                bias[:, :, :cells, :cells] += self.image_rel_pos_table_list[idx](image_rel).permute(2, 0, 1)
            x = layer(x, mask, bias)
            if output_hidden_states:
                states += (x,)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return OFAEncoderOutput(last_hidden_state=x, padding_mask=pad, position_embedding=pos, hidden_states=states)


class OFADecoder(OFAPositions):
    def __init__(self, config: OFAConfig, embed_tokens: nn.Embedding) -> None:
        super().__init__()
        d = config.d_model
        self.padding_idx = config.pad_token_id
        self.embed_scale = math.sqrt(d) if config.scale_embedding else 1.0
        self.embed_tokens = embed_tokens
        self.layernorm_embedding = _norm(d, config.layernorm_embedding)
        self.code_layernorm_embedding = _norm(d, config.code_layernorm_embedding)  # image-code generation only
        self._init_positions(config, config.decoder_attention_heads, config.decoder_layers)
        self.self_pos_q_linear, self.self_pos_k_linear = nn.Linear(d, d), nn.Linear(d, d)
        self.cross_pos_q_linear, self.cross_pos_k_linear = nn.Linear(d, d), nn.Linear(d, d)
        self.layers = nn.ModuleList(OFADecoderLayer(config, i) for i in range(config.decoder_layers))
        self.layer_norm = _norm(d, config.decoder_normalize_before)
        self.output_projection = nn.Linear(d, config.vocab_size, bias=False)
        if config.share_decoder_input_output_embed:
            self.output_projection.weight = embed_tokens.weight
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, input_ids: torch.Tensor, encoder: OFAEncoderOutput, attention_mask: torch.Tensor | None = None,
                past_key_values: EncoderDecoderCache | None = None,
                output_hidden_states: bool = False) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Logits for ``input_ids`` (the tokens after the cached ones). ``attention_mask``: 1 for tokens, 0 for
        padding, over the cached and new tokens."""
        b, length = input_ids.shape
        past = past_key_values.self_attention_cache.get_seq_length() if past_key_values is not None else 0
        device = input_ids.device
        new = torch.arange(past, past + length, device=device)
        seen = torch.arange(past + length, device=device)
        all_pos = self.embed_positions(seen)
        x = self.embed_tokens(input_ids) * self.embed_scale
        # positions reach the decoder through its attention biases; OFA adds them to the input too only with
        # entangle_position_embedding (off in the released models: fairseq's --disable-entangle in every script)
        if self.entangle_position_embedding:
            x = x + all_pos[past:]
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        x = self.dropout(x)
        all_pos_ln = self.pos_ln(all_pos)[None]
        self_abs = self._abs_bias(self.self_pos_q_linear, self.self_pos_k_linear, all_pos_ln[:, past:], all_pos_ln)
        cross = self._abs_bias(self.cross_pos_q_linear, self.cross_pos_k_linear,
                               all_pos_ln[:, past:].expand(b, -1, -1), encoder.position_embedding)
        blocked = (seen[None, :] > new[:, None])[None, None]  # causal: (1, 1, L, past + L)
        if attention_mask is not None and not bool(attention_mask.all()):
            blocked = blocked | (attention_mask == 0)[:, None, None, :]
        mask = additive_mask(blocked, x.dtype)
        enc_pad = encoder.padding_mask
        enc_mask = additive_mask(enc_pad[:, None, None, :], x.dtype) if bool(enc_pad.any()) else None
        states = (x,) if output_hidden_states else None
        for idx, layer in enumerate(self.layers):
            bias = self_abs + self._token_rel(idx, new, seen)
            x = layer(x, mask, bias, encoder.last_hidden_state, enc_mask, cross, past_key_values)
            if output_hidden_states:
                states += (x,)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return self.output_projection(x), states


# --- the model ------------------------------------------------------------------------------------------------------
class OFAPreTrainedModel(PreTrainedModel):
    config_class = OFAConfig
    base_model_prefix = "ofa"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True  # the layers are GradientCheckpointingLayers
    _no_split_modules = ["OFAEncoderLayer", "OFADecoderLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(module, nn.Conv2d):  # the ResNet's initialisation (He et al.; torchvision's, OFA's)
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding) and getattr(module, "zero_init", False):
            nn.init.zeros_(module.weight)
        elif isinstance(module, nn.Embedding):  # OFA's (fairseq's) embedding initialisation; padding row 0
            nn.init.normal_(module.weight, mean=0.0, std=module.embedding_dim ** -0.5)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, OFAAttention):
            nn.init.ones_(module.c_attn)


class OFAModel(OFAPreTrainedModel, GenerationMixin):
    """OFA with its language-model head (the released ``OFAModel``: the decoder ends in the output projection),
    for captioning and VQA. ``forward`` takes ptscale's batch names (``pixel_values`` for OFA's
    ``patch_images``)."""

    _tied_weights_keys = {"decoder.embed_tokens.weight": "encoder.embed_tokens.weight",
                          "decoder.output_projection.weight": "encoder.embed_tokens.weight"}

    def __init__(self, config: OFAConfig) -> None:
        super().__init__(config)
        config.check_supported()
        shared = nn.Embedding(config.vocab_size, config.d_model, config.pad_token_id)
        self.encoder = OFAEncoder(config, shared)
        self.decoder = OFADecoder(config, shared)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.encoder.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.encoder.embed_tokens = self.decoder.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.decoder.output_projection

    def get_encoder(self) -> OFAEncoder:
        return self.encoder

    def forward(self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, patch_masks: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None, decoder_attention_mask: torch.Tensor | None = None,
                encoder_outputs: OFAEncoderOutput | None = None, past_key_values: Cache | None = None,
                labels: torch.Tensor | None = None, use_cache: bool | None = None,
                output_hidden_states: bool = False, return_dict: bool = True, **kwargs) -> Seq2SeqLMOutput:
        """``labels`` (B, T): the target tokens, -100 where no loss is taken; without ``decoder_input_ids`` the
        decoder reads them shifted right after BOS."""
        if encoder_outputs is None:
            encoder_outputs = self.encoder(input_ids, pixel_values, attention_mask, patch_masks,
                                           output_hidden_states=output_hidden_states)
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("OFA's forward needs decoder_input_ids or labels")
            decoder_input_ids = shift_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)
        if use_cache and past_key_values is None:
            past_key_values = EncoderDecoderCache(DynamicCache(config=self.config), DynamicCache(config=self.config))
        logits, dec_states = self.decoder(decoder_input_ids, encoder_outputs, decoder_attention_mask,
                                          past_key_values if use_cache else None, output_hidden_states)
        loss = None
        if labels is not None:
            wide = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp16/bf16 logits: fp32 loss
            loss = F.cross_entropy(wide.reshape(-1, wide.shape[-1]), labels.reshape(-1), ignore_index=-100)
        return Seq2SeqLMOutput(loss=loss, logits=logits, past_key_values=past_key_values if use_cache else None,
                               decoder_hidden_states=dec_states,
                               encoder_last_hidden_state=encoder_outputs.last_hidden_state,
                               encoder_hidden_states=encoder_outputs.hidden_states)

    def prepare_inputs_for_generation(self, decoder_input_ids: torch.Tensor, past_key_values: Cache | None = None,
                                      encoder_outputs: OFAEncoderOutput | None = None, use_cache: bool | None = None,
                                      **kwargs) -> dict:
        """The tokens the cache has not seen yet (all of them without a cache; at least the last one: under
        ``synced_gpus`` a rank whose sequences have ended keeps running forwards without growing them) and the
        encoder's outputs."""
        if past_key_values is not None and use_cache:
            seen = past_key_values.self_attention_cache.get_seq_length()
            decoder_input_ids = decoder_input_ids[:, min(seen, decoder_input_ids.shape[1] - 1):]
        return {"decoder_input_ids": decoder_input_ids, "encoder_outputs": encoder_outputs,
                "past_key_values": past_key_values, "use_cache": use_cache}


def shift_right(labels: torch.Tensor, pad: int, start: int) -> torch.Tensor:
    """Teacher forcing: ``start`` then the labels but the last (-100 -> pad)."""
    out = labels.new_full(labels.shape, pad)
    out[:, 1:] = labels[:, :-1]
    out[:, 0] = start
    return out.masked_fill(out == -100, pad)


# --- tokenizer ------------------------------------------------------------------------------------------------------
def code_tokens(n: int = NUM_CODES) -> list[str]:
    return [f"<code_{i}>" for i in range(n)]


def bin_tokens(n: int = NUM_BINS) -> list[str]:
    return [f"<bin_{i}>" for i in range(n)]


def load_tokenizer(path: str | Path, config: OFAConfig):
    """OFA's tokenizer from a directory: BART's byte-level BPE (``vocab.json`` + ``merges.txt``), then the
    config's ``<code_i>`` and ``<bin_i>`` tokens in that order (OFA's ids). A directory ``save_pretrained`` wrote
    (``tokenizer.json``) already holds them. Its size must be the model's vocabulary."""
    from transformers import AutoTokenizer, BartTokenizer

    path = Path(path)
    if (path / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(path)
    else:
        missing = [f for f in ("vocab.json", "merges.txt") if not (path / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{path}: no {' or '.join(missing)} (OFA's BPE vocabulary)")
        tokenizer = BartTokenizer.from_pretrained(path)  # reads vocab.json + merges.txt
        tokenizer.add_tokens(code_tokens(config.num_codes) + bin_tokens(config.num_bins))
    if len(tokenizer) != config.vocab_size:
        raise ValueError(f"{path}: the tokenizer has {len(tokenizer)} tokens (BPE + {config.num_codes} codes + "
                         f"{config.num_bins} bins), the model's vocabulary {config.vocab_size}")
    return tokenizer


def image_processor(resolution: int):
    """OFA's image transform: resize to ``resolution`` x ``resolution`` (bicubic), scale to [0, 1], normalise with
    mean 0.5 and std 0.5 per channel (transformers' BLIP processor does exactly these steps)."""
    from transformers.image_utils import PILImageResampling
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    return BlipImageProcessorPil(size={"height": resolution, "width": resolution}, image_mean=[0.5] * 3,
                                 image_std=[0.5] * 3, resample=PILImageResampling.BICUBIC)


def load_image_processor(path: str | Path, config: OFAConfig):
    """The directory's ``preprocessor_config.json`` (ptscale saves one), else OFA's transform at the config's
    ``image_resolution`` (the released folders carry none), said once in the log."""
    from transformers import AutoImageProcessor

    if (Path(path) / "preprocessor_config.json").is_file():
        return AutoImageProcessor.from_pretrained(path)
    log.warning("%s has no preprocessor_config.json: using OFA's image transform at %d px (config "
                "image_resolution; OFA's captioning and VQA fine-tuning use 480)", path, config.image_resolution)
    return image_processor(config.image_resolution)


# --- checkpoints ------------------------------------------------------------------------------------------------------
# Buffers the released port saved (position-bucket tables; fairseq's version counters): recomputed here.
UNUSED_KEYS = ("encoder.token_rp_bucket", "encoder.image_rp_bucket", "decoder.token_rp_bucket",
               "decoder.image_rp_bucket", "decoder.image_position_idx", "encoder.version", "decoder.version")


def read_config(path: str | Path) -> OFAConfig:
    raw = json.loads((Path(path) / "config.json").read_text())
    raw.pop("model_type", None)
    return OFAConfig(**raw)


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """The directory's weights; a leading ``model.`` (the port's ``OFAForConditionalGeneration``) is dropped."""
    return {k.removeprefix("model."): v for k, v in read_weights(path).items()}


def load_ofa(path: str | Path, dtype: torch.dtype = torch.float32) -> OFAModel:
    """An OFA model from a directory in the released key layout. The recomputed buffers are dropped; a missing or
    unexpected key is an error (no silently random weight), except the tied embeddings / output projection."""
    path = Path(path)
    model = OFAModel(read_config(path))
    state = {k: v for k, v in read_state(path).items() if not k.startswith(UNUSED_KEYS)}
    # an untied output projection is a weight of its own: it must be there
    tied = set(OFAModel._tied_weights_keys) if model.config.share_decoder_input_output_embed else {
        "decoder.embed_tokens.weight"}
    load_exactly(model, state, tied, path, "an OFA checkpoint in the released key layout")
    # the released configs say use_cache false (fairseq's generator keeps its own cache); decoding here reuses keys
    model.config.use_cache = model.generation_config.use_cache = True
    return model.to(dtype).eval()


# --- the embedded default: tiny-ofa, pre-trained once and cached -----------------------------------------------------
SEED = 20240601
BATCH = 32
# Held-out loss / attribute accuracy of greedy captions (this machine, 2026-12-06, /tmp scripts over
# pretrain_steps): 600 steps at 2e-3 (the other defaults' rate) 0.72 / 0.00; 1200 steps at 1e-3, batch 64: 0.61 /
# 0.03, at 5e-4: 0.57 / 0.22 (these three before OFA's initialisation below); 2400 steps at 5e-4: 0.50 / 0.16.
LR = 5e-4
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # BART's special tokens: <s> 0, <pad> 1, </s> 2, <unk> 3


def tiny_bpe(directory: Path, vocab_size: int) -> None:
    """A byte-level BPE (BART's kind) trained on the synthetic world's words, written as ``vocab.json`` +
    ``merges.txt``: the embedded default's vocabulary, in the released layout."""
    from tokenizers import ByteLevelBPETokenizer

    from ptscale.data.synthetic import vocabulary

    bpe = ByteLevelBPETokenizer()
    words = vocabulary()
    bpe.train_from_iterator([" ".join(words)] + [f" {w}" for w in words], vocab_size=vocab_size, min_frequency=1,
                            special_tokens=SPECIALS, show_progress=False)
    bpe.save_model(str(directory))


def new_tiny_ofa(preset: str, seed: int = SEED):
    """The preset's OFAModel (fresh weights) and its tokenizer: the tiny BPE + the preset's codes and bins."""
    import tempfile

    from ptscale.models.presets import OFA_PRESETS

    if preset not in OFA_PRESETS:
        raise ValueError(f"model.preset: unknown OFA preset {preset!r}; known: {', '.join(OFA_PRESETS)}")
    spec = dict(OFA_PRESETS[preset])
    bpe_size = spec.pop("bpe_vocab_size")
    with tempfile.TemporaryDirectory() as tmp:
        tiny_bpe(Path(tmp), bpe_size)
        bpe_tokens = len(json.loads((Path(tmp) / "vocab.json").read_text()))
        config = OFAConfig(**spec, vocab_size=bpe_tokens + spec["num_codes"] + spec["num_bins"])
        tokenizer = load_tokenizer(tmp, config)
    config.architectures = ["OFAModel"]
    torch.manual_seed(seed)
    return OFAModel(config), tokenizer


def pretrain_tiny_ofa(preset: str, steps: int):
    """All parameters train on the broad synthetic captions and questions (each with its own instruction), as the
    other embedded defaults are pre-trained (plain PyTorch, one process)."""
    from ptscale.data.ofa_collate import OFACollator
    from ptscale.data.synthetic import pretraining_mixture
    from ptscale.models.pretrain import MAX_TEXT_LEN, SIZE
    from ptscale.models.pretrain_loop import pretrain_steps

    model, tokenizer = new_tiny_ofa(preset)
    processor = image_processor(model.config.image_resolution)
    collate = OFACollator(processor, tokenizer, max_text_len=MAX_TEXT_LEN)
    records = collate.preprocess(pretraining_mixture(SIZE, SEED))

    def next_batch(rng):
        batch = collate.train_batch([records[i] for i in rng.sample(range(len(records)), BATCH)])
        batch.pop("image_keys")
        return batch

    pretrain_steps(model, next_batch, steps, LR, SEED, "pre-training OFA backbone")
    return model.eval(), tokenizer, processor
