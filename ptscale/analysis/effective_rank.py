"""Singular-value spectra of feature matrices and the effective rank of PT-PEFT §2.3 (eq. 1-5, Table 1).

Per sample, the last-layer features F (tokens x hidden) are decomposed, F = U Σ Vᵀ (eq. 2); the singular
values, sorted in descending order, are normalised to sum to one (eq. 3); the normalised spectra are
averaged over the K samples (eq. 4), shorter spectra zero-padded to the longest (a sample with fewer tokens
has fewer singular values); the cumulative sum y (eq. 5) is what the paper's Figure 4 plots. The effective
rank at threshold 0.9 is the number of singular values needed for y to reach 0.9, also given as a fraction of
the spectrum length; Table 1 reports it relative to the pre-trained model's (``EffectiveRank.relative_to``).
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DEFAULT_THRESHOLD = 0.9
# Cumulative sums of float64 values that should reach the threshold exactly can land a few ulps below it
# (ten times 0.1 sums to 0.9999999999999999); this tolerance keeps such cases at their exact count.
_CUMSUM_TOLERANCE = 1e-12


def normalized_singular_values(features: torch.Tensor) -> torch.Tensor:
    """Eq. 2-3 for one sample (T, C) or a batch (N, T, C): descending singular values summing to 1.

    Computed in float64 on the features' device; returns shape (min(T, C),) or (N, min(T, C)).
    """
    if features.dim() not in (2, 3):
        raise ValueError(f"expected features of shape (T, C) or (N, T, C), got {tuple(features.shape)}")
    if not torch.isfinite(features).all():
        raise ValueError("features contain NaN or Inf")
    sv = torch.linalg.svdvals(features.to(torch.float64))  # descending, (..., min(T, C))
    total = sv.sum(dim=-1, keepdim=True)
    if (total <= 0).any():
        raise ValueError("a feature matrix is all zeros: its spectrum cannot be normalised")
    return sv / total


class SpectrumAccumulator:
    """Running eq. 4: sum of zero-padded normalised spectra and the number of samples, kept on the CPU.

    Feed it batches straight from a model: ``update(hidden_states, attention_mask)`` with hidden states
    (N, T, C) and an optional (N, T) mask selecting each sample's real tokens (padding rows would otherwise
    add singular values that are not the sample's).
    """

    def __init__(self) -> None:
        self._sum = torch.zeros(0, dtype=torch.float64)
        self.count = 0

    def _add(self, spectra: torch.Tensor) -> None:
        # spectra: (n, M) normalised; grow the running sum when a longer spectrum arrives (zero padding).
        spectra = spectra.detach().to("cpu", torch.float64)
        width = max(self._sum.numel(), spectra.shape[-1])
        total = torch.zeros(width, dtype=torch.float64)
        total[: self._sum.numel()] += self._sum
        total[: spectra.shape[-1]] += spectra.sum(dim=0)
        self._sum = total
        self.count += spectra.shape[0]

    def update(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add one sample (T, C) or a batch (N, T, C); ``mask`` (N, T) or (T,) marks the tokens to keep."""
        if features.dim() == 2:
            features = features.unsqueeze(0)
            mask = None if mask is None else mask.unsqueeze(0)
        if features.dim() != 3:
            raise ValueError(f"expected features of shape (T, C) or (N, T, C), got {tuple(features.shape)}")
        if mask is None:
            self._add(normalized_singular_values(features))
            return
        if mask.shape != features.shape[:2]:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match features "
                             f"{tuple(features.shape[:2])}")
        mask = mask.to(device=features.device, dtype=torch.bool)
        # Different token counts give different spectrum lengths: one SVD per sample.
        for sample, keep in zip(features, mask, strict=True):
            if not keep.any():
                raise ValueError("a sample has no unmasked tokens")
            self._add(normalized_singular_values(sample[keep]).unsqueeze(0))

    def compute(self) -> torch.Tensor:
        """Mean normalised spectrum ŝ_avg (eq. 4), float64 on the CPU; sums to 1."""
        if self.count == 0:
            raise ValueError("no samples were added")
        return self._sum / self.count


def spectrum(features: Iterable[torch.Tensor]) -> torch.Tensor:
    """Mean normalised spectrum (eq. 2-4) of per-sample feature matrices, each (T_k, C)."""
    acc = SpectrumAccumulator()
    for f in features:
        if f.dim() != 2:
            raise ValueError(f"each sample must be a (T, C) matrix, got {tuple(f.shape)}")
        acc.update(f)
    return acc.compute()


