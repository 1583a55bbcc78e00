"""Text evaluation: the loss terms are the model's own loss, perplexity is exp(loss), exact match compares the
model's own generate() output with the completion."""

import math

import pytest
import torch

from ptscale.config import DataConfig, EvalConfig, PrefixConfig
from ptscale.data.text_collate import make_text_collator
from ptscale.eval.text import normalize, predict_text, score_text
from ptscale.models.backbone import load_backbone
from ptscale.prefix.model import PrefixTunedModel
from tests.text_fixtures import reverse_records

RECORDS = [dict(r, id=str(i)) for i, r in enumerate(reverse_records(5, 3))]


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_loss_terms_are_the_models_own_loss_and_generation_is_its_generate(lm_dirs, family):
    backbone = load_backbone(lm_dirs[family], family=family)
    model = PrefixTunedModel(backbone.model, PrefixConfig(lengths={"language_model": 2}, encoder_hidden=8)).eval()
    collator = make_text_collator(backbone.tokenizer, DataConfig(name="text", max_text_len=32), seq2seq=False)
    settings = EvalConfig(num_beams=1, max_new_tokens=3, min_new_tokens=1, batch_size=2)
    preds = predict_text(model, collator, RECORDS, settings)
    with torch.no_grad():
        for r in RECORDS:
            own = model(**collator.train_batch([r])).loss.item()  # mean over this record's completion tokens
            p = preds[r["id"]]
            assert p["tokens"] == len(collator.encode(r)[1])
            # float32 sums in another order (a padded batch of 2 against a batch of 1)
            assert p["nll"] / p["tokens"] == pytest.approx(own, rel=1e-5)
            batch = collator.generation_batch([r])
            ids = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=collator.pad_token_id)
            text = backbone.tokenizer.decode(ids[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
            assert p["generated"] == text.strip()


def test_scores():
    preds = {"0": {"nll": 2.0, "tokens": 2, "generated": "W1  w2"}, "1": {"nll": 4.0, "tokens": 2, "generated": "w3"}}
    records = [{"id": "0", "prompt": "p", "completion": "w1 w2"}, {"id": "1", "prompt": "p", "completion": "w4"}]
    metrics, rows = score_text(preds, records)
    assert metrics == {"loss": 1.5, "perplexity": math.exp(1.5), "exact_match": 0.5}
    assert [r["exact_match"] for r in rows] == [1.0, 0.0]
    plain, _ = score_text({"0": {"nll": 3.0, "tokens": 3}}, [{"id": "0", "text": "w1 w2"}])
    assert plain == {"loss": 1.0, "perplexity": math.e}  # plain text: no generation, no exact match
    assert normalize(" A\n b ") == "a b"
