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
        import signal

        super().__init__(message or f"stopped by {signal.Signals(signum).name} before training started; nothing to "
                                    "resume: start the run again")
        self.signum = signum


class TrainingStopped(RuntimeError):
    """The run stopped itself (non-finite losses or weights); the message names the newest sound checkpoint.
    Exit code 1, one line, no traceback."""


class MalformedDataError(DataError, ValueError):
    """A data file that is not what the recipe says it is (not JSON, not a Karpathy split or official VQA
    file, an id twice); the message names the file. Exit code 3."""


def read_json_file(path, what: str):
    """A JSON file a recipe names, read in one place: unreadable or invalid JSON is one line naming the file."""
    import json
    from pathlib import Path

    path = Path(path)
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise MalformedDataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                                 f"expected {what}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MalformedDataError(f"{path}: cannot be read ({e}); expected {what}") from None
