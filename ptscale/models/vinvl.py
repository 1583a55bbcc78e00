"""VinVL (Zhang et al., 2021; Oscar+, Li et al., 2020): the PT-PEFT paper's region-feature captioner, built on
transformers' ``BertModel`` (VinVL is not in transformers).

The input is one sequence of three segments, in Oscar's order::

    [CLS] caption [SEP] | object tags [SEP] | region features
    token type 0        | token type 1      | (no type, no position)

Caption token ``i`` has position ``i``; tag ``j`` has position ``max_caption_len + j`` (Oscar's ``max_seq_a_length``:
the tags' positions do not depend on the caption's length). Each region is ``img_feature_dim`` values (VinVL: 2048
appearance + 6 box values, ``ptscale.data.region_features``) mapped into the hidden size by ``img_embedding``
(+ the optional ``LayerNorm`` of ``use_img_layernorm``, + dropout), as Oscar's ``BertImgModel`` does.

The Oscar captioning attention mask (:func:`oscar_mask`): a caption token sees the caption tokens up to itself
(left to right) and every tag and region; tags and regions see each other only, never the caption. Padding (caption,
tags, regions) is seen by no one.

* Training (Oscar+ captioning): a share of the caption tokens (``mask_prob``, at most ``max_masked_tokens``, [SEP]
  included, [CLS] never) is masked by the collator (``ptscale.data.vinvl_collate``) and predicted: cross-entropy on
  the masked positions only (``labels``: -100 elsewhere).
* Decoding (:meth:`VinVLForCaptioning.generate`): append [MASK] after the caption so far and predict it, step by
  step, greedy or beam search. With the KV cache (the default) the tags and regions are encoded once (they never
  see the caption) and each step feeds the previous token and a new [MASK]; the [MASK]'s keys/values are dropped
  again, so the cache holds what an uncached forward over the caption so far computes.

Parameter names follow the released Oscar/VinVL checkpoints (``bert.embeddings.*``, ``bert.encoder.*``,
``bert.img_embedding.*``, ``bert.LayerNorm.*``, ``cls.predictions.*``): :func:`load_vinvl` reads such a directory
(``config.json`` + ``pytorch_model.bin``, ``torch.load(weights_only=True)``, or a ``model.safetensors`` that
``save_pretrained`` wrote). Prefixes go into BERT's self-attention (target ``bert``) through the attention-interface
hook: ``BertSelfAttention`` dispatches through transformers' attention interface, and the hook keeps this module's
mask for the sequence keys (every query sees every prefix position).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, BertConfig
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import ModelOutput
from transformers.models.bert.modeling_bert import BertEmbeddings, BertEncoder, BertOnlyMLMHead, BertPreTrainedModel

from ptscale.checkpoint import load_exactly, read_weights

log = logging.getLogger(__name__)

MODEL_TYPE = "vinvl"
IGNORE = -100
SEED = 20240601
BATCH = 64
LR = 2e-3
# Keys of a released Oscar/VinVL checkpoint that captioning does not use (the pre-training heads, the pooler), and
# the position / token-type id buffers some transformers versions saved (ours are not persistent).
UNUSED_KEYS = ("bert.pooler.", "cls.seq_relationship.", "seq_relationship.", "bert.embeddings.position_ids",
               "bert.embeddings.token_type_ids")


class VinVLConfig(BertConfig):
    """BertConfig plus Oscar's image settings and the captioning recipe's lengths.

    A released checkpoint's config.json says ``model_type: bert`` and carries ``img_feature_dim`` (2054),
    ``use_img_layernorm``, ``img_layer_norm_eps``: read as they are."""

    model_type = MODEL_TYPE

    def __init__(self, img_feature_dim: int = 2054, use_img_layernorm: bool = False, img_layer_norm_eps: float = 1e-12,
                 max_caption_len: int = 40, mask_prob: float = 0.15, max_masked_tokens: int = 3, **kwargs):
        super().__init__(**kwargs)
        self.img_feature_dim = img_feature_dim
        self.use_img_layernorm = bool(use_img_layernorm)
        self.img_layer_norm_eps = img_layer_norm_eps
        self.max_caption_len = max_caption_len  # Oscar's max_seq_a_length: [CLS] caption [SEP]
        self.mask_prob = mask_prob
        self.max_masked_tokens = max_masked_tokens


AutoConfig.register(MODEL_TYPE, VinVLConfig, exist_ok=True)  # AutoTokenizer may read a saved config.json


@dataclass
class VinVLOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # caption positions (B, Lc, V); None when a loss was asked for
    hidden_states: torch.Tensor | None = None


def oscar_mask(caption_mask: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
    """The boolean (B, 1, Lc + Lx, Lc + Lx) Oscar captioning mask (True: attend) over ``[caption | context]``, where
    the context is the tags then the regions. ``caption_mask`` (B, Lc) and ``context_mask`` (B, Lx): 1 = real."""
    cap, ctx = caption_mask.bool(), context_mask.bool()
    lc = cap.shape[1]
    causal = torch.ones(lc, lc, dtype=torch.bool, device=cap.device).tril()
    cap_rows = torch.cat([causal[None] & cap[:, None, :], ctx[:, None, :].expand(-1, lc, -1)], dim=2)
    ctx_rows = torch.cat([torch.zeros_like(cap)[:, None, :].expand(-1, ctx.shape[1], -1),
                          ctx[:, None, :].expand(-1, ctx.shape[1], -1)], dim=2)
    return torch.cat([cap_rows, ctx_rows], dim=1)[:, None]


class VinVLBertModel(BertPreTrainedModel):
    """Oscar's ``BertImgModel`` (captioning: no pooler): BERT embeddings and encoder plus ``img_embedding``."""

    config_class = VinVLConfig

    def __init__(self, config: VinVLConfig):
        super().__init__(config)
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.img_embedding = nn.Linear(config.img_feature_dim, config.hidden_size)
        if config.use_img_layernorm:  # Oscar's name for it: bert.LayerNorm
            self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.img_layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def context_embeddings(self, tag_ids: torch.Tensor, region_features: torch.Tensor) -> torch.Tensor:
        """Tags (token type 1, positions from ``max_caption_len``) then projected regions: (B, Lt + R, hidden)."""
        lt = tag_ids.shape[1]
        positions = torch.arange(lt, device=tag_ids.device)[None] + self.config.max_caption_len
        tags = self.embeddings(input_ids=tag_ids, token_type_ids=torch.ones_like(tag_ids),
                               position_ids=positions.expand_as(tag_ids))
        regions = self.img_embedding(region_features.to(self.img_embedding.weight.dtype))
        if self.config.use_img_layernorm:
            regions = self.LayerNorm(regions)
        return torch.cat([tags, self.dropout(regions)], dim=1)

    def caption_embeddings(self, input_ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None] + offset
        return self.embeddings(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids),
                               position_ids=positions.expand_as(input_ids))

    def attention_mask(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The boolean mask in the form this model's attention takes: eager adds a float mask."""
        if self.config._attn_implementation == "eager":
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        return mask

    def forward(self, input_ids, attention_mask, tag_ids, tag_mask, region_features, region_mask) -> torch.Tensor:
        """Hidden states (B, Lc + Lt + R, hidden) of the whole sequence, uncached."""
        hidden = torch.cat([self.caption_embeddings(input_ids), self.context_embeddings(tag_ids, region_features)], 1)
        mask = oscar_mask(attention_mask, torch.cat([tag_mask, region_mask], dim=1))
        return self.encoder(hidden, attention_mask=self.attention_mask(mask, hidden.dtype)).last_hidden_state

    def encode_context(self, tag_ids, tag_mask, region_features, region_mask) -> DynamicCache:
        """The tags' and regions' keys/values of every layer (they never see the caption), as a cache."""
        hidden = self.context_embeddings(tag_ids, region_features)
        ctx = torch.cat([tag_mask, region_mask], dim=1).bool()
        mask = (ctx[:, None, :] & ctx[:, None, :].new_ones(1, ctx.shape[1], 1))[:, None]
        cache = DynamicCache(config=self.config)
        self.encoder(hidden, attention_mask=self.attention_mask(mask, hidden.dtype), past_key_values=cache,
                     use_cache=True)
        return cache

    def decode_step(self, tokens: torch.Tensor, offset: int, context_mask: torch.Tensor,
                    cache: DynamicCache) -> torch.Tensor:
        """Hidden states of ``tokens`` (B, n) at caption positions ``offset..offset+n-1``, causal among themselves,
        seeing the cached context and caption tokens 0..offset-1 (cache order: context, then caption)."""
        n = tokens.shape[1]
        hidden = self.caption_embeddings(tokens, offset)
        seen = cache.get_seq_length()
        caption = context_mask.new_ones(context_mask.shape[0], seen - context_mask.shape[1])
        before = torch.cat([context_mask, caption], 1).bool()
        causal = torch.ones(n, n, dtype=torch.bool, device=tokens.device).tril()
        mask = torch.cat([before[:, None, :].expand(-1, n, -1), causal[None].expand(tokens.shape[0], -1, -1)], 2)
        return self.encoder(hidden, attention_mask=self.attention_mask(mask[:, None], hidden.dtype),
                            past_key_values=cache, use_cache=True).last_hidden_state


class VinVLForCaptioning(BertPreTrainedModel):
    """Oscar's ``BertForImageCaptioning``: :class:`VinVLBertModel` and BERT's masked-token head (tied to the word
    embeddings, as in BERT)."""

    config_class = VinVLConfig
    _tied_weights_keys = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
                          "cls.predictions.decoder.bias": "cls.predictions.bias"}

    def __init__(self, config: VinVLConfig):
        super().__init__(config)
        self.bert = VinVLBertModel(config)
        self.cls = BertOnlyMLMHead(config)
        self.post_init()

    def get_output_embeddings(self):
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings):
        self.cls.predictions.decoder = new_embeddings
        self.cls.predictions.bias = new_embeddings.bias

    def forward(self, input_ids, attention_mask, tag_ids, tag_mask, region_features, region_mask,
                labels: torch.Tensor | None = None) -> VinVLOutput:
        """``labels`` (B, Lc): the original token at each masked caption position, -100 elsewhere."""
        hidden = self.bert(input_ids, attention_mask, tag_ids, tag_mask, region_features, region_mask)
        caption = hidden[:, :input_ids.shape[1]].contiguous()
        if labels is None:
            return VinVLOutput(logits=self.cls(caption), hidden_states=hidden)
        picked = labels != IGNORE
        if not picked.any():
            raise ValueError("VinVL batch without a masked caption token: nothing to predict")
        logits = self.cls(caption[picked])
        return VinVLOutput(loss=F.cross_entropy(logits.float(), labels[picked]), hidden_states=hidden)

    # --- decoding ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids, attention_mask, tag_ids, tag_mask, region_features, region_mask, *,
                 num_beams: int = 1, max_new_tokens: int = 20, min_new_tokens: int = 1, do_sample: bool = False,
                 synced_gpus: bool = False, use_cache: bool = True, length_penalty: float = 1.0) -> torch.Tensor:
        """Captions after ``input_ids`` ([CLS] per row: (B, 1)), each (B, max_new_tokens) new tokens ending in [SEP]
        and padded with [PAD] ([PAD], [CLS] and [MASK] are never generated). Beam search keeps the ``num_beams``
        best hypotheses ended by [SEP], scored by log-probability / length ** ``length_penalty``.
        ``synced_gpus`` (ZeRO-3: every rank runs the same forwards) decodes all ``max_new_tokens``
        steps instead of stopping when every caption has ended (the result is the same)."""
        if do_sample:
            raise ValueError("VinVL decoding is greedy or beam search (do_sample=False)")
        if input_ids.shape[1] != 1:
            raise ValueError(f"VinVL generation starts from [CLS] alone (input_ids (B, 1)), got "
                             f"{tuple(input_ids.shape)}")
        cfg = self.config
        limit = min(max_new_tokens, cfg.max_caption_len - 1)
        b, k = input_ids.shape[0], num_beams
        rows = torch.arange(b, device=input_ids.device).repeat_interleave(k)
        ctx = (tag_ids[rows], tag_mask[rows], region_features[rows], region_mask[rows])
        step = _CachedSteps(self, ctx) if use_cache else _UncachedSteps(self, ctx)
        seqs = input_ids[rows]  # (B*k, 1 + t): [CLS] and the tokens so far
        scores = torch.zeros(b, k, device=input_ids.device)
        scores[:, 1:] = float("-inf")  # the k beams start identical: only the first one expands
        done = torch.zeros(b * k, dtype=torch.bool, device=input_ids.device)
        finished: list[list[tuple[float, torch.Tensor]]] = [[] for _ in range(b)]
        sep, pad = cfg.sep_token_id, cfg.pad_token_id
        never = [t for t in (pad, cfg.cls_token_id, cfg.mask_token_id) if t is not None]
        for t in range(limit):
            logp = step(seqs).float().log_softmax(-1)  # (B*k, V)
            if t + 1 < min_new_tokens:
                logp[:, sep] = float("-inf")
            logp[:, never] = float("-inf")  # [PAD], [CLS], [MASK] are no caption words
            logp[done] = float("-inf")
            logp[done, pad] = 0.0  # an ended beam only pads, at no cost
            total = (scores.view(-1, 1) + logp).view(b, -1)  # (B, k*V)
            top, idx = total.topk(2 * k if k > 1 else 1, dim=1)
            vocab = logp.shape[1]
            beam, token = idx // vocab, idx % vocab
            new_scores, new_src, new_tok = [], [], []
            for i in range(b):
                kept = 0
                for s, bm, tk in zip(top[i].tolist(), beam[i].tolist(), token[i].tolist(), strict=True):
                    src = i * k + bm
                    if k > 1 and tk == sep and not done[src] and s > float("-inf"):
                        # a beam hypothesis that ends here (beam search keeps the k best finished ones)
                        ended = torch.cat([seqs[src, 1:], seqs.new_tensor([sep])])
                        finished[i].append((s / (t + 1) ** length_penalty, ended))
                        continue
                    new_scores.append(s)
                    new_src.append(src)
                    new_tok.append(tk)
                    kept += 1
                    if kept == k:
                        break
                while kept < k:  # fewer live candidates than beams: pad with dead ones
                    new_scores.append(float("-inf"))
                    new_src.append(i * k)
                    new_tok.append(pad)
                    kept += 1
            src_t = torch.tensor(new_src, device=seqs.device)
            tok_t = torch.tensor(new_tok, device=seqs.device)
            step.reorder(src_t)
            done = done[src_t] | (tok_t == sep) | (tok_t == pad)  # pad: a dead or ended beam
            if k > 1:
                done |= torch.tensor(new_scores, device=seqs.device) == float("-inf")
            scores = torch.tensor(new_scores, device=seqs.device).view(b, k)
            seqs = torch.cat([seqs[src_t], tok_t[:, None]], dim=1)
            if k > 1:
                best_live = scores.max(dim=1).values / (t + 1) ** length_penalty
                for i in range(b):
                    if len(finished[i]) >= k:
                        worst = sorted(f[0] for f in finished[i])[-k]
                        if best_live[i] <= worst:
                            scores[i] = float("-inf")
                            done[i * k:(i + 1) * k] = True
            if bool(done.all()) and not synced_gpus:
                break
        out = torch.full((b, limit), pad, dtype=torch.long, device=input_ids.device)
        for i in range(b):
            if k == 1:
                caption = seqs[i, 1:]
            else:
                live = [(scores[i, j].item() / max(1, seqs.shape[1] - 1) ** length_penalty, seqs[i * k + j, 1:])
                        for j in range(k) if scores[i, j] > float("-inf")]
                caption = max(finished[i] + live, key=lambda f: f[0])[1]
            out[i, :len(caption)] = caption[:limit]
        return out


