"""COCO-caption metrics: BLEU-1..4, METEOR, ROUGE-L, CIDEr(-D) and, where it can run, SPICE.

The numbers are those of pycocoevalcap's ``COCOEvalCap.evaluate()``: captions are PTB-tokenised with the
Stanford CoreNLP 3.4.1 jar shipped in pycocoevalcap (lower-cased, punctuation tokens dropped), then the
package's own scorers run on the tokenised text. ``COCOEvalCap.evaluate()`` itself is not used because it
always constructs SPICE, whose constructor downloads Stanford CoreNLP 3.6.0 when the jars are missing.

The three Java steps (tokeniser, METEOR, SPICE) are driven here rather than through the package's wrappers,
with the same jars and command lines, so that a missing ``java``, a crashed JVM or a line-count mismatch
raises a clear error instead of hanging or silently mis-aligning captions, and so that no temporary file is
written into site-packages. ``tests/eval/test_captioning.py`` checks that the tokeniser wrapper agrees with
pycocoevalcap's ``PTBTokenizer`` and that the published clipscore_example scores are reproduced.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor import meteor as _meteor_module
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer as _ptb_module

# Metric names exactly as pycocoevalcap reports them.
BLEU_NAMES: tuple[str, ...] = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4")

_PACKAGE_DIR = Path(_ptb_module.__file__).resolve().parent.parent
_PTB_JAR = _PACKAGE_DIR / "tokenizer" / _ptb_module.STANFORD_CORENLP_3_4_1_JAR
_METEOR_DIR = _PACKAGE_DIR / "meteor"
_METEOR_JAR = _METEOR_DIR / _meteor_module.METEOR_JAR
# Not imported from pycocoevalcap.spice: that module is the one that downloads CoreNLP.
DEFAULT_SPICE_DIR = _PACKAGE_DIR / "spice"
_SPICE_JAR = "spice-1.0.jar"
_SPICE_CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")

# Generous upper bounds: tokenising 25k COCO captions takes seconds; SPICE on 5k images takes minutes.
_PTB_TIMEOUT_S = 600.0
_SPICE_TIMEOUT_S = 3600.0
_STDERR_TAIL_CHARS = 2000


@dataclass
class CaptionScores:
    """Corpus-level metrics, the metrics that could not be computed (with why), and per-image scores.

    ``metrics`` values are on pycocoevalcap's scale (0..1; CIDEr 0..10), not multiplied by 100.
    """

    metrics: dict[str, float]
    unavailable: dict[str, str]
    per_image: dict[str, dict[str, float]]
    n_images: int
    # Images whose prediction was empty (or only punctuation): scored 0 on every metric, kept in the means.
    empty_predictions: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


# ----------------------------------------------------------------------------------------------------------
# Java helpers
# ----------------------------------------------------------------------------------------------------------


def _require_java() -> str:
    java = shutil.which("java")
    if java is None:
        raise RuntimeError(
            "`java` was not found on PATH: PTB tokenisation and METEOR (pycocoevalcap) need a Java runtime "
            "(>= 8). Install one (e.g. `apt-get install default-jre-headless`) or put it on PATH."
        )
    return java


def _tail(text: str | bytes | None) -> str:
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return text.strip()[-_STDERR_TAIL_CHARS:]


def ptb_tokenize(sentences: Sequence[str]) -> list[str]:
    """PTB-tokenise sentences exactly as pycocoevalcap's ``PTBTokenizer`` does, one output per input.

    Same jar, same flags (``-preserveLines -lowerCase``) and same punctuation filter. Differences are in
    robustness only: every kind of line break inside a caption becomes a space (the tokeniser treats ``\\r``,
    form feeds and U+2028 as line ends, which would shift every later caption), empty captions are not sent
    to Java, and the number of output lines is checked.
    """
    one_line = [" ".join(s.splitlines()) for s in sentences]
    out = [""] * len(one_line)
    todo = [i for i, s in enumerate(one_line) if s.strip()]
    if not todo:
        return out
    java = _require_java()
    with tempfile.TemporaryDirectory(prefix="ptscale_ptb_") as tmp:
        path = Path(tmp) / "captions.txt"
        path.write_text("\n".join(one_line[i] for i in todo), encoding="utf-8")
        cmd = [java, "-cp", str(_PTB_JAR), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
               "-lowerCase", str(path)]
        proc = subprocess.run(cmd, capture_output=True, timeout=_PTB_TIMEOUT_S, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"PTB tokeniser failed (exit {proc.returncode}): {_tail(proc.stderr)}")
    lines = proc.stdout.decode("utf-8").split("\n")
    # A trailing newline in the output yields one extra empty element.
    while len(lines) > len(todo) and lines[-1] == "":
        lines.pop()
    if len(lines) != len(todo):
        raise RuntimeError(f"PTB tokeniser returned {len(lines)} lines for {len(todo)} captions")
    for i, line in zip(todo, lines, strict=True):
        out[i] = " ".join(w for w in line.rstrip().split(" ") if w not in _ptb_module.PUNCTUATIONS)
    return out


class _MeteorProcess:
    """One METEOR 1.5 JVM in ``-stdio`` mode, spoken to line by line as pycocoevalcap's ``Meteor`` does.

    Line by line (write one request, read its answer) so neither pipe can fill up and deadlock. stderr goes
    to a temporary file, not a pipe, for the same reason; it is quoted when the JVM dies.
    """

    def __init__(self, java: str) -> None:
        self._stderr: IO[bytes] = tempfile.TemporaryFile()
        cmd = [java, "-jar", "-Xmx2G", str(_METEOR_JAR), "-", "-", "-stdio", "-l", "en", "-norm"]
        try:
            self._proc = subprocess.Popen(cmd, cwd=_METEOR_DIR, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=self._stderr)
        except OSError:
            self._stderr.close()
            raise

    def __enter__(self) -> _MeteorProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._proc.stdin is not None and not self._proc.stdin.closed:
            try:
                self._proc.stdin.close()
            except BrokenPipeError:
                pass
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._stderr.close()

    def _died(self) -> RuntimeError:
        # stdout closed: the JVM is exiting; give it a moment so its exit code and stderr are complete.
        try:
            code: int | None = self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        self._stderr.seek(0)
        return RuntimeError(f"METEOR process stopped (exit {code}): {_tail(self._stderr.read())}")

    def _write(self, line: str) -> None:
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(f"{line}\n".encode())
            self._proc.stdin.flush()
        except BrokenPipeError as err:
            raise self._died() from err

    def _readline(self) -> str:
        assert self._proc.stdout is not None
        raw = self._proc.stdout.readline()
        if not raw:
            raise self._died()
        return raw.decode().strip()

    def score(self, hypotheses: Sequence[str], references: Sequence[Sequence[str]]
              ) -> tuple[float, list[float]]:
        """Corpus and per-segment METEOR, computed from sufficient statistics like the official code."""
        stats = []
        for hyp, refs in zip(hypotheses, references, strict=True):
            # Same sanitising as pycocoevalcap: only the hypothesis is cleaned of the field separator.
            hyp = hyp.replace("|||", "").replace("  ", " ")
            self._write(" ||| ".join(("SCORE", " ||| ".join(refs), hyp)))
            stats.append(self._readline())
        self._write("EVAL" + "".join(f" ||| {s}" for s in stats))
        per_segment = [float(self._readline()) for _ in stats]
        return float(self._readline()), per_segment


# ----------------------------------------------------------------------------------------------------------
# SPICE
# ----------------------------------------------------------------------------------------------------------


def spice_unavailable_reason(spice_dir: Path = DEFAULT_SPICE_DIR) -> str | None:
    """Why SPICE cannot run from ``spice_dir`` (None when its jars are all there). Never downloads."""
    missing = [name for name in (_SPICE_JAR,) if not (spice_dir / name).is_file()]
    missing += [f"lib/{name}" for name in _SPICE_CORENLP_JARS if not (spice_dir / "lib" / name).is_file()]
    if missing:
        return (f"SPICE needs {', '.join(missing)} in {spice_dir} (Stanford CoreNLP 3.6.0, which "
                "pycocoevalcap would download at first use); not present, so SPICE was not computed")
    if shutil.which("java") is None:
        return "SPICE needs `java` on PATH"
    return None


def _run_spice(ids: Sequence[str], hyps: Sequence[str], refs: Sequence[Sequence[str]],
               spice_dir: Path) -> tuple[float, list[float]]:
    """Run spice-1.0.jar like pycocoevalcap's ``Spice.compute_score``; raises RuntimeError on failure.

    Differences: temporary files live in a private temp dir, not in site-packages; ``-cache`` is not passed
    because its LMDB/FST cache is what fails on Java >= 9 (tylin/coco-caption#59); it only saves re-parsing.
    """
    java = _require_java()
    with tempfile.TemporaryDirectory(prefix="ptscale_spice_") as tmp:
        in_path, out_path = Path(tmp) / "input.json", Path(tmp) / "output.json"
        records = [{"image_id": i, "test": h, "refs": list(r)}
                   for i, h, r in zip(ids, hyps, refs, strict=True)]
        in_path.write_text(json.dumps(records), encoding="utf-8")
        cmd = [java, "-jar", "-Xmx8G", _SPICE_JAR, str(in_path), "-out", str(out_path), "-subset", "-silent"]
        try:
            proc = subprocess.run(cmd, cwd=spice_dir, capture_output=True, timeout=_SPICE_TIMEOUT_S,
                                  check=False)
        except subprocess.TimeoutExpired as err:
            raise RuntimeError(f"SPICE did not finish within {_SPICE_TIMEOUT_S:.0f} s") from err
        if proc.returncode != 0 or not out_path.is_file():
            detail = _tail(proc.stderr) or _tail(proc.stdout)
            raise RuntimeError(f"SPICE failed (exit {proc.returncode}): {detail}")
        results = json.loads(out_path.read_text(encoding="utf-8"))
    by_id = {str(item["image_id"]): _as_float(item["scores"]["All"]["f"]) for item in results}
    per_image = [by_id[i] for i in ids]
    return sum(per_image) / len(per_image), per_image


def _as_float(value: Any) -> float:
    # SPICE writes "NaN"/null for captions whose scene graph is empty; keep that visible as NaN.
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


# ----------------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------------


def _validate(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> list[str]:
    if not predictions:
        raise ValueError("no predictions to score")
    ids = list(predictions)
    missing = [i for i in ids if i not in references]
    if missing:
        shown = ", ".join(map(repr, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise ValueError(f"{len(missing)} prediction id(s) have no references: {shown}")
    for i in ids:
        if not isinstance(predictions[i], str):
            raise ValueError(f"prediction for {i!r} is {type(predictions[i]).__name__}, expected str")
        refs = references[i]
        if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"references for {i!r} must be a non-empty list of strings, got {refs!r}")
    return ids


# The SPICE choices of every command (``ptscale eval --spice``, ``ptscale score caption --spice``) and of
# ``score_captions(spice=...)``: defined once, so a listed choice is always an accepted one.
SPICE_CHOICES = ("auto", "require", "off")


def _spice_mode(spice: bool | str) -> str:
    if spice is True:
        return "require"
    if spice is False:
        return "off"
    if spice in SPICE_CHOICES:
        return spice
    raise ValueError(f"spice must be True, False or one of {', '.join(map(repr, SPICE_CHOICES))}, got {spice!r}")


def score_captions(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    *,
    spice: bool | str = "auto",
    spice_dir: Path = DEFAULT_SPICE_DIR,
) -> CaptionScores:
    """Score one caption per image against its references with the COCO caption metrics.

    Args:
        predictions: image id -> generated caption. Exactly these images are evaluated; CIDEr's document
            frequencies come from their references only (as in COCOEvalCap), so scoring a single image gives
            CIDEr 0 (a warning is recorded).
        references: image id -> human captions. Ids not in ``predictions`` are ignored.
        spice: ``"auto"`` computes SPICE when its CoreNLP 3.6.0 jars are present and it runs, otherwise
            lists it in ``unavailable`` with the reason; ``True``/``"require"`` raises instead;
            ``False`` skips it.
        spice_dir: where spice-1.0.jar and lib/ live (pycocoevalcap's folder by default).

    Empty predictions (or ones that are only punctuation) are legitimate model outputs: they score 0 on
    every metric, count in the means, and their ids are listed in ``empty_predictions``. A reference that
    is empty after tokenisation is a data error and raises ValueError.
    """
    mode = _spice_mode(spice)
    ids = _validate(predictions, references)
    _require_java()  # fail before any work if the tokeniser cannot run
    # Checked up front so that spice=True fails before minutes of scoring, not after.
    if mode == "off":
        spice_reason: str | None = "disabled by the caller (spice off)"
    else:
        spice_reason = spice_unavailable_reason(spice_dir)
    if mode == "require" and spice_reason is not None:
        raise RuntimeError(spice_reason)

    ref_counts = [len(references[i]) for i in ids]
    flat = [predictions[i] for i in ids] + [r for i in ids for r in references[i]]
    tokens = ptb_tokenize(flat)
    hyps = tokens[: len(ids)]
    refs: list[list[str]] = []
    start = len(ids)
    for n in ref_counts:
        refs.append(tokens[start: start + n])
        start += n
    empty_refs = [i for i, r in zip(ids, refs, strict=True) if any(not s for s in r)]
    if empty_refs:
        raise ValueError(f"empty reference caption(s) (after PTB tokenisation) for ids: {empty_refs[:10]}")

    gts = {i: r for i, r in zip(ids, refs, strict=True)}
    res = {i: [h] for i, h in zip(ids, hyps, strict=True)}
    metrics: dict[str, float] = {}
    per_image: dict[str, dict[str, float]] = {i: {} for i in ids}

    bleu, bleu_per = Bleu(4).compute_score(gts, res, verbose=0)
    for name, corpus, scores in zip(BLEU_NAMES, bleu, bleu_per, strict=True):
        _record(metrics, per_image, ids, name, corpus, scores)

    with _MeteorProcess(_require_java()) as meteor:
        corpus, scores = meteor.score(hyps, refs)
    _record(metrics, per_image, ids, "METEOR", corpus, scores)

    # pycocoevalcap's Rouge divides by the candidate length, so an empty candidate is scored 0 here;
    # corpus ROUGE-L is the mean of per-image scores exactly as in Rouge.compute_score.
    rouge = Rouge()
    rouge_per = [rouge.calc_score([h], r) if h else 0.0 for h, r in zip(hyps, refs, strict=True)]
    _record(metrics, per_image, ids, "ROUGE_L", sum(rouge_per) / len(rouge_per), rouge_per)

    cider, cider_per = Cider().compute_score(gts, res)
    _record(metrics, per_image, ids, "CIDEr", cider, list(cider_per))

    if spice_reason is None:
        try:
            corpus, scores = _run_spice(ids, hyps, refs, spice_dir)
            _record(metrics, per_image, ids, "SPICE", corpus, scores)
        except (RuntimeError, OSError, ValueError, KeyError) as err:
            spice_reason = f"SPICE jars present but SPICE failed: {err}"
            if mode == "require":
                raise RuntimeError(spice_reason) from err
    unavailable = {} if spice_reason is None else {"SPICE": spice_reason}

    warnings = []
    if len(ids) == 1:
        warnings.append("CIDEr uses document frequencies over the evaluated images: with one image it is 0")
    empty = [i for i, h in zip(ids, hyps, strict=True) if not h]
    return CaptionScores(metrics, unavailable, per_image, len(ids), empty, warnings)


def _record(metrics: dict[str, float], per_image: dict[str, dict[str, float]], ids: Sequence[str], name: str,
            corpus: float, scores: Sequence[float]) -> None:
    metrics[name] = float(corpus)
    for i, s in zip(ids, scores, strict=True):
        per_image[i][name] = float(s)