def cumulative(spec: torch.Tensor) -> torch.Tensor:
    """Eq. 5: y_i = sum_{j<=i} ŝ_avg,j."""
    return torch.cumsum(spec.to(torch.float64), dim=0)


@dataclass(frozen=True)
class EffectiveRank:
    """``count`` singular values reach ``threshold`` of the cumulative spectrum, out of ``length``."""

    count: int
    fraction: float
    threshold: float
    length: int

    def relative_to(self, reference: EffectiveRank) -> float:
        """This effective rank as a percentage of ``reference``'s (Table 1: "% of the pre-trained model").

        Uses the fractions, so spectra of different lengths are compared by their normalised index, as in
        Figure 4; for equal lengths it is the ratio of counts.
        """
        return 100.0 * self.fraction / reference.fraction


def effective_rank(spec: torch.Tensor, threshold: float = DEFAULT_THRESHOLD) -> EffectiveRank:
    """Smallest k with y_k >= threshold (1-based), for a normalised spectrum (e.g. from ``spectrum``)."""
    if spec.dim() != 1 or spec.numel() == 0:
        raise ValueError(f"expected a non-empty 1-D spectrum, got shape {tuple(spec.shape)}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    y = cumulative(spec)
    if abs(float(y[-1]) - 1.0) > 1e-6:
        raise ValueError(f"spectrum must be normalised to sum 1, sums to {float(y[-1])}")
    # Number of prefixes still short of the threshold, plus the one that reaches it.
    count = min(int((y < threshold - _CUMSUM_TOLERANCE).sum()) + 1, spec.numel())
    return EffectiveRank(count=count, fraction=count / spec.numel(), threshold=threshold, length=spec.numel())


# Line styles cycled with the colours: curves that coincide (a path no run changed, e.g. the vision encoder in a
# Q-Former-only recipe) stay visible as dashes over the reference's wide grey line.
_STYLES = ("-", "--", "-.", ":", (0, (5, 1, 1, 1)), (0, (3, 1, 1, 1, 1, 1)))


def plot_spectra(
    curves: Mapping[str, torch.Tensor],
    path: str | Path,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    title: str | None = None,
    reference: str | None = None,
) -> Path:
    """Write ``path`` (PNG, 200 dpi) and the same figure as vector PDF beside it, overlaying cumulative spectra
    (Figure 4): x = i / M, y = cumulative normalised singular values.

    ``curves`` maps a legend label to its cumulative curve (``cumulative(spectrum(...))``); curves of different
    lengths share the normalised x axis. ``reference`` names the curve drawn as a wide grey line beneath the
    others. A dashed line marks ``threshold``; a dot marks where each curve reaches it, whose x is the
    effective rank as a share of the spectrum (given in the legend). The legend sits right of the axes.
    """
    if not curves:
        raise ValueError("no curves to plot")
    # Figure + Agg canvas directly: no pyplot global state, no display backend needed.
    fig = Figure(figsize=(8.0, 4.0), dpi=200)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    others = 0
    for name, y in curves.items():
        y = y.detach().to("cpu", torch.float64)
        x = torch.arange(1, y.numel() + 1, dtype=torch.float64) / y.numel()
        rank = effective_rank_from_cumulative(y, threshold)
        # wrapped: long plan + placement labels would otherwise make the legend wider than the axes
        label = textwrap.fill(f"{name}: {100 * rank:.0f}%", 48, subsequent_indent="  ")
        if name == reference:
            style = {"color": "0.6", "linewidth": 5.0, "linestyle": "-", "zorder": 1, "alpha": 0.8}
        else:
            style = {"color": f"C{others % 10}", "linewidth": 1.6, "linestyle": _STYLES[others % len(_STYLES)],
                     "zorder": 2 + others}
            others += 1
        line = ax.plot(x.numpy(), y.numpy(), label=label, **style)[0]
        # the first point of the curve at or above the threshold: its x is the effective rank
        first = round(rank * y.numel()) - 1
        ax.plot([float(x[first])], [float(y[first])], marker="o", markersize=4, color=line.get_color(), zorder=10)
    ax.axhline(threshold, color="0.3", linestyle="--", linewidth=0.8)
    ax.annotate(f"{threshold:g} of the total", (1.0, threshold), xytext=(-4, -10), textcoords="offset points",
                ha="right", fontsize=8, color="0.3")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("singular value index i / M (descending; M values per sample)")
    ax.set_ylabel("cumulative share of the singular values")
    ax.grid(True, linewidth=0.3, alpha=0.5)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False, borderaxespad=0.0,
              title=f"effective rank: share of the spectrum needed\nto reach {threshold:g} (the dot: first point at or "
                    "above\nthe dashed line)",
              title_fontsize=8, alignment="left")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    fig.savefig(path.with_suffix(".pdf"), format="pdf", bbox_inches="tight")
    return path