class _UncachedSteps:
    """Each step: the whole sequence ``[CLS] tokens [MASK] | tags | regions``; the [MASK]'s prediction."""

    def __init__(self, model: VinVLForCaptioning, ctx: tuple):
        self.model, self.ctx = model, ctx

    def __call__(self, seqs: torch.Tensor) -> torch.Tensor:
        ids = torch.cat([seqs, seqs.new_full((seqs.shape[0], 1), self.model.config.mask_token_id)], dim=1)
        return self.model(ids, torch.ones_like(ids), *self.ctx).logits[:, -1]

    def reorder(self, src: torch.Tensor) -> None:
        self.ctx = tuple(x[src] for x in self.ctx)


class _CachedSteps:
    """The context encoded once; each step feeds the last token and a [MASK], then drops the [MASK] from the
    cache again."""

    def __init__(self, model: VinVLForCaptioning, ctx: tuple):
        tag_ids, tag_mask, region_features, region_mask = ctx
        self.model = model
        self.context_mask = torch.cat([tag_mask, region_mask], dim=1)
        self.cache = model.bert.encode_context(tag_ids, tag_mask, region_features, region_mask)

    def __call__(self, seqs: torch.Tensor) -> torch.Tensor:
        last = seqs[:, -1:]
        ids = torch.cat([last, last.new_full(last.shape, self.model.config.mask_token_id)], dim=1)
        hidden = self.model.bert.decode_step(ids, seqs.shape[1] - 1, self.context_mask, self.cache)
        for layer in self.cache.layers:  # the [MASK]'s keys/values: gone again
            layer.keys, layer.values = layer.keys[:, :, :-1], layer.values[:, :, :-1]
        return self.model.cls(hidden[:, -1])

    def reorder(self, src: torch.Tensor) -> None:
        self.context_mask = self.context_mask[src]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[src], layer.values[src]


