"""What a run prints: ptscale's own events at INFO (one plain line each, rank 0), progress bars on rank 0,
warnings as warnings, and the library messages that never concern the user's run silenced at their source.

Verbosity: ``quiet`` (warnings and errors only, no progress bars), ``default`` (ptscale's events and
progress bars, library warnings), ``verbose`` (DEBUG for ptscale, INFO for libraries, nothing silenced).
Light on purpose (no torch): the CLI sets it up before the recipe is read.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings
from collections.abc import Iterable, Iterator
from typing import Any, Literal

from tqdm import tqdm

Verbosity = Literal["quiet", "default", "verbose"]
_verbosity: Verbosity = "default"

# (logger, start of its message format string): emitted at import or set-up on every run, about nothing the
# user chose. Matched on the format string (``record.msg``), so only these exact messages are dropped.
SILENCED_LOGS: tuple[tuple[str, str], ...] = (
    # DeepSpeed's accelerator auto-detection on a machine without one; the CPU path is intended here, and
    # DeepSpeed's own logger (own handler, levels reset at its import) cannot be quietened otherwise.
    ("DeepSpeed", "Setting accelerator to CPU"),
    # peft imports bitsandbytes whenever it is installed; its CPU backend then looks for an optional fast
    # 4-bit kernel from the Hub package `kernels`, even when nothing is quantised.
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
)

# (message regex, category, module regex): DeepSpeed ZeRO-3 calls the deprecated collective names on every
# step; torch warns per call (and per rank), which is about DeepSpeed's code, not the user's run.
SILENCED_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    (r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated", FutureWarning,
     r"torch\.distributed\.c10d_logger"),
)


class _DropMessages(logging.Filter):
    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(self.starts))


class _TqdmHandler(logging.StreamHandler):
    """Writes through ``tqdm.write`` so a log line does not break a progress bar that is on screen."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # logging's contract: a failing handler reports, never raises into the caller
            self.handleError(record)


class _Formatter(logging.Formatter):
    """ptscale's INFO events as plain lines; warnings and errors say what they are and who raised them."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        if record.levelno == logging.INFO and (record.name == "ptscale" or record.name.startswith("ptscale.")):
            return message
        return f"{record.levelname} {record.name}: {message}"


def is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


def setup_logging(verbosity: Verbosity = "default") -> None:
    """Configure the root handler, levels and silenced messages for this process (every rank calls it)."""
    global _verbosity
    _verbosity = verbosity
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _TqdmHandler):
            root.removeHandler(handler)
    handler = _TqdmHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    root.addHandler(handler)
    main = is_main_rank()
    own = {"quiet": logging.WARNING, "default": logging.INFO, "verbose": logging.DEBUG}[verbosity]
    libraries = logging.INFO if verbosity == "verbose" else logging.WARNING
    # other ranks: errors only (their warnings repeat rank 0's, and their events are rank 0's too)
    root.setLevel(libraries if main else logging.ERROR)
    logging.getLogger("ptscale").setLevel(own if main else logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if verbosity != "verbose":
        silence_known_noise()
        # transformers' "Loading weights" bar for a local checkpoint of a few hundred tensors: a flash of noise
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def silence_known_noise() -> None:
    """Install the filters for :data:`SILENCED_LOGS` and :data:`SILENCED_WARNINGS` (before the libraries load:
    logger filters stay on the logger object that the library later fetches by name)."""
    by_logger: dict[str, tuple[str, ...]] = {}
    for name, start in SILENCED_LOGS:
        by_logger[name] = (*by_logger.get(name, ()), start)
    for name, starts in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(starts))
    for message, category, module in SILENCED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def verbosity() -> Verbosity:
    return _verbosity


def progress(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "",
             leave: bool = True, rank: int | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar on rank 0 (``rank``: the caller's rank when it knows it better than the environment);
    none with ``--quiet``."""
    on_main = is_main_rank() if rank is None else rank == 0
    return tqdm(iterable, total=total, desc=desc, leave=leave, dynamic_ncols=True,
                disable=not on_main or _verbosity == "quiet", **kwargs)


# Lines libraries print (not log) that say nothing about the user's run: dropped from stdout unless --verbose.
SILENCED_PRINTS = ("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully",)


@contextlib.contextmanager
def without_known_prints() -> Iterator[None]:
    """Run a library call with its known noise lines (:data:`SILENCED_PRINTS`) taken out of its stdout."""
    if _verbosity == "verbose":
        yield
        return
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            yield
    finally:
        kept = [line for line in captured.getvalue().splitlines(keepends=True)
                if not line.strip().startswith(SILENCED_PRINTS)]
        sys.stdout.write("".join(kept))
