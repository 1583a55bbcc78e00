"""Quiet by default: ptscale's events as plain lines, real warnings as warnings, and the library messages that do not
concern the user's run silenced at their source, only those (ptscale.console)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from ptscale import console

ROOT = Path(__file__).resolve().parents[1]
LIBRARY_NOISE = ("FutureWarning", "Setting accelerator", "bitsandbytes", "kernels-community", "DeprecationWarning")


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.getLogger("ptscale").level)
    yield
    for handler in list(root.handlers):
        if handler not in saved[0]:
            root.removeHandler(handler)
    root.setLevel(saved[1])
    logging.getLogger("ptscale").setLevel(saved[2])
    console.setup_logging.__globals__["_verbosity"] = "default"


def _record(name: str, level: int, msg: str) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, None, None)


def test_only_the_named_library_messages_are_dropped(restore_logging):
    console.setup_logging("default")
    for name, start in console.SILENCED_LOGS:
        logger = logging.getLogger(name)
        assert not logger.filter(_record(name, logging.WARNING, start + " and the rest of it"))
        assert logger.filter(_record(name, logging.WARNING, "something else went wrong"))  # still shown
    with warnings.catch_warnings(record=True) as caught:
        console.silence_known_noise()
        warnings.warn_explicit("`torch.distributed.reduce_scatter_tensor` is deprecated. Please use ...",
                               FutureWarning, "c10d_logger.py", 83, module="torch.distributed.c10d_logger")
        warnings.warn_explicit("`torch.distributed.all_gather_into_tensor` is deprecated.", FutureWarning,
                               "c10d_logger.py", 83, module="torch.distributed.c10d_logger")
        warnings.warn_explicit("something else is deprecated", FutureWarning, "c10d_logger.py", 83,
                               module="torch.distributed.c10d_logger")
        warnings.warn_explicit("`torch.distributed.reduce_scatter_tensor` is deprecated.", FutureWarning,
                               "mine.py", 1, module="my_code")  # the same words from elsewhere still show
    assert [str(w.message) for w in caught] == ["something else is deprecated",
                                                "`torch.distributed.reduce_scatter_tensor` is deprecated."]


def test_events_are_plain_lines_and_warnings_say_what_they_are(restore_logging, capsys):
    console.setup_logging("default")
    logging.getLogger("ptscale.models.backbone").info("default backbone ready in 3 s")
    logging.getLogger("ptscale.models.backbone").debug("not shown by default")
    logging.getLogger("ptscale.config").warning("prefix.lengths ignored")
    logging.getLogger("some.library").info("library chatter")
    err = capsys.readouterr().err.splitlines()
    assert err == ["default backbone ready in 3 s", "WARNING ptscale.config: prefix.lengths ignored"]


def test_quiet_keeps_warnings_and_verbose_adds_debug(restore_logging, capsys):
    console.setup_logging("quiet")
    logging.getLogger("ptscale.x").info("an event")
    logging.getLogger("ptscale.x").warning("a warning")
    assert capsys.readouterr().err.splitlines() == ["WARNING ptscale.x: a warning"]
    assert console.progress(range(3)).disable
    console.setup_logging("verbose")
    logging.getLogger("ptscale.x").debug("a detail")
    logging.getLogger("some.library").info("library chatter")
    assert capsys.readouterr().err.splitlines() == ["DEBUG ptscale.x: a detail", "INFO some.library: library chatter"]
    assert not console.progress(range(3)).disable


def test_other_ranks_print_errors_only(restore_logging, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    console.setup_logging("default")
    logging.getLogger("ptscale.x").warning("rank 0 says this")
    logging.getLogger("ptscale.x").error("a rank's own failure")
    assert capsys.readouterr().err.splitlines() == ["ERROR ptscale.x: a rank's own failure"]
    assert console.progress(range(3)).disable


def _non_bar_lines(output: str) -> list[str]:
    """Lines as a terminal leaves them: progress-bar redraws (carriage returns) collapse into their last state."""
    lines = []
    for line in output.splitlines():
        last = line.split("\r")[-1].strip()
        if last and not re.search(r"\d+/\d+ \[", last):  # a tqdm bar's "n/total [elapsed" part
            lines.append(last)
    return lines


@pytest.mark.slow
def test_a_default_run_prints_no_library_warnings(tmp_path):
    """The README's first command, small (python launcher: the deepspeed launcher's own lines come from its
    process, before ptscale runs). About 40 s on a 2-core machine with the default backbone cached."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    cmd = [sys.executable, "launchers/train.py", "--ds", "ds_configs/zero3.json", f"output_dir={tmp_path}",
           "methods.prefix.epochs=1", "methods.lora.epochs=1", "data.train_size=32", "data.eval_size=8",
           "eval.num_beams=1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for noise in LIBRARY_NOISE:
        assert noise not in out, out
    lines = _non_bar_lines(proc.stdout) + _non_bar_lines(proc.stderr)
    library_warnings = [x for x in lines if re.match(r"(WARNING|\[20\d\d-)", x) and "ptscale" not in x]
    assert not library_warnings, out
    assert len(lines) <= 25, "\n".join(lines)  # one screen, progress bars apart
    summary = next(x for x in lines if "plan prefix->lora" in x)
    # data.eval_size is per evaluation group: test, gen/ and ret/ make 24
    assert "tiny-blip2-opt" in summary and "32 train / 24 eval" in summary and str(tmp_path) in summary
    assert _non_bar_lines(proc.stdout)[-1].startswith("run directory: ")