# --- checkpoints ------------------------------------------------------------------------------------------------
def read_config(path: str | Path) -> VinVLConfig:
    """``config.json`` of a VinVL directory (a released Oscar/VinVL one says ``model_type: bert``, or none)."""
    raw = json.loads((Path(path) / "config.json").read_text())
    raw.pop("model_type", None)
    raw.pop("architectures", None)
    return VinVLConfig(**raw)


def with_token_ids(config: VinVLConfig, tokenizer) -> VinVLConfig:
    """The tokenizer's [PAD] [CLS] [SEP] [MASK] ids in ``config`` (a released config.json names none of them)."""
    config.pad_token_id, config.cls_token_id = tokenizer.pad_token_id, tokenizer.cls_token_id
    config.sep_token_id, config.mask_token_id = tokenizer.sep_token_id, tokenizer.mask_token_id
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, the model's vocabulary {config.vocab_size}")
    return config


def load_tokenizer(path: str | Path):
    """The tokenizer of a VinVL directory: what ``save_pretrained`` wrote, or a released checkpoint's bare
    ``vocab.txt`` (BERT's uncased WordPiece vocabulary, as VinVL uses)."""
    from transformers import AutoTokenizer, BertTokenizerFast

    path = Path(path)
    if not (path / "tokenizer_config.json").is_file() and (path / "vocab.txt").is_file():
        return BertTokenizerFast(vocab_file=str(path / "vocab.txt"), do_lower_case=True)
    return AutoTokenizer.from_pretrained(path)


