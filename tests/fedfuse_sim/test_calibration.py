import torch

from fedfuse_sim import calibration


def test_rank_correlation_of_known_orders():
    x = torch.arange(10.0)
    assert abs(calibration.rank_correlation(x, x**3) - 1.0) < 1e-12
    assert abs(calibration.rank_correlation(x, -x) + 1.0) < 1e-12


def test_band_coverage_of_calibrated_and_overconfident_samples():
    gen = torch.Generator().manual_seed(0)
    samples = torch.randn(400, 5000, generator=gen)
    truth = torch.randn(5000, generator=gen)
    for level in (0.5, 0.9):
        assert abs(calibration.band_coverage(samples, truth, level) - level) < 0.03
    # samples half as wide as the truth's spread cover far less than they claim
    assert calibration.band_coverage(0.5 * samples, truth, 0.9) < 0.7
    curve = calibration.coverage_curve(samples, truth)
    assert list(curve) == ["0.50", "0.80", "0.90", "0.95"] and curve["0.95"] > curve["0.50"]
