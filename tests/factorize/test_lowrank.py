"""factorize's numbers: the truncation bases, their error curves, the refit and the allocation."""

import numpy as np
import pytest

from onnxopt.passes.factorize import lowrank
from onnxopt.passes.factorize.allocate import allocate, hull


def correlated(rng, rows=2000, k=48):
    """Inputs whose channels are strongly correlated and of very different scales."""
    mix = rng.standard_normal((k, k)) * np.logspace(0, -2, k)[:, None]
    return rng.standard_normal((rows, k)) @ mix + 0.1 * rng.standard_normal((rows, k))


def error(x, w, a, b):
    return float(np.sum(np.square(x @ w - x @ a @ b)))


@pytest.mark.parametrize("method", lowrank.METHODS)
def test_full_rank_reconstructs_exactly(method):
    rng = np.random.default_rng(0)
    x = correlated(rng)
    w = rng.standard_normal((48, 32))
    b = lowrank.basis(w, method, x.T @ x, np.abs(x).mean(0))
    np.testing.assert_allclose(b.left @ b.right, w, atol=1e-9)
    assert b.tail[-1] == pytest.approx(0.0, abs=1e-9)


def test_whitened_truncation_beats_plain_svd_on_correlated_inputs():
    rng = np.random.default_rng(1)
    x = correlated(rng)
    w = rng.standard_normal((48, 32))
    gram = x.T @ x
    whiten = lowrank.basis(w, "whiten", gram)
    asvd = lowrank.basis(w, "asvd", gram, np.abs(x).mean(0))
    plain = lowrank.basis(w, "plain", gram)
    for rank in (4, 8, 16, 24):
        e_whiten = error(x, w, *whiten.factors(rank))
        e_asvd = error(x, w, *asvd.factors(rank))
        e_plain = error(x, w, *plain.factors(rank))
        assert e_whiten <= e_asvd * (1 + 1e-9) and e_whiten <= e_plain * (1 + 1e-9)
        # the tails are the errors on the data, measured with the damped Gram matrix
        for b in (whiten, plain):
            delta = w - b.left[:, :rank] @ b.right[:rank]
            damped_error = np.sum(delta * (lowrank.damped(gram) @ delta))
            assert b.tail[rank] == pytest.approx(damped_error, rel=1e-6)
    assert error(x, w, *whiten.factors(8)) < 0.5 * error(x, w, *plain.factors(8))


def test_dead_inputs_do_not_crash():
    """Channels that never fire make X^T X singular; the damping keeps the Cholesky factor."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((500, 16))
    x[:, [3, 7, 8]] = 0.0
    w = rng.standard_normal((16, 12))
    b = lowrank.basis(w, "whiten", x.T @ x)
    assert np.all(np.isfinite(b.left)) and np.all(np.isfinite(b.right))
    np.testing.assert_allclose(x @ b.left @ b.right, x @ w, atol=1e-6)
    zero = lowrank.basis(w, "whiten", np.zeros((16, 16)))  # no data at all
    assert np.all(np.isfinite(zero.left))


def test_diagonal_gram_weights_rows():
    """An embedding's Gram matrix is its token counts: frequent rows are kept best."""
    rng = np.random.default_rng(3)
    table = rng.standard_normal((200, 24))
    counts = np.where(np.arange(200) < 20, 100.0, 0.1)
    b = lowrank.basis(table, "whiten", counts)
    approx = b.left[:, :20] @ b.right[:20]
    row_error = np.sum(np.square(table - approx), axis=1)
    assert row_error[:20].mean() < 0.1 * row_error[20:].mean()
    np.testing.assert_allclose(b.left @ b.right, table, atol=1e-9)


def test_refit_recovers_from_drifted_inputs():
    """B refit on drifted activations X̃ to the original output X W beats the truncation's B."""
    rng = np.random.default_rng(4)
    x = correlated(rng)
    drifted = x + 0.3 * rng.standard_normal(x.shape) @ np.diag(np.abs(x).mean(0))
    w = rng.standard_normal((48, 32))
    b = lowrank.basis(w, "whiten", x.T @ x)
    a, b0 = b.factors(12)
    b1 = lowrank.refit_right(a, drifted.T @ drifted, drifted.T @ (x @ w), 1e-6, b0)
    target = x @ w
    assert np.sum(np.square(drifted @ a @ b1 - target)) < np.sum(
        np.square(drifted @ a @ b0 - target)
    )


def test_ranks_stay_below_break_even():
    assert lowrank.break_even(384, 384) == 192
    assert lowrank.ranks(384, 384, 16, 0.9) == list(range(160, 0, -16))
    assert lowrank.ranks(8, 8, 16, 0.9) == []


def test_allocation_follows_the_hull():
    # a layer whose first step is expensive but the second cheap is priced by the hull
    jump = [(0.0, 0.0, None), (10.0, 5.0, 32), (30.0, 6.0, 16)]
    smooth = [(0.0, 0.0, None), (10.0, 2.0, 32), (20.0, 10.0, 16)]
    assert [p[2] for p in hull(jump)] == [None, 16]
    ranks, saved, predicted = allocate([jump, smooth], saved=30)
    assert ranks == [16, None] and saved == 30 and predicted == 6
    ranks, saved, predicted = allocate([jump, smooth], budget=3)
    assert ranks == [None, 32] and predicted == 2


@pytest.mark.parametrize("gram", ["full", "diagonal", "none"])
def test_equalized_keeps_the_product_and_levels_the_intermediate(gram):
    """Every channel of x·A carries the same energy on the calibration rows (int8 of that
    intermediate takes one scale per tensor), and A·B is unchanged."""
    rng = np.random.default_rng(5)
    x = correlated(rng)
    w = rng.standard_normal((48, 32))
    grams = {"full": x.T @ x, "diagonal": np.sum(np.square(x), axis=0), "none": None}
    a, b = lowrank.basis(w, "whiten", x.T @ x).factors(12)
    a2, b2 = lowrank.equalized(a, b, grams[gram])
    np.testing.assert_allclose(a2 @ b2, a @ b, rtol=1e-9, atol=1e-9)
    before = np.sum(np.square(x @ a), axis=0)
    assert before.max() > 10 * before.min()  # the truncation's split: s_j² per channel
    if gram == "full":
        energy = np.sum(np.square(x @ a2), axis=0)
    elif gram == "diagonal":
        energy = grams["diagonal"] @ np.square(a2)
    else:
        energy = np.sum(np.square(a2), axis=0)
    np.testing.assert_allclose(energy, energy[0], rtol=1e-6)