def load_vinvl(path: str | Path, dtype: torch.dtype = torch.float32) -> VinVLForCaptioning:
    """A VinVL captioner from a directory in the released key layout. Keys the captioner does not use (pooler,
    pre-training heads) are dropped; a missing key is an error (no silently random weight), except the prediction
    head's decoder, which is tied to the word embeddings."""
    path = Path(path)
    model = VinVLForCaptioning(read_config(path))
    state = {k: v for k, v in read_weights(path).items() if not k.startswith(UNUSED_KEYS)}
    load_exactly(model, state, set(VinVLForCaptioning._tied_weights_keys), path,
                 "a VinVL captioning checkpoint in the released key layout")
    return model.to(dtype).eval()


# --- the embedded default ---------------------------------------------------------------------------------------
def vinvl_config(preset: str, tokenizer) -> VinVLConfig:
    from ptscale.models.presets import VINVL_PRESETS

    if preset not in VINVL_PRESETS:
        raise ValueError(f"model.preset: unknown VinVL preset {preset!r}; known: {', '.join(VINVL_PRESETS)}")
    return VinVLConfig(**VINVL_PRESETS[preset], vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       sep_token_id=tokenizer.sep_token_id, cls_token_id=tokenizer.cls_token_id,
                       mask_token_id=tokenizer.mask_token_id)


