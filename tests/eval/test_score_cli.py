"""``ptscale score caption|vqa`` through an argparse parser built the way ptscale/cli.py builds it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from ptscale.eval.score_cli import add_score_subparser, caption_predictions, caption_references, run_score

EXAMPLE = Path("/work/shared/testdata/clipscore_example")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ptscale")
    sub = parser.add_subparsers(dest="command")
    add_score_subparser(sub)
    return parser


def _run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    assert args.command == "score"
    return run_score(args)


def _write(path: Path, payload: object) -> Path:
    path.write_text(json.dumps(payload), encoding="utf-8")
    return path


# ---- caption ----------------------------------------------------------------------------------------------


def test_caption_reference_formats_agree() -> None:
    coco = {"images": [{"id": 1}, {"id": 2}],
            "annotations": [{"image_id": 1, "caption": "a", "id": 10},
                            {"image_id": 2, "caption": "b", "id": 11},
                            {"image_id": 1, "caption": "c", "id": 12}]}
    assert caption_references(coco) == {"1": ["a", "c"], "2": ["b"]}
    assert caption_references({1: ["a", "c"], "2": ["b"]}) == {"1": ["a", "c"], "2": ["b"]}
    with pytest.raises(ValueError, match="references must be"):
        caption_references([{"image_id": 1, "caption": "a"}])


def test_caption_predictions_format() -> None:
    assert caption_predictions([{"image_id": 7, "caption": "x"}]) == {"7": "x"}
    with pytest.raises(ValueError, match="more than one predicted caption"):
        caption_predictions([{"image_id": 7, "caption": "x"}, {"image_id": "7", "caption": "y"}])
    with pytest.raises(ValueError, match='need "image_id" and "caption"'):
        caption_predictions([{"image_id": 7}])


@pytest.mark.skipif(not EXAMPLE.is_dir(), reason="shared clipscore_example test data not present")
def test_caption_end_to_end_coco_formats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    refs = json.loads((EXAMPLE / "refs.json").read_text())
    good = json.loads((EXAMPLE / "good_captions.json").read_text())
    ids = {"image1": 101, "image2": 102}  # integer COCO ids, as in real result files
    pred = _write(tmp_path / "pred.json", [{"image_id": ids[k], "caption": c} for k, c in good.items()])
    ref = _write(tmp_path / "ref.json", {
        "images": [{"id": i} for i in ids.values()],
        "annotations": [{"image_id": ids[k], "caption": c, "id": n}
                        for n, (k, c) in enumerate((k, c) for k, cs in refs.items() for c in cs)],
    })
    out = tmp_path / "out" / "scores.json"
    assert _run(["score", "caption", "--pred", str(pred), "--ref", str(ref), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["task"] == "caption" and report["n_images"] == 2
    assert round(report["metrics"]["CIDEr"], 4) == 0.5637 and round(report["metrics"]["METEOR"], 4) == 0.3444
    assert set(report["per_image"]) == {"101", "102"}
    printed = capsys.readouterr().out
    assert "CIDEr    0.5637" in printed and "Bleu_1   0.6667" in printed


def test_caption_unknown_image_is_an_error_exit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pred = _write(tmp_path / "pred.json", [{"image_id": 5, "caption": "a cat"}])
    ref = _write(tmp_path / "ref.json", {"6": ["a cat"]})
    assert _run(["score", "caption", "--pred", str(pred), "--ref", str(ref)]) == 3  # data error
    assert "have no references: '5'" in capsys.readouterr().err


def test_invalid_json_is_an_error_exit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pred = tmp_path / "pred.json"
    pred.write_text("[{", encoding="utf-8")
    assert _run(["score", "caption", "--pred", str(pred), "--ref", str(pred)]) == 3  # data error
    assert "not valid JSON" in capsys.readouterr().err


# ---- vqa --------------------------------------------------------------------------------------------------


def _vqa_files(tmp_path: Path, results: list[dict]) -> list[str]:
    def answers(*values: str) -> list[dict]:
        return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(values)]

    annotations = {"annotations": [
        {"question_id": 1, "image_id": 10, "question_type": "is the", "answer_type": "yes/no",
         "multiple_choice_answer": "yes", "answers": answers(*["yes"] * 10)},
        {"question_id": 2, "image_id": 10, "question_type": "how many", "answer_type": "number",
         "multiple_choice_answer": "3", "answers": answers(*(["2"] * 3 + ["3"] * 7))},
    ]}
    questions = {"questions": [{"question_id": 1, "image_id": 10, "question": "Is the cat black?"},
                               {"question_id": 2, "image_id": 10, "question": "How many cats?"}]}
    return ["--pred", str(_write(tmp_path / "res.json", results)),
            "--questions", str(_write(tmp_path / "q.json", questions)),
            "--annotations", str(_write(tmp_path / "a.json", annotations))]


def test_vqa_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = [{"question_id": 1, "answer": "Yes", "answers": ["Yes", "no"]},
               {"question_id": 2, "answer": "two", "answers": ["two", "three"]}]
    out = tmp_path / "vqa.json"
    assert _run(["score", "vqa", *_vqa_files(tmp_path, results), "--top-k", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["accuracy"]["overall"] == pytest.approx(95.0)  # 100 and 90
    assert report["accuracy"]["per_answer_type"] == pytest.approx({"number": 90.0, "yes/no": 100.0})
    assert report["topk_accuracy"]["k"] == 2 and report["topk_accuracy"]["overall"] == pytest.approx(100.0)
    printed = capsys.readouterr().out
    assert "accuracy (always-normalise), 2 questions" in printed and "top-2 accuracy" in printed

    assert _run(["score", "vqa", *_vqa_files(tmp_path, results), "--official-2021", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["accuracy"]["overall"] == pytest.approx(45.0)  # "Yes" now scores 0


def test_vqa_unknown_question_is_an_error_exit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = [{"question_id": 1, "answer": "yes"}, {"question_id": 99, "answer": "no"}]
    assert _run(["score", "vqa", *_vqa_files(tmp_path, results)]) == 3  # data error
    assert "not in the annotations: [99]" in capsys.readouterr().err


def test_vqa_top_k_needs_ranked_answers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = [{"question_id": 1, "answer": "yes"}]
    assert _run(["score", "vqa", *_vqa_files(tmp_path, results), "--top-k", "5"]) == 3  # data error
    assert "ranked 'answers' list" in capsys.readouterr().err


def test_vqa_require_all(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = [{"question_id": 1, "answer": "yes"}]
    assert _run(["score", "vqa", *_vqa_files(tmp_path, results)]) == 0
    assert "1 annotated questions without prediction" in capsys.readouterr().out
    assert _run(["score", "vqa", *_vqa_files(tmp_path, results), "--require-all"]) == 3  # data error
