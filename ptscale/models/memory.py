"""Measuring what a rank used: peak host RSS and, on CUDA, peak device memory (printed at construction and
recorded by the benchmarks)."""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MemoryReport:
    rank: int
    peak_rss: int  # bytes: host high-water mark since the last reset_peaks() (or process start)
    rss: int  # bytes: host resident set now
    device_peak: int | None  # bytes: torch.cuda.max_memory_allocated since the last reset; None without CUDA

    def line(self, label: str) -> str:
        device = "" if self.device_peak is None else f", device peak {gib(self.device_peak):.2f} GiB"
        return (f"rank {self.rank} {label}: peak RSS {gib(self.peak_rss):.2f} GiB, "
                f"RSS now {gib(self.rss):.2f} GiB{device}")


def gib(n: float) -> float:
    return n / 2**30


def _status_kib(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (Linux); None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def return_freed_memory_promptly(threshold: int = 64 * 1024) -> bool:
    """Make glibc hand freed blocks above ``threshold`` bytes back to the OS at once (process-wide).

    glibc serves allocations below its mmap threshold from the heap and raises that threshold (up to
    32 MiB) after each large free, so the full-size tensors that zero.Init builds and frees module by
    module, and ZeRO-3's gathered parameters, stay resident as fragmented heap. Measured here (1.1 B
    parameter BLIP-2, 2 CPU ranks): construction peak 2.50 / 3.02 GiB per rank by default, 2.11 / 2.10
    GiB with a fixed 64 KiB threshold. Returns False where mallopt is unavailable (not glibc)."""
    import ctypes

    m_mmap_threshold = -3  # M_MMAP_THRESHOLD in malloc.h; setting it also disables the dynamic raise
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(m_mmap_threshold, threshold))
    except (OSError, AttributeError):
        return False


def reset_peaks() -> bool:
    """Start a new measuring window: host high-water mark (Linux ``clear_refs`` 5) and CUDA peak.
    Returns False when the host peak cannot be reset (then peak_rss is the peak since process start)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_report(rank: int) -> MemoryReport:
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        peak = hwm * 1024
    else:  # no /proc: getrusage has no reset; ru_maxrss is KiB on Linux, bytes on macOS
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = maxrss if sys.platform == "darwin" else maxrss * 1024
    now = _status_kib("VmRSS")
    if now is None:
        import psutil  # a DeepSpeed dependency

        now_bytes = psutil.Process().memory_info().rss
    else:
        now_bytes = now * 1024
    device = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return MemoryReport(rank, peak, now_bytes, device)


