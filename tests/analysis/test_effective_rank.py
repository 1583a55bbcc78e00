"""Effective rank (PT-PEFT §2.3) on matrices whose singular values are known by construction."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ptscale.analysis.effective_rank import (
    EffectiveRank,
    SpectrumAccumulator,
    crossing_point,
    cumulative,
    effective_rank,
    normalized_singular_values,
    plot_spectra,
    plot_spectrum_bands,
    spectrum,
)


def _orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q


def _with_singular_values(values: list[float], tokens: int, hidden: int, seed: int = 0) -> torch.Tensor:
    """A (tokens, hidden) float32 matrix U diag(values) Vᵀ with random orthogonal U, V."""
    gen = torch.Generator().manual_seed(seed)
    sigma = torch.zeros(tokens, hidden, dtype=torch.float64)
    sigma[range(len(values)), range(len(values))] = torch.tensor(values, dtype=torch.float64)
    return (_orthogonal(tokens, gen) @ sigma @ _orthogonal(hidden, gen).T).float()


def test_diagonal_with_chosen_singular_values() -> None:
    # σ = 4, 3, 2, 1 -> normalised 0.4, 0.3, 0.2, 0.1 -> cumulative 0.4, 0.7, 0.9, 1.0 -> 3 of 4 reach 0.9.
    f = torch.zeros(6, 4, dtype=torch.float64)
    f[:4, :4] = torch.diag(torch.tensor([2.0, 4.0, 1.0, 3.0], dtype=torch.float64))  # order must not matter
    spec = spectrum([f])
    assert spec.dtype == torch.float64
    assert spec == pytest.approx(torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64), abs=1e-12)
    expected_y = torch.tensor([0.4, 0.7, 0.9, 1.0], dtype=torch.float64)
    assert cumulative(spec) == pytest.approx(expected_y, abs=1e-12)
    assert effective_rank(spec) == EffectiveRank(count=3, fraction=0.75, threshold=0.9, length=4)
    assert effective_rank(spec, threshold=0.7).count == 2
    assert effective_rank(spec, threshold=0.71).count == 3


@pytest.mark.parametrize(("threshold", "count"), [(0.35, 1), (0.65, 2), (0.85, 3), (0.95, 4)])
def test_rotated_float32_features(threshold: float, count: int) -> None:
    # Same spectrum hidden behind random rotations, in float32 as a model would produce it.
    f = _with_singular_values([4.0, 3.0, 2.0, 1.0], tokens=6, hidden=4)
    assert f.dtype == torch.float32
    spec = spectrum([f])
    assert spec == pytest.approx(torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64), abs=1e-6)
    assert effective_rank(spec, threshold=threshold).count == count


@pytest.mark.parametrize("k", [1, 3, 7])
def test_rank_k_matrix_needs_at_most_k(k: int) -> None:
    # Equal singular values on a rank-k matrix: y_i = i/k, so exactly ceil(0.9 k) values reach 0.9.
    f = _with_singular_values([1.0] * k, tokens=12, hidden=16, seed=k)
    er = effective_rank(spectrum([f]))
    assert er.count == (9 * k + 9) // 10  # ceil(0.9 k) in integer arithmetic
    assert er.length == 12 and er.fraction == er.count / 12


@pytest.mark.parametrize("n", [10, 30, 64])
def test_identity_uniform_spectrum(n: int) -> None:
    spec = spectrum([torch.eye(n)])
    assert spec == pytest.approx(torch.full((n,), 1.0 / n, dtype=torch.float64))
    assert effective_rank(spec).count == (9 * n + 9) // 10


def test_average_over_samples_of_different_token_counts() -> None:
    # Sample A (2 tokens): σ ∝ 3, 1 -> 0.75, 0.25, padded to 0.75, 0.25, 0, 0.
    # Sample B (4 tokens): σ ∝ 4, 3, 2, 1 -> 0.4, 0.3, 0.2, 0.1.
    # Mean: 0.575, 0.275, 0.1, 0.05 -> cumulative 0.575, 0.85, 0.95, 1.0 -> 3 of 4.
    a = _with_singular_values([3.0, 1.0], tokens=2, hidden=8, seed=1)
    b = _with_singular_values([4.0, 3.0, 2.0, 1.0], tokens=4, hidden=8, seed=2)
    spec = spectrum([a, b])
    assert spec == pytest.approx(torch.tensor([0.575, 0.275, 0.1, 0.05], dtype=torch.float64), abs=1e-6)
    assert spectrum([b, a]) == pytest.approx(spec, abs=1e-12)  # order-independent
    assert effective_rank(spec).count == 3


def test_accumulator_batches_and_masks_match_per_sample() -> None:
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 5, 8, generator=gen)
    lengths = [5, 3, 4]
    mask = torch.arange(5)[None, :] < torch.tensor(lengths)[:, None]  # (N, T) real tokens
    acc = SpectrumAccumulator()
    acc.update(feats[:2], mask[:2])
    acc.update(feats[2:], mask[2:])
    expected = spectrum([feats[i, :n] for i, n in enumerate(lengths)])
    assert acc.count == 3
    assert acc.compute() == pytest.approx(expected, abs=1e-12)
    # Unmasked batched path equals per-sample path; padding rows change the result, hence the mask.
    unmasked = SpectrumAccumulator()
    unmasked.update(feats)
    assert unmasked.compute() == pytest.approx(spectrum(list(feats)), abs=1e-12)
    assert not torch.allclose(unmasked.compute(), expected)


def test_relative_to_reference() -> None:
    ref = effective_rank(spectrum([torch.eye(10)]))  # 9 of 10
    collapsed = effective_rank(spectrum([_with_singular_values([1.0] * 5, tokens=10, hidden=10)]))  # 5 of 10
    assert collapsed.relative_to(ref) == pytest.approx(100.0 * 5 / 9)
    assert ref.relative_to(ref) == pytest.approx(100.0)


def test_invalid_inputs() -> None:
    with pytest.raises(ValueError, match="all zeros"):
        normalized_singular_values(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="NaN or Inf"):
        normalized_singular_values(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="no samples"):
        SpectrumAccumulator().compute()
    with pytest.raises(ValueError, match="normalised"):
        effective_rank(torch.tensor([2.0, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="no unmasked tokens"):
        SpectrumAccumulator().update(torch.randn(1, 3, 4), torch.zeros(1, 3, dtype=torch.bool))


def test_plot_spectra_writes_png(tmp_path: Path) -> None:
    curves = {
        "pre-trained": cumulative(spectrum([torch.eye(16)])),
        "fine-tuned": cumulative(spectrum([_with_singular_values([8.0, 4.0, 2.0, 1.0], 16, 16)])),
        "other length": cumulative(spectrum([torch.eye(7)])),
    }
    out = plot_spectra(curves, tmp_path / "fig" / "spectra.png", title="test")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 1400 and height >= 700  # 8 x 4 in at 200 dpi (print size), the legend outside the axes
    assert len(data) > 5000  # three curves, axes and a legend, not an empty canvas
    assert out.with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"


def test_crossing_point_interpolates_between_known_points() -> None:
    # σ = 4, 3, 2, 1: y = 0.4, 0.7, 0.9, 1.0. 0.9 is reached exactly at index 3 of 4; 0.8 halfway between
    # index 2 (0.7) and 3 (0.9); 0.2 halfway from the origin (0, 0) to index 1 (0.4).
    spec = spectrum([torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64))])
    y = cumulative(spec)
    assert crossing_point(y, 0.9) == pytest.approx(3 / 4, abs=1e-12)
    assert crossing_point(y, 0.8) == pytest.approx(2.5 / 4, abs=1e-12)
    assert crossing_point(y, 0.2) == pytest.approx(0.5 / 4, abs=1e-12)
    # it never exceeds the effective rank's fraction, and agrees with it where the curve hits the threshold
    for t in (0.3, 0.55, 0.9, 0.99):
        assert crossing_point(y, t) <= effective_rank(spec, t).fraction + 1e-12


@pytest.mark.parametrize("n", [5, 16, 37])
def test_crossing_point_of_a_uniform_spectrum_is_the_threshold(n: int) -> None:
    # all singular values equal: y is a straight line from (0, 0) to (1, 1), so it crosses t at x = t
    spec = spectrum([_with_singular_values([1.0] * n, n, n + 5)])
    assert crossing_point(cumulative(spec), 0.9) == pytest.approx(0.9, abs=1e-5)  # float32 features: 1e-5


def test_crossing_point_separates_spectra_whose_counts_tie() -> None:
    a = spectrum([_with_singular_values([5.0, 4.0, 1.0], 6, 6)])
    b = spectrum([_with_singular_values([5.0, 4.0, 2.0], 6, 6)])
    assert effective_rank(a).count == effective_rank(b).count == 3
    assert crossing_point(cumulative(a)) < crossing_point(cumulative(b))


def test_plot_spectrum_bands_writes_png_and_pdf(tmp_path: Path) -> None:
    y = [cumulative(spectrum([_with_singular_values([3.0, 2.0, 1.0], 5, 5, seed=s)])) for s in range(3)]
    out = plot_spectrum_bands({"ViT": {"pre-trained": y[:1], "lora: LoRA r16 LM q/v": y}}, tmp_path / "f.png",
                              reference="pre-trained")
    assert out.stat().st_size > 0 and out.with_suffix(".pdf").stat().st_size > 0
