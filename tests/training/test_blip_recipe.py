"""BLIP by recipe on 2 ranks under ZeRO-3: captioning prefix -> LoRA on the embedded tiny BLIP (prefixes in the
text decoder's self-attention through the module wrappers), each stage changing exactly its groups, CIDEr after
training above before; a local BLIP checkpoint (``model.path``) built under zero.Init; VQA prefix -> LoRA on a BLIP
VQA checkpoint and synthetic VQAv2-format data, VQA accuracy after training above before."""

import json
import random

import pytest

from tests.launch import BIN, changed_groups, launch, prefix_then_lora_learns_on_two_ranks

BLIP = ["model.preset=tiny-blip", "plan=prefix->lora", "prefix.lengths={decoder: 8}",
        "lora.targets={text_decoder: [attention.self.query, attention.self.value]}"]


@pytest.mark.slow
def test_blip_captioning_prefix_then_lora_two_ranks_zero3(tmp_path):
    # the default budget does not learn the embedded default's long downstream captions on tiny-blip (1 rank: CIDEr
    # 0.27 -> 0.20); 6 LoRA epochs at 3e-3 did (0.27 -> 0.61), 8 for 2 ranks' half steps
    prefix_then_lora_learns_on_two_ranks(tmp_path, "blip", BLIP)


@pytest.mark.slow
def test_blip_checkpoint_under_zero3_full_fine_tuning(tmp_path):
    """``model.path`` (a tiny save_pretrained BLIP captioning directory) is loaded into ZeRO-3 partitions; the
    prefix stage moves the prefixes only, the full stage the vision tower and the text decoder (not the word
    embeddings or the prediction head)."""
    from ptscale.models.blip import new_tiny_blip, tiny_processor

    path = tmp_path / "blip-ckpt"
    model, tokenizer = new_tiny_blip("tiny-blip", seed=0)
    for thing in (model, tokenizer, tiny_processor("tiny-blip")):
        thing.save_pretrained(path)
    steps = "{steps: 2, lr: 1.0e-3, evaluate: false}"
    launch([str(BIN / "deepspeed"), "--num_gpus", "2", "launchers/train.py", "--ds", "ds_configs/zero3.json",
            f"output_dir={tmp_path}", "run_name=full", f"model.path={path}", "plan=prefix->full",
            "prefix.lengths={decoder: 4, vision: 2}", f"methods.prefix={steps}", f"methods.full={steps}",
            "eval.before_training=false", "data.train_size=128", "checkpoint.every_steps=0"], timeout=900)
    run = tmp_path / "full"
    assert changed_groups(run / "stage-1-prefix") == {"prefix"}
    assert changed_groups(run / "stage-2-prefix+full") == {"prefix", "vision", "text_decoder"}


def _synthetic_vqa(root, split: str, n: int, seed: int) -> tuple:
    """VQAv2-format questions + annotations over rendered synthetic scenes: "a <shape> that is" (answer: its
    colour) or "there is a <colour>" (answer: its shape), ten identical answers each; images where load_vqav2
    looks."""
    from ptscale.data.synthetic import COLORS, POSITIONS, SHAPES, SIZES, Obj, render

    rng = random.Random(f"{seed}-{split}")
    questions, annotations = [], []
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        obj = Obj(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(list(SIZES)), rng.choice(list(POSITIONS)))
        render((obj,), rng).save(root / "images" / split / f"COCO_{split}_{i:012d}.jpg", quality=95)
        # Questions in the synthetic vocabulary (the tiny tokenizer's words): ask for the colour or for the shape.
        question, answer = ((f"a {obj.shape} that is", obj.color) if i % 2 else
                            (f"there is a {obj.color}", obj.shape))
        questions.append({"image_id": i, "question": question, "question_id": i})
        annotations.append({"question_type": "what", "multiple_choice_answer": answer, "image_id": i,
                            "answer_type": "other", "question_id": i,
                            "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": k + 1}
                                        for k in range(10)]})
    common = {"info": {}, "license": {}, "data_type": "mscoco", "data_subtype": split}
    q_path, a_path = root / f"{split}_questions.json", root / f"{split}_annotations.json"
    q_path.write_text(json.dumps({**common, "task_type": "Open-Ended", "questions": questions}))
    a_path.write_text(json.dumps({**common, "annotations": annotations}))
    return q_path, a_path


def _vqa_checkpoint_from_the_captioning_default(path) -> None:
    """A BLIP VQA checkpoint initialised from the embedded tiny BLIP captioning model, as BLIP's VQA model is from
    its pre-trained model: vision tower and answer decoder copied, the question encoder from the decoder's BERT."""
    from ptscale.config import ModelConfig
    from ptscale.models.backbone import ensure_default_backbone, load_backbone
    from ptscale.models.blip import model_class

    captioning = load_backbone(ensure_default_backbone(ModelConfig(preset="tiny-blip")))
    vqa = model_class("vqa")(captioning.model.config)
    state = captioning.model.state_dict()
    state |= {k.replace("text_decoder.bert.", "text_encoder.", 1): v for k, v in state.items()
              if k.startswith("text_decoder.bert.")}
    missing, unexpected = vqa.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    vqa.config.architectures = ["BlipForQuestionAnswering"]
    for thing in (vqa, captioning.tokenizer, captioning.image_processor):
        thing.save_pretrained(path)


@pytest.mark.slow
def test_blip_vqa_prefix_then_lora_two_ranks_zero3(tmp_path):
    _vqa_checkpoint_from_the_captioning_default(tmp_path / "blip-vqa")
    train_q, train_a = _synthetic_vqa(tmp_path, "train2014", 2048, 0)
    eval_q, eval_a = _synthetic_vqa(tmp_path, "val2014", 64, 0)
    launch([str(BIN / "deepspeed"), "--num_gpus", "2", "launchers/train.py", "--ds", "ds_configs/zero3.json",
            f"output_dir={tmp_path}", "run_name=vqa", f"model.path={tmp_path / 'blip-vqa'}", "plan=prefix->lora",
            "prefix.lengths={encoder: 8, decoder: 8}",
            "lora.targets={text_encoder: [attention.self.query, attention.self.value], "
            "text_decoder: [attention.self.query, attention.self.value]}",
            "data.name=vqav2", f"data.image_root={tmp_path / 'images'}", f"data.vqa_train_questions={train_q}",
            f"data.vqa_train_annotations={train_a}", f"data.vqa_eval_questions={eval_q}",
            f"data.vqa_eval_annotations={eval_a}", "data.train_size=0", "data.eval_size=0",
            "eval.max_new_tokens=3", "methods.prefix.evaluate=false", "methods.lora.epochs=3",
            "methods.lora.lr=2.0e-3", "checkpoint.every_steps=0"], timeout=1800)
    run = tmp_path / "vqa"
    results = json.loads((run / "results.json").read_text())
    points = {e["point"]: e["metrics"] for e in results["evaluations"]}
    assert list(points) == ["before training", "prefix+lora"]
    assert points["prefix+lora"]["VQA_accuracy"] > points["before training"]["VQA_accuracy"]
    assert changed_groups(run / "stage-1-prefix") == {"prefix"}
    assert changed_groups(run / "stage-2-prefix+lora") == {"prefix", "lora"}
