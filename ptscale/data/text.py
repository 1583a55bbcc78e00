"""Text data for language models, read through ``datasets``: local JSONL / JSON / Parquet / CSV files or a
directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``.

Columns (named in the recipe): ``prompt`` + ``completion`` (the loss on the completion only), or ``text``
(plain language modelling). Records are checked when the split is loaded, before any model exists: an empty
completion / text or a record longer than ``data.max_text_len`` tokens is bad data (``data.on_bad_data``:
error naming the file and the record, exit 3; or skip and count). A file that cannot be read, a missing
column or split, and an empty split are data errors (exit 3).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import datasets

from ptscale.config import DataConfig
from ptscale.data.bad_data import BadDataReport, BadRecord, EmptySplitError, reject
from ptscale.data.text_collate import TextCollator
from ptscale.errors import DataError, RecipeError

log = logging.getLogger(__name__)

READERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """datasets logs a failed parse itself (ERROR) before raising; the run reports it in one line instead."""
    level = datasets.utils.logging.get_verbosity()
    bars = datasets.utils.is_progress_bar_enabled()
    datasets.utils.logging.set_verbosity(logging.CRITICAL + 1)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.utils.logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


def _root_cause(e: BaseException) -> str:
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    return (str(e).splitlines() or [type(e).__name__])[0]


def read_table(path: str | Path, split: str, key: str) -> datasets.Dataset:
    """One split as a ``datasets.Dataset``, in memory (its arrow cache goes to a temporary directory)."""
    path = Path(path)
    with _quiet_datasets():
        if path.is_dir():
            return _saved_split(path, split, key)
        reader = READERS.get(path.suffix.lower())
        if reader is None:
            raise DataError(f"data.{key}: {path} has suffix {path.suffix!r}; give a {', '.join(READERS)} file or a "
                            "datasets save_to_disk directory")
        if _blank(path):  # datasets cannot infer a schema from nothing: an empty split, said as such
            raise EmptySplitError(split, path, "it holds no records (the file is empty)")
        with tempfile.TemporaryDirectory(prefix="ptscale-text-") as cache:
            try:
                return getattr(datasets.Dataset, f"from_{reader}")(str(path), cache_dir=cache, keep_in_memory=True)
            except Exception as e:  # noqa: BLE001 -- pyarrow / datasets raise many types for a malformed file
                raise DataError(f"data.{key}: {path} cannot be read as {reader} ({_root_cause(e)}); fix the file "
                                "(JSONL: one JSON object per line)") from None


def _blank(path: Path) -> bool:
    """Only whitespace (read until the first other byte)."""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return False
    return True


def _saved_split(path: Path, split: str, key: str) -> datasets.Dataset:
    try:
        saved = datasets.load_from_disk(str(path), keep_in_memory=True)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"data.{key}: {path} is not a datasets save_to_disk directory ({_root_cause(e)})") from None
    if isinstance(saved, datasets.Dataset):
        return saved
    if split not in saved:
        raise DataError(f"data.{key}: {path} has no split {split!r} (its splits: {', '.join(saved)}); set "
                        f"data.{'train_split' if key == 'train_file' else 'eval_split'}")
    return saved[split]


def text_format(table: datasets.Dataset, cfg: DataConfig, where: str) -> tuple[str, ...]:
    """The columns a file's records are read from: (prompt, completion) or (text,)."""
    columns = table.column_names
    if cfg.completion_column in columns:
        if cfg.prompt_column not in columns:
            raise DataError(f"{where}: has the completion column {cfg.completion_column!r} but no prompt column "
                            f"{cfg.prompt_column!r} (columns: {', '.join(columns)}); set data.prompt_column")
        return cfg.prompt_column, cfg.completion_column
    if cfg.text_column in columns:
        return (cfg.text_column,)
    raise DataError(f"{where}: no column {cfg.completion_column!r} (with {cfg.prompt_column!r}) or "
                    f"{cfg.text_column!r} (columns: {', '.join(columns) or 'none'}); set data.completion_column / "
                    "data.prompt_column or data.text_column")


def load_text_split(cfg: DataConfig, collator: TextCollator, which: str) -> tuple[list[dict], BadDataReport]:
    """``which``: "train" or "eval". Records ``{"id", "prompt", "completion"}`` or ``{"id", "text"}``, the
    first ``data.<which>_size`` (0: all) of them after dropping bad ones (skip mode)."""
    key = f"{which}_file"
    path = getattr(cfg, key) or cfg.train_file  # a saved dataset directory holds both splits
    split = cfg.train_split if which == "train" else cfg.eval_split
    table = read_table(path, split, key)
    where = f"data.{key} {path}" + (f" split {split!r}" if Path(path).is_dir() else "")
    columns = text_format(table, cfg, where)
    cap = getattr(cfg, f"{which}_size")
    report, records = BadDataReport(), []
    for i, row in enumerate(table.select_columns(list(columns))):
        if cap and len(records) >= cap:
            break
        try:
            records.append(_record(row, columns, i, collator, cfg, path, where))
        except BadRecord as bad:
            reject(bad, cfg.on_bad_data, report)
    report.kept = len(records)
    if report.counts:
        log.warning("%s: skipped %s", where, report.summary())
    if not records:
        detail = f"every record was bad: {report.summary()}" if report.counts else "it holds no records"
        raise EmptySplitError(which, path, detail)
    return records, report


def _record(row: dict, columns: tuple[str, ...], index: int, collator: TextCollator, cfg: DataConfig, path,
            where: str) -> dict:
    values = {c: row[c] for c in columns}
    for c, v in values.items():
        if v is not None and not isinstance(v, str):
            raise BadRecord(path, str(index), "malformed_record", f"column {c!r} holds {type(v).__name__}, not text",
                            where)
    if len(columns) == 2:
        record = {"id": str(index), "prompt": values[columns[0]] or "", "completion": values[columns[1]] or ""}
        body = record["completion"]
    else:
        record = {"id": str(index), "text": values[columns[0]] or ""}
        body = record["text"]
    if not body.strip():
        raise BadRecord(path, str(index), "empty_text", f"column {columns[-1]!r}", where)
    if (n := collator.length(record)) > cfg.max_text_len:
        raise BadRecord(path, str(index), "too_long", f"{n} tokens", where)
    return record


def check_records(cfg: DataConfig, collator: TextCollator, records: list[dict], split: str) -> list[dict]:
    """Built-in records (synthetic-text) under the same length limit as a file's: an over-long one is an error
    (they are generated, so the fix is data.max_text_len)."""
    for r in records:
        if (n := collator.length(r)) > cfg.max_text_len:
            raise RecipeError(f"data.max_text_len: {cfg.max_text_len}, but synthetic-text {split} record {r['id']} "
                              f"has {n} tokens; raise it")
    return records
