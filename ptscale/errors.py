"""The exceptions a user sees as one line (``ptscale.cli`` maps each to its exit code).

This module imports nothing from ptscale: every layer may raise these.
"""

from __future__ import annotations


class RecipeError(ValueError):
    """A recipe, an override, a DeepSpeed config or a command-line choice is invalid; the message names the
    key and the fix. Exit code 2."""


class RunDirError(RecipeError):
    """A run or checkpoint directory given on the command line is missing or unusable. Exit code 2."""


class DataError(RuntimeError):
    """An input file is unreadable or malformed (a truncated checkpoint or weight file, a corrupt data file);
    the message names the file and the fix. Exit code 3."""


class RunInterrupted(Exception):
    """SIGINT / SIGTERM stopped the run at a step boundary; the message names the newest checkpoint and the
    command that resumes it. Exit code 128 + the signal number (130, 143)."""

    def __init__(self, signum: int, message: str = "") -> None:
        super().__init__(message or f"interrupted by signal {signum}")
        self.signum = signum


class TrainingStopped(RuntimeError):
    """The run stopped itself (non-finite losses or weights); the message names the newest sound checkpoint.
    Exit code 1, one line, no traceback."""
