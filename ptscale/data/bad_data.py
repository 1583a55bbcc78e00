"""What to do with bad records (missing/corrupt/truncated images, empty captions, unanswered questions).

Policy ``on_bad_data``:

- ``"error"``: stop at the first bad record with a message naming the file and the record. Image errors
  surface while iterating; they are raised as :class:`BadDataError`, whose constructor takes one string so
  that ``torch.utils.data.DataLoader`` can rebuild it in the main process when it was raised in a worker
  (a class with a richer constructor comes back as a bare ``RuntimeError`` holding a worker traceback).
- ``"skip"``: drop the record, count it by reason in a :class:`BadDataReport` and report the counts at the
  end of the epoch. Text-level problems (empty captions, questions without answers) are found eagerly when
  the split is loaded, before any compute; image problems are found when the image is decoded.

Skip mode through a DataLoader (the counts must travel with the batches, because the dataset copies that
see the bad images live in the worker processes)::

    loader = DataLoader(dataset, batch_size=16, num_workers=4,
                        collate_fn=collate_skipping(collator.train_batch))
    report = BadDataReport()
    for batch in iter_clean_batches(loader, report):   # plain inner batches; all-bad batches are dropped
        ...
    print(report.summary())   # also logged as a warning when anything was skipped

Across ranks, gather the per-rank reports (``torch.distributed.all_gather_object``) and combine them with
:meth:`BadDataReport.merged`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, cast

from ptscale.errors import DataError

logger = logging.getLogger(__name__)

OnBadData = Literal["skip", "error"]
POLICIES: tuple[str, ...] = ("skip", "error")

# Reason keys used in reports, with the text used in messages.
REASONS: dict[str, str] = {
    "missing_image": "image file is missing",
    "unreadable_image": "image file cannot be read",
    "corrupt_image": "image file cannot be decoded",
    "truncated_image": "image file is truncated",
    "empty_caption": "caption is empty",
    "no_captions": "record has no non-empty caption",
    "empty_question": "question is empty",
    "no_answers": "question has no answers",
    "malformed_record": "record is malformed",
    "empty_text": "text is empty",
    "too_long": "record is longer than data.max_text_len tokens",
}

# What the user can do about each reason; the skip hint is appended by the message builders.
ADVICE: dict[str, str] = {
    "missing_image": "check that the image root points at the folder holding the images",
    "unreadable_image": "check that the path is a regular file you are allowed to read",
    "corrupt_image": "re-download or replace the file",
    "truncated_image": "the file is incomplete (an interrupted download or copy?); re-download it",
    "empty_caption": "fix or remove the caption in the annotation file",
    "no_captions": "add captions for the image or remove the record from the annotation file",
    "empty_question": "fix or remove the question in the questions file",
    "no_answers": "use the annotation file that matches the questions file, or remove the question",
    "malformed_record": "compare the record with the official file format",
    "empty_text": "fill in or remove the record's completion / text",
    "too_long": "shorten or remove the record, or raise data.max_text_len",
}

SKIP_HINT = "or pass on_bad_data='skip' to drop such records and get a count at the end of the epoch"
MAX_EXAMPLES = 20


def check_policy(on_bad_data: str) -> OnBadData:
    if on_bad_data not in POLICIES:
        raise ValueError(f"on_bad_data must be one of {POLICIES}, got {on_bad_data!r}")
    return cast(OnBadData, on_bad_data)


def _describe_reason(reason: str) -> str:
    return REASONS.get(reason, reason.replace("_", " "))


class BadRecord(Exception):
    """One bad record: the file at fault, the record it belongs to, and why.

    ``path`` is the image file for image problems and the annotation file for text problems; ``where`` says
    which split of which annotation file the record belongs to (datasets add it).
    """

    def __init__(self, path: str | os.PathLike[str], record_id: str, reason: str, detail: str = "",
                 where: str = "") -> None:
        self.path = str(path)
        self.record_id = str(record_id)
        self.reason = reason
        self.detail = detail
        self.where = where
        super().__init__(self._text())

    def _text(self) -> str:
        what = _describe_reason(self.reason)
        detail = f" ({self.detail})" if self.detail else ""
        where = f" in {self.where}" if self.where else ""
        advice = ADVICE.get(self.reason, "fix the record")
        return f"{what}: {self.path}{detail}; record {self.record_id}{where}. To fix: {advice}, {SKIP_HINT}."

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions pickle their ``args`` by default, which would not match this constructor.
        return (type(self), (self.path, self.record_id, self.reason, self.detail, self.where))

    def located(self, where: str) -> BadRecord:
        """The same record with its split and annotation file named."""
        return BadRecord(self.path, self.record_id, self.reason, self.detail, where)

    def short(self) -> str:
        """One line for report examples."""
        detail = f" ({self.detail})" if self.detail else ""
        return f"{self.reason}: {self.path}{detail} [record {self.record_id}]"


def reject(record: BadRecord, on_bad_data: OnBadData, report: BadDataReport) -> None:
    """Apply the policy to a bad record found while loading: raise in error mode, count in skip mode."""
    if on_bad_data == "error":
        raise BadDataError.of(record)
    report.add_record(record)


class BadDataError(DataError):
    """A bad record stopped the run (``on_bad_data="error"``).

    Takes a single message string so the DataLoader can rebuild it when it was raised in a worker. The
    DataLoader then prefixes the message with "Caught BadDataError in DataLoader worker process N" and the
    worker traceback; the constructor moves those into ``worker_traceback`` and keeps the message readable.
    """

    def __init__(self, message: str) -> None:
        self.worker_traceback: str | None = None
        # The structured record, where it is known (not after a re-raise from a DataLoader worker).
        self.record: BadRecord | None = None
        if message.startswith("Caught ") and "Original Traceback" in message:
            marker = f"{type(self).__name__}: "
            cut = message.rfind(marker)
            if cut >= 0:
                self.worker_traceback = message
                where = message.splitlines()[0].removeprefix(f"Caught {type(self).__name__} ").rstrip(".")
                message = f"{message[cut + len(marker):].rstrip()} (raised {where})"
        super().__init__(message)

    @classmethod
    def of(cls, record: BadRecord) -> BadDataError:
        error = cls(str(record))
        error.record = record
        return error


class EmptySplitError(DataError, ValueError):
    """A split has no usable examples: never run a silent zero-length epoch."""

    def __init__(self, split: str, source: str | os.PathLike[str], detail: str) -> None:
        self.split = split
        self.source = str(source)
        self.detail = detail
        super().__init__(f"split {split!r} of {self.source} has no usable examples: {detail}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.split, self.source, self.detail))


@dataclass(frozen=True)
class SkippedRecord:
    """What a dataset returns in skip mode for a record whose image is bad.

    Falsy, so ``[x for x in items if x]`` drops it; it carries the reason so the collate function can count
    it in the process that assembles the batch (a DataLoader worker), and the count reaches the main
    process with the batch.
    """

    path: str
    record_id: str
    reason: str
    detail: str = ""

    def __bool__(self) -> bool:
        return False

    @classmethod
    def from_error(cls, err: BadRecord) -> SkippedRecord:
        return cls(err.path, err.record_id, err.reason, err.detail)

    def short(self) -> str:
        detail = f" ({self.detail})" if self.detail else ""
        return f"{self.reason}: {self.path}{detail} [record {self.record_id}]"


@dataclass
class BadDataReport:
    """Counts of dropped records by reason, a few examples, and how many records were kept."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    kept: int = 0

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def add(self, reason: str, example: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(example)

    def add_record(self, record: BadRecord | SkippedRecord) -> None:
        self.add(record.reason, record.short())

    def merge(self, other: BadDataReport) -> BadDataReport:
        """Add ``other`` into this report (in place) and return it."""
        for reason, n in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + n
        room = MAX_EXAMPLES - len(self.examples)
        self.examples.extend(other.examples[:max(room, 0)])
        self.kept += other.kept
        return self

    @classmethod
    def merged(cls, reports: Iterable[BadDataReport]) -> BadDataReport:
        """Combine reports from workers or ranks into a new one."""
        out = cls()
        for report in reports:
            out.merge(report)
        return out

    def summary(self, what: str = "records") -> str:
        if not self.counts:
            return f"no bad {what}; kept {self.kept}"
        by_reason = ", ".join(f"{reason}={n}" for reason, n in sorted(self.counts.items()))
        lines = [f"skipped {self.skipped} bad {what} (kept {self.kept}): {by_reason}"]
        lines += [f"  e.g. {example}" for example in self.examples]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "examples": list(self.examples), "kept": self.kept}


