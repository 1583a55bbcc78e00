"""Two tiny saved runs, trained once per test session, for the eval / analyze / report tests.

``a``: the default plan (prefix -> prefix+lora); ``b``: ``plan=prefix``. Both train a few steps on a small
synthetic split and evaluate greedily at their last stage. Import the fixtures into a test module:

    from tests.runs_fixture import analysed_runs, tiny_runs  # noqa: F401

pytest makes one fixture definition per importing module, so a session-scoped fixture alone would train
once per module; the work is therefore cached per process (keyed by the session's ``tmp_path_factory``)
and every module gets the same directories.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["eval.before_training=false", "eval.num_beams=1", "data.train_size=16", "checkpoint.every_steps=0",
        "methods.prefix.steps=2", "methods.prefix.batch_size=4"]
# b's odd eval split makes a 2-rank evaluation pad its shards (one duplicate record to drop).
PLANS = {"a": ["data.eval_size=16", "methods.prefix.evaluate=false", "methods.lora.steps=2",
               "methods.lora.batch_size=4"],
         "b": ["data.eval_size=15", "plan=prefix"]}
TRAIN_TIMEOUT_S = 600


@dataclass(frozen=True)
class TinyRuns:
    a: Path  # prefix -> prefix+lora
    b: Path  # prefix only

    @property
    def all(self) -> list[Path]:
        return [self.a, self.b]


def _train_both(root: Path) -> TinyRuns:
    """Both runs at once (two processes): most of each run is start-up, which overlaps well."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONUNBUFFERED"] = "1"
    procs = {}
    for name, extra in PLANS.items():
        log = (root / f"{name}.log").open("w")
        cmd = [sys.executable, "launchers/train.py", f"output_dir={root}", f"run_name={name}", *TINY, *extra]
        procs[name] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log)
    for name, (proc, log) in procs.items():
        try:
            code = proc.wait(timeout=TRAIN_TIMEOUT_S)
        finally:
            log.close()
        assert code == 0, (root / f"{name}.log").read_text()[-5000:]
    return TinyRuns(root / "a", root / "b")


_CACHE: dict[tuple[int, str], object] = {}  # (id of the session's factory, what) -> result


def _runs_once(factory: pytest.TempPathFactory) -> TinyRuns:
    key = (id(factory), "runs")
    if key not in _CACHE:
        _CACHE[key] = _train_both(factory.mktemp("tiny_runs"))
    return _CACHE[key]


def _analysis_once(factory: pytest.TempPathFactory) -> Path:
    """``ptscale analyze`` of both runs against the pre-trained backbone (also writes RUN_DIR/analysis.json)."""
    from ptscale.analysis.analyze import AnalyzeRequest, analyze_runs

    key = (id(factory), "analysis")
    if key not in _CACHE:
        runs = _runs_once(factory)
        out = factory.mktemp("analysis")
        analyze_runs(AnalyzeRequest(run_dirs=runs.all, batch_size=8, out_dir=out))
        _CACHE[key] = out
    return _CACHE[key]


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> TinyRuns:
    return _runs_once(tmp_path_factory)


@pytest.fixture(scope="session")
def analysed_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[TinyRuns, Path]:
    """The two runs and the directory holding their combined analysis.json and spectrum_*.png."""
    return _runs_once(tmp_path_factory), _analysis_once(tmp_path_factory)