def bert_word_tokenizer(words: list[str]):
    """A BERT-style word-level tokenizer ([PAD] [UNK] [CLS] [SEP] [MASK]) over the synthetic vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(words) - set(specials)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def new_tiny_vinvl(preset: str, seed: int = SEED):
    from ptscale.data.synthetic import vocabulary

    tokenizer = bert_word_tokenizer(vocabulary())
    torch.manual_seed(seed)
    model = VinVLForCaptioning(vinvl_config(preset, tokenizer))
    model.config.architectures = ["VinVLForCaptioning"]
    return model, tokenizer


def pretrain_tiny_vinvl(preset: str, steps: int):
    """All parameters train on the broad synthetic captions with Oscar+'s masked-token captioning loss (plain
    PyTorch, one process), as the other embedded defaults are pre-trained."""
    from ptscale.data.synthetic import make_split
    from ptscale.data.vinvl_collate import VinVLCollator
    from ptscale.models.pretrain_loop import pretrain_steps

    model, tokenizer = new_tiny_vinvl(preset)
    collate = VinVLCollator(tokenizer, model.config)
    records = collate.preprocess(make_split("pretrain", 4096, SEED, "pretrain"))
    generator = torch.Generator().manual_seed(SEED)

    def next_batch(rng):
        batch = collate.train_batch([records[i] for i in rng.sample(range(len(records)), BATCH)], generator)
        batch.pop("image_keys")
        return batch

    pretrain_steps(model, next_batch, steps, LR, SEED, "pre-training VinVL backbone")
    return model.eval(), tokenizer, None