class Collated(NamedTuple):
    """What :func:`collate_skipping` returns: the inner batch (None if every item was bad) and its report.

    A NamedTuple so that the DataLoader's ``pin_memory`` pins the tensors inside ``batch``.
    """

    batch: Any
    report: BadDataReport


@dataclass
class SkippingCollate:
    """Drop skipped items (``SkippedRecord`` or None), count them, and collate the rest with ``inner``."""

    inner: Callable[[list[Any]], Any]

    def __call__(self, items: Sequence[Any]) -> Collated:
        report = BadDataReport()
        good = []
        for item in items:
            if isinstance(item, SkippedRecord):
                report.add_record(item)
            elif item is None:
                report.add("unknown", "a dataset returned None without a reason")
            else:
                good.append(item)
        report.kept = len(good)
        # An all-bad batch has nothing to collate; its counts still have to reach the main process.
        return Collated(self.inner(good) if good else None, report)


def collate_skipping(inner_collate: Callable[[list[Any]], Any]) -> SkippingCollate:
    """Wrap a collate function for skip mode; iterate the DataLoader with :func:`iter_clean_batches`.

    The wrapper runs where the batch is assembled (a worker, with ``num_workers > 0``): it drops the
    skipped items, collates the others with ``inner_collate`` and returns :class:`Collated` so the
    counts travel to the main process with the batch. It is picklable if ``inner_collate`` is
    (a bound method of a picklable collator, a module-level function).
    """
    return SkippingCollate(inner_collate)


