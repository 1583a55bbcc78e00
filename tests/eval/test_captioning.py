"""COCO caption metrics against the published clipscore_example scores, plus input and SPICE handling.

Each ``score_captions`` call starts METEOR's JVM (several seconds), so full scorings are shared in
module-scoped fixtures; the validation tests fail before any Java starts.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from ptscale.eval import captioning
from ptscale.eval.captioning import CaptionScores, ptb_tokenize, score_captions, spice_unavailable_reason

EXAMPLE = Path("/work/shared/testdata/clipscore_example")

# Published scores (testdata README, from the CLIPScore repository), 4 decimals.
PUBLISHED = {
    "good": {"Bleu_1": 0.6667, "Bleu_2": 0.4899, "Bleu_3": 0.3469, "Bleu_4": 0.0000, "METEOR": 0.3444,
             "ROUGE_L": 0.4280, "CIDEr": 0.5637},
    "bad": {"Bleu_1": 0.4815, "Bleu_2": 0.2404, "Bleu_3": 0.1359, "Bleu_4": 0.0000, "METEOR": 0.1861,
            "ROUGE_L": 0.3121, "CIDEr": 0.2790},
}

needs_example = pytest.mark.skipif(not EXAMPLE.is_dir(), reason="shared clipscore_example data not present")


def _load(name: str) -> dict:
    return json.loads((EXAMPLE / name).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def example_scores() -> dict[str, CaptionScores]:
    if not EXAMPLE.is_dir():
        pytest.fail(f"test data missing: {EXAMPLE} (shared/testdata must sit beside the checkout)")
    refs = _load("refs.json")
    spice_lib = sorted(p.name for p in (captioning.DEFAULT_SPICE_DIR / "lib").iterdir())
    scores = {kind: score_captions(_load(f"{kind}_captions.json"), refs) for kind in PUBLISHED}
    # Scoring must never fetch the CoreNLP jars: nothing appears in spice/lib, the downloader is not imported.
    assert sorted(p.name for p in (captioning.DEFAULT_SPICE_DIR / "lib").iterdir()) == spice_lib
    assert "pycocoevalcap.spice.get_stanford_models" not in sys.modules
    return scores


@needs_example
@pytest.mark.parametrize("kind", sorted(PUBLISHED))
def test_reproduces_published_scores(example_scores: dict[str, CaptionScores], kind: str) -> None:
    metrics = example_scores[kind].metrics
    for name, expected in PUBLISHED[kind].items():
        assert round(metrics[name], 4) == pytest.approx(expected, abs=1e-9), name


@needs_example
def test_per_image_scores_are_consistent_with_corpus(example_scores: dict[str, CaptionScores]) -> None:
    scores = example_scores["good"]
    assert scores.n_images == 2 and set(scores.per_image) == {"image1", "image2"}
    for per in scores.per_image.values():
        assert {"Bleu_4", "CIDEr", "METEOR", "ROUGE_L"} <= set(per)
    # CIDEr and ROUGE-L corpus scores are plain means of the per-image scores.
    for name in ("CIDEr", "ROUGE_L"):
        mean = sum(p[name] for p in scores.per_image.values()) / 2
        assert scores.metrics[name] == pytest.approx(mean, rel=1e-12)
    # Better candidates score higher image by image on CIDEr here.
    bad = example_scores["bad"]
    assert all(scores.per_image[i]["CIDEr"] > bad.per_image[i]["CIDEr"] for i in scores.per_image)


@needs_example
def test_spice_is_reported_never_silently_dropped(example_scores: dict[str, CaptionScores]) -> None:
    for scores in example_scores.values():
        # Exactly one of: computed, or listed as unavailable with the reason.
        assert ("SPICE" in scores.metrics) != ("SPICE" in scores.unavailable)
        if "SPICE" in scores.unavailable:
            assert "stanford-corenlp-3.6.0" in scores.unavailable["SPICE"]
        payload = json.loads(scores.to_json())
        assert payload["metrics"] == scores.metrics and payload["unavailable"] == scores.unavailable


def test_spice_reason_names_missing_jars(tmp_path: Path) -> None:
    reason = spice_unavailable_reason(tmp_path)
    assert reason is not None
    for jar in ("spice-1.0.jar", "lib/stanford-corenlp-3.6.0.jar", "lib/stanford-corenlp-3.6.0-models.jar"):
        assert jar in reason
    _fake_spice_dir(tmp_path)
    assert spice_unavailable_reason(tmp_path) is None


def _fake_spice_dir(root: Path) -> Path:
    # Files with the right names but no content: "present", yet java cannot run them.
    (root / "lib").mkdir(exist_ok=True)
    for rel in ("spice-1.0.jar", "lib/stanford-corenlp-3.6.0.jar", "lib/stanford-corenlp-3.6.0-models.jar"):
        (root / rel).write_bytes(b"")
    return root


def test_required_spice_fails_fast_when_missing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="stanford-corenlp-3.6.0"):
        score_captions({"a": "a cat"}, {"a": ["a cat"]}, spice=True, spice_dir=tmp_path)


@pytest.fixture(scope="module")
def empty_prediction_scores(tmp_path_factory: pytest.TempPathFactory) -> CaptionScores:
    refs = {"x": ["a dog runs on the grass.", "a brown dog running."],
            "y": ["two cats sleep on a sofa.", "cats sleeping together."],
            "z": ["a red bus on a street.", "a bus parked by the road."]}
    preds = {"x": "", "y": "two cats are sleeping.", "z": " ... "}
    spice_dir = _fake_spice_dir(tmp_path_factory.mktemp("spice"))
    return score_captions(preds, refs, spice_dir=spice_dir)


def test_empty_predictions_score_zero_and_are_listed(empty_prediction_scores: CaptionScores) -> None:
    scores = empty_prediction_scores
    assert scores.empty_predictions == ["x", "z"]
    for image in ("x", "z"):
        assert all(v == 0.0 for v in scores.per_image[image].values()), scores.per_image[image]
    assert scores.per_image["y"]["Bleu_1"] > 0.5 and scores.per_image["y"]["CIDEr"] > 0.0
    # Empties stay in the denominators.
    assert scores.metrics["ROUGE_L"] == pytest.approx(scores.per_image["y"]["ROUGE_L"] / 3)
    assert all(math.isfinite(v) for v in scores.metrics.values())


def test_broken_spice_install_is_reported_not_raised(empty_prediction_scores: CaptionScores) -> None:
    reason = empty_prediction_scores.unavailable["SPICE"]
    assert reason.startswith("SPICE jars present but SPICE failed")
    assert "SPICE" not in empty_prediction_scores.metrics


def test_prediction_ids_without_references_are_named() -> None:
    with pytest.raises(ValueError, match=r"2 prediction id\(s\) have no references: 'b', 'c'"):
        score_captions({"a": "x", "b": "y", "c": "z"}, {"a": ["x"]})


@pytest.mark.parametrize("refs", [{"a": []}, {"a": "a cat"}, {"a": ["a cat", None]}])
def test_malformed_references_are_rejected(refs: dict) -> None:
    with pytest.raises(ValueError, match="references for 'a'"):
        score_captions({"a": "a cat"}, refs)


def test_non_string_prediction_is_rejected() -> None:
    with pytest.raises(ValueError, match="expected str"):
        score_captions({"a": None}, {"a": ["a cat"]})  # type: ignore[dict-item]


def test_bad_spice_argument_is_rejected() -> None:
    with pytest.raises(ValueError, match="spice must be"):
        score_captions({"a": "a cat"}, {"a": ["a cat"]}, spice="yes")


def test_missing_java_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(captioning.shutil, "which", lambda _name: None)
    with pytest.raises(RuntimeError, match="`java` was not found on PATH"):
        score_captions({"a": "a cat"}, {"a": ["a cat"]})


def test_meteor_failure_is_reported_with_java_stderr(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(captioning, "_METEOR_JAR", tmp_path / "missing.jar")
    with pytest.raises(RuntimeError, match=r"METEOR process stopped \(exit 1\): .*missing\.jar"):
        score_captions({"a": "a cat"}, {"a": ["a cat", "one cat"]}, spice=False)


def test_tokenizer_failure_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(captioning, "_PTB_JAR", tmp_path / "missing.jar")
    with pytest.raises(RuntimeError, match=r"PTB tokeniser failed \(exit 1\)"):
        ptb_tokenize(["a cat"])


def test_tokenizer_matches_pycocoevalcap() -> None:
    captions = ["A man (left) rides a bike.", 'She said "hi!" -- twice...', "Café naïve; über-cool",
                "two\nlines", "Don't stop: it's 3.5 m/s, ok?", "UPPER case WORDS"]
    official = PTBTokenizer().tokenize({str(i): [{"caption": c}] for i, c in enumerate(captions)})
    assert ptb_tokenize(captions) == [official[str(i)][0] for i in range(len(captions))]


def test_tokenizer_keeps_alignment_across_odd_line_breaks() -> None:
    # pycocoevalcap only replaces "\n"; "\r", form feed and U+2028 end a line for the tokeniser too.
    captions = ["a\rb", "", "c\x0cd", "e\u2028f", "...", "g"]
    assert ptb_tokenize(captions) == ["a b", "", "c d", "e f", "", "g"]