def effective_rank_from_cumulative(y: torch.Tensor, threshold: float = DEFAULT_THRESHOLD) -> float:
    """Effective-rank fraction read off a cumulative curve (used for the plot legend)."""
    spec = torch.diff(y.to(torch.float64), prepend=torch.zeros(1, dtype=torch.float64))
    return effective_rank(spec, threshold).fraction


def crossing_point(y: torch.Tensor, threshold: float = DEFAULT_THRESHOLD) -> float:
    """Where the cumulative curve ``y`` (eq. 5) reaches ``threshold``, as a fraction of the spectrum length,
    read continuously: linear interpolation between the integer points (0, 0), (1, y_1), ..., (M, y_M).

    The effective rank (a count) moves in steps of 1/M; this moves with the spectrum itself, so two models
    whose counts tie can still be told apart (table 1's "continuous crossing point")."""
    y = y.detach().to("cpu", torch.float64)
    if y.dim() != 1 or y.numel() == 0:
        raise ValueError(f"expected a non-empty 1-D cumulative curve, got shape {tuple(y.shape)}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    points = torch.cat([torch.zeros(1, dtype=torch.float64), y])
    above = (points >= threshold - _CUMSUM_TOLERANCE).nonzero()
    if above.numel() == 0:
        raise ValueError(f"the curve never reaches {threshold} (it ends at {float(y[-1])})")
    i = int(above[0])  # points[i - 1] < threshold <= points[i]
    lo, hi = float(points[i - 1]), float(points[i])
    return (i - 1 + (threshold - lo) / (hi - lo)) / y.numel()


def plot_spectrum_bands(
    panels: Mapping[str, Mapping[str, list[torch.Tensor]]],
    path: str | Path,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    reference: str | None = None,
    title: str | None = None,
) -> Path:
    """Figure 4 over seeds: one panel per feature path, in each the mean cumulative curve per label with a band
    from the lowest to the highest seed, the ``reference`` label as a wide grey line beneath. ``panels``: panel
    title -> label -> cumulative curves (one per seed, equal lengths). The legend sits below the panels, outside
    the axes; PNG at 200 dpi and a vector PDF beside it."""
    if not panels:
        raise ValueError("no panels to plot")
    fig = Figure(figsize=(4.2 * len(panels), 4.6), dpi=200)
    FigureCanvasAgg(fig)
    handles: dict[str, Any] = {}
    for p, (panel, curves) in enumerate(panels.items()):
        ax = fig.add_subplot(1, len(panels), p + 1)
        others = 0
        for label, ys in curves.items():
            stack = torch.stack([y.detach().to("cpu", torch.float64) for y in ys])
            mean, lo, hi = stack.mean(0), stack.min(0).values, stack.max(0).values
            x = (torch.arange(1, mean.numel() + 1, dtype=torch.float64) / mean.numel()).numpy()
            if label == reference:
                style = {"color": "0.6", "linewidth": 4.0, "linestyle": "-", "zorder": 1, "alpha": 0.8}
            else:
                style = {"color": f"C{others % 10}", "linewidth": 1.3,
                         "linestyle": _STYLES[others % len(_STYLES)], "zorder": 2 + others}
                others += 1
            line = ax.plot(x, mean.numpy(), **style)[0]
            if len(ys) > 1:
                ax.fill_between(x, lo.numpy(), hi.numpy(), color=line.get_color(), alpha=0.15, linewidth=0)
            handles.setdefault(label, line)
        ax.axhline(threshold, color="0.3", linestyle="--", linewidth=0.8)
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel("singular value index / spectrum length", fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.set_xlim(0, 1)
        ax.tick_params(labelsize=7)
        if p == 0:
            ax.set_ylabel("accumulated normalised singular values", fontsize=8)
    labels = [textwrap.fill(label, 60, subsequent_indent="  ") for label in handles]
    fig.legend(list(handles.values()), labels, loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=2 if len(handles) > 4 else 1, fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    fig.savefig(path.with_suffix(".pdf"), format="pdf", bbox_inches="tight")
    return path