def iter_clean_batches(loader: Iterable[Collated], report: BadDataReport, *,
                       split: str | None = None, source: str | None = None) -> Iterator[Any]:
    """Yield the inner batches of one epoch, merging each batch's counts into ``report``.

    At the end of the epoch, the summary is logged as a warning if anything was skipped, and
    :class:`EmptySplitError` is raised if no example was usable. ``split`` and ``source`` name the split in
    those messages; by default they are read from ``loader.dataset`` (the loaders here set both).
    """
    dataset = getattr(loader, "dataset", None)
    split = split if split is not None else str(getattr(dataset, "split", "?"))
    source = source if source is not None else str(getattr(dataset, "source", "?"))
    epoch = BadDataReport()
    batches = 0
    for collated in loader:
        batches += 1
        if not isinstance(collated, Collated):
            raise TypeError("iter_clean_batches needs a DataLoader whose collate_fn is "
                            f"collate_skipping(...), got a batch of type {type(collated).__name__}")
        epoch.merge(collated.report)
        if collated.batch is not None:
            yield collated.batch
    report.merge(epoch)
    if epoch.counts:
        logger.warning("split %r of %s: %s", split, source, epoch.summary())
    if batches == 0:
        raise EmptySplitError(split, source, "the DataLoader produced no batches "
                              "(drop_last=True with fewer examples than the batch size?)")
    if epoch.kept == 0:
        raise EmptySplitError(split, source,
                              f"every record of the epoch was skipped as bad; {epoch.summary()}")
