"""Representation analysis: singular-value spectra and effective rank (PT-PEFT §2.3)."""

from ptscale.analysis.effective_rank import (
    EffectiveRank,
    SpectrumAccumulator,
    cumulative,
    effective_rank,
    normalized_singular_values,
    plot_spectra,
    spectrum,
)

__all__ = [
    "EffectiveRank",
    "SpectrumAccumulator",
    "cumulative",
    "effective_rank",
    "normalized_singular_values",
    "plot_spectra",
    "spectrum",
]
