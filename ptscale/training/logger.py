"""Per-step metrics to JSONL and TensorBoard in the run directory; rank 0 writes, others stay quiet.

One timeline: ``step`` is the run's global optimizer step across stages, so one loss curve covers the
whole run; TensorBoard tags are ``<kind>/<metric>`` (not per stage), stage starts and ends are records of
their own (and a ``stage_index`` scalar marks each boundary), evaluations sit at the step where they were
taken."""

from __future__ import annotations

import json
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


class MetricLogger:
    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        if enabled:
            self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"global_step": step, **record}) + "\n")
        kind = record.get("kind", "run")
        for key, value in record.items():
            if key == "stage_index" and kind not in ("stage_start", "stage_end"):
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
