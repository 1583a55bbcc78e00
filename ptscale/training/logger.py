"""Per-step metrics to JSONL and TensorBoard in the run directory; rank 0 writes, others stay quiet."""

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
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._tb.add_scalar(f"{record.get('stage', 'run')}/{key}", value, step)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
