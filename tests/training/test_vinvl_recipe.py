"""VinVL by recipe on 2 ranks under ZeRO-3: captioning prefix -> LoRA on the embedded tiny VinVL (prefixes in BERT's
self-attention through the attention-interface hook, with the Oscar mask), each stage changing exactly its groups,
CIDEr on the synthetic downstream task after training above before."""

import pytest

from tests.launch import prefix_then_lora_learns_on_two_ranks

VINVL = ["model.preset=tiny-vinvl", "plan=prefix->lora", "prefix.lengths={bert: 8}",
         "lora.targets={bert: [attention.self.query, attention.self.value]}"]


@pytest.mark.slow
def test_vinvl_captioning_prefix_then_lora_two_ranks_zero3(tmp_path):
    # the masked-token loss sees ~3 caption tokens per caption and step: 8 LoRA epochs at 3e-3 learn the new style
    prefix_then_lora_learns_on_two_ranks(tmp_path, "vinvl", VINVL)
