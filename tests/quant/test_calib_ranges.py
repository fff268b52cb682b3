"""RangeCollector: streamed min/max, percentile and entropy ranges against numpy on known distributions."""

import numpy as np
import pytest

from onnxopt.passes.quant.calib_ranges import RangeCollector

BINS = 2048


def collect(batches, bins=BINS):
    rc = RangeCollector(bins)
    for b in batches:
        rc.update(b)
    return rc


def final_bin_width(batches, bins=BINS):
    """The bin width the collector ends with: the first batch's max |x| / bins, doubled until it covers all."""
    first = float(np.abs(batches[0]).max())
    total = max(float(np.abs(b).max()) for b in batches)
    width = first / bins
    while total > width * bins:
        width *= 2
    return width


def test_minmax_matches_numpy_over_batches_and_a_100x_wider_one():
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal((8, 16)) for _ in range(5)] + [
        100 * rng.standard_normal((4, 3, 5))
    ]
    rc = collect(batches)
    data = np.concatenate([b.ravel() for b in batches])
    assert rc.range("minmax") == (data.min(), data.max())
    amax = np.abs(data).max()
    assert rc.range("minmax", symmetric=True) == (-amax, amax)


def test_nan_and_inf_are_ignored():
    x = np.random.default_rng(2).standard_normal(1000)
    dirty = np.concatenate([x, [np.nan, np.inf, -np.inf]])
    clean, noisy = collect([x], bins=256), collect([dirty], bins=256)
    for method in ("minmax", "percentile", "entropy"):
        assert noisy.range(method) == clean.range(method)


def test_percentile_of_abs_normal_streamed_in_20_batches():
    rng = np.random.default_rng(3)
    batches = [rng.standard_normal(20000).astype(np.float32) for _ in range(20)]
    lo, hi = collect(batches).range("percentile", 99.9, symmetric=True)
    expected = np.percentile(np.abs(np.concatenate(batches)), 99.9)
    assert lo == -hi
    assert hi == pytest.approx(expected, rel=0.02)


def test_percentile_asymmetric_tails_of_shifted_exponential():
    rng = np.random.default_rng(4)
    batches = [rng.exponential(1.0, 20000) - 1.0 for _ in range(20)]
    lo, hi = collect(batches).range("percentile", 99.9)
    exp_lo, exp_hi = np.percentile(np.concatenate(batches), [0.1, 99.9])
    assert lo == pytest.approx(exp_lo, rel=0.02)
    assert hi == pytest.approx(exp_hi, rel=0.02)


def test_percentile_100_is_minmax():
    rc = collect(
        [np.random.default_rng(5).standard_normal((2500, 2)) * [1.0, 3.0] for _ in range(3)]
    )
    assert rc.range("percentile", 100) == rc.range("minmax")
    assert rc.range("percentile", 100, symmetric=True) == rc.range("minmax", symmetric=True)


def test_rebinning_gives_the_single_pass_percentiles():
    rng = np.random.default_rng(6)
    batches = [scale * rng.standard_normal(30000) for scale in (1, 3, 10, 30, 100, 300)]
    streamed, at_once = collect(batches), collect([np.concatenate(batches)])
    width = final_bin_width(batches)
    assert width > final_bin_width(
        [np.concatenate(batches)]
    )  # the streamed histogram really was re-binned
    for p in (50, 90, 99, 99.9):
        for symmetric in (False, True):
            got = streamed.range("percentile", p, symmetric)
            want = at_once.range("percentile", p, symmetric)
            np.testing.assert_allclose(got, want, atol=width)


def test_entropy_on_normal_clips_the_far_tails():
    rng = np.random.default_rng(7)
    batches = [rng.standard_normal(50000) for _ in range(20)]
    rc = collect(batches)
    lo, hi = rc.range("entropy", symmetric=True)
    assert lo == -hi and 2.5 < hi < 5
    assert hi < rc.range("minmax", symmetric=True)[1] - 0.5
    alo, ahi = rc.range("entropy")
    assert -5 < alo < -2.5 and 2.5 < ahi < 5


def test_outliers_are_clipped_by_entropy_and_percentile_but_not_minmax():
    rng = np.random.default_rng(8)
    data = np.concatenate([rng.standard_normal(200000), np.full(10, 1000.0)])
    rng.shuffle(data)
    rc = collect(np.array_split(data, 10))
    assert rc.range("minmax")[1] == 1000.0
    assert rc.range("minmax", symmetric=True) == (-1000.0, 1000.0)
    for symmetric in (False, True):
        assert rc.range("percentile", 99.99, symmetric)[1] < 10
        assert rc.range("entropy", symmetric=symmetric)[1] < 200


def test_ranges_always_include_zero():
    rng = np.random.default_rng(9)
    rc = collect([rng.uniform(2.0, 5.0, 10000) for _ in range(3)])
    for method in ("minmax", "percentile", "entropy"):
        lo, hi = rc.range(method)
        assert lo == 0.0 and 4.9 < hi <= 5.0
    neg = collect([-rng.uniform(2.0, 5.0, 10000)])
    for method in ("minmax", "percentile", "entropy"):
        lo, hi = neg.range(method)
        assert -5.0 <= lo < -4.9 and hi == 0.0


def test_all_zero_input_gives_zero_range():
    rc = collect([np.zeros((4, 4)), np.zeros(7, np.float32)])
    for method in ("minmax", "percentile", "entropy"):
        for symmetric in (False, True):
            assert rc.range(method, symmetric=symmetric) == (0.0, 0.0)


def test_exact_zeros_count_in_percentiles():
    x = np.concatenate([np.zeros(9000), np.linspace(0.1, 1.0, 1000)])
    rc = collect([x])
    assert rc.range("percentile", 90)[1] == pytest.approx(0.0, abs=1e-3)
    assert rc.range("percentile", 95)[1] == pytest.approx(np.percentile(x, 95), abs=1e-3)


def test_errors():
    with pytest.raises(ValueError, match="call update"):
        RangeCollector().range()
    with pytest.raises(ValueError, match="call update"):
        collect([np.array([np.nan, np.inf])]).range()
    rc = collect([np.ones(3)])
    with pytest.raises(ValueError, match="unknown method 'mse'"):
        rc.range("mse")
    with pytest.raises(ValueError, match="percentile"):
        rc.range("percentile", 0)
    with pytest.raises(ValueError, match="even"):
        RangeCollector(bins=7)
