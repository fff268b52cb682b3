"""The 4-bit weight algorithms (rtn, hqq, gptq) on a small layer, and the input Hessians from calibration."""

import numpy as np
import onnx_ir as ir
import pytest
from helpers import F, make_model
from onnx import TensorProto, helper

from onnxopt.passes.wquant.algos import MAXQ, SYMMETRIC_ZERO, Blocks, encode, gptq, hqq, params, rtn
from onnxopt.passes.wquant.calib import input_hessians

K, N, BLOCK = 128, 64, 32


def layer_weight(k=K, n=N, seed=0):
    """Gaussian weights with a few entries six times larger."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.05
    w.flat[rng.choice(k * n, 40, replace=False)] *= 6
    return w


def activations(rows, seed, k=K):
    """Correlated channels of very different gains; the same distribution whatever ``seed``."""
    mix = np.random.default_rng(1).standard_normal((k, k)) * 0.3 + np.eye(k)
    gain = np.exp(np.random.default_rng(2).standard_normal(k))
    return (np.random.default_rng(seed).standard_normal((rows, k)) @ mix) * gain


def output_error(x, w, blocks: Blocks):
    return np.linalg.norm(x @ (blocks.dequantize() - w)) ** 2 / np.linalg.norm(x @ w) ** 2


def check_blocks(b: Blocks, k, n, symmetric):
    assert b.q.dtype == np.uint8 and b.zero.dtype == np.uint8 and b.scale.dtype == np.float32
    assert (
        b.q.shape == (n, -(-k // BLOCK), BLOCK) and b.scale.shape == b.zero.shape == b.q.shape[:2]
    )
    assert b.q.max() <= MAXQ and b.zero.max() <= MAXQ and (b.scale != 0).all()
    if symmetric:
        assert (b.zero == SYMMETRIC_ZERO).all()
    assert b.dequantize().shape == (k, n)


@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_is_exact_on_the_grid(symmetric):
    rng = np.random.default_rng(0)
    blocks = K // BLOCK
    if (
        symmetric
    ):  # codes 0..15 around 8, each block's largest magnitude at code 0 (-8 steps): all 16 codes
        q, zero = rng.integers(1, 16, (N, blocks, BLOCK)), np.full((N, blocks), SYMMETRIC_ZERO)
        q[..., 0] = 0
    else:  # each block spans codes 0..15 and holds its zero point
        q, zero = rng.integers(0, 16, (N, blocks, BLOCK)), rng.integers(0, 16, (N, blocks))
        q[..., 0], q[..., 1] = 0, MAXQ
    scale = rng.uniform(0.01, 0.1, (N, blocks)).astype(np.float32)
    w = Blocks(q.astype(np.uint8), scale, zero.astype(np.uint8), K).dequantize()
    got = rtn(w, BLOCK, symmetric)
    assert (got.scale > 0).all()  # the peak is negative here; a positive one takes a negative scale
    np.testing.assert_array_equal(got.q, q)
    np.testing.assert_array_equal(got.zero, zero)
    np.testing.assert_allclose(got.dequantize(), w, rtol=0, atol=1e-6 * np.abs(w).max())


def test_symmetric_rtn_puts_the_peak_on_code_0_whatever_its_sign():
    w = np.array([[0.1, -0.2], [0.8, 0.3], [-0.4, -0.6]] + [[0.0, 0.0]] * (BLOCK - 3), np.float32)
    b = rtn(w, BLOCK, True)
    np.testing.assert_allclose(b.scale[:, 0], [-0.1, 0.075], rtol=1e-6)  # 0.8 / -8 and -0.6 / -8
    assert b.q[0, 0, 1] == 0 and b.q[1, 0, 2] == 0  # the peaks: 0.8 and -0.6 exactly
    np.testing.assert_allclose(b.dequantize()[[1, 2], [0, 1]], [0.8, -0.6], rtol=1e-6)
    assert b.q[1, 0, 1] == 12  # 0.3 / 0.075 = 4 steps above the zero point


@pytest.mark.parametrize("symmetric, most", [(False, 0.95), (True, 0.95)])
def test_hqq_reconstructs_better_than_rtn(symmetric, most):
    w = layer_weight()
    b = hqq(w, BLOCK, symmetric)
    check_blocks(b, K, N, symmetric)
    err = np.sum((b.dequantize() - w) ** 2)
    base = np.sum((rtn(w, BLOCK, symmetric).dequantize() - w) ** 2)
    assert err < most * base
    x = activations(512, 3)
    assert output_error(x, w, b) < output_error(x, w, rtn(w, BLOCK, symmetric))


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("act_order, most", [(False, 0.8), (True, 0.5)])
def test_gptq_output_error_on_held_out_inputs(symmetric, act_order, most):
    w, x = layer_weight(), activations(512, 3)
    b = gptq(w, BLOCK, symmetric, 2 * x.T @ x, act_order=act_order)
    check_blocks(b, K, N, symmetric)
    held_out = activations(512, 4)
    assert output_error(held_out, w, b) < most * output_error(held_out, w, rtn(w, BLOCK, symmetric))


def textbook_gptq(w, h, symmetric, damp=0.01):
    """The row-by-row OBS update with an explicit inverse Hessian, shrunk after every row (no Cholesky)."""
    x = w.astype(np.float64).T.copy()  # [N, K]
    hinv = np.linalg.inv(h + damp * np.mean(np.diag(h)) * np.eye(len(h)))
    out = np.zeros_like(x)
    for i in range(x.shape[1]):
        if i % BLOCK == 0:
            scale, zero = params(x[:, i : i + BLOCK], symmetric)
        q = encode(x[:, i : i + 1], scale, zero)[:, 0]
        out[:, i] = (q - zero.astype(np.float64)) * scale
        err = (x[:, i] - out[:, i]) / hinv[i, i]
        x[:, i:] -= np.outer(err, hinv[i, i:])
        hinv -= np.outer(hinv[:, i], hinv[i, :]) / hinv[i, i]
    return out.T


@pytest.mark.parametrize("symmetric", [False, True])
def test_gptq_is_the_textbook_update(symmetric):
    w, x = layer_weight(64, 16), activations(256, 3, 64)
    got = gptq(w, BLOCK, symmetric, x.T @ x, blocksize=BLOCK).dequantize()
    np.testing.assert_allclose(got, textbook_gptq(w, x.T @ x, symmetric), rtol=0, atol=1e-6)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_lazy_batches_change_nothing(act_order):
    w, x = layer_weight(), activations(512, 3)
    one = gptq(w, BLOCK, False, x.T @ x, blocksize=BLOCK, act_order=act_order)
    four = gptq(
        w, BLOCK, False, 5 * x.T @ x, blocksize=4 * BLOCK, act_order=act_order
    )  # H's scale is free
    odd = gptq(
        w, BLOCK, False, x.T @ x, blocksize=50, act_order=act_order
    )  # rounded to whole blocks
    for other in (four, odd):
        np.testing.assert_array_equal(one.q, other.q)
        np.testing.assert_allclose(one.scale, other.scale, rtol=1e-6)


@pytest.mark.parametrize("symmetric", [False, True])
def test_gptq_k_not_a_multiple_of_the_block_and_dead_inputs(symmetric):
    k = 100
    w, x = layer_weight(k), activations(256, 3, k)
    x[:, [5, 97]] = 0  # inputs never seen: their weights are free, GPTQ makes them 0
    b = gptq(w, BLOCK, symmetric, x.T @ x)
    check_blocks(b, k, N, symmetric)
    wq = b.dequantize()
    assert np.isfinite(wq).all() and not wq[[5, 97]].any()
    assert output_error(x, w, b) < 0.8 * output_error(x, w, rtn(w, BLOCK, symmetric))
    pad = b.q.reshape(N, -1)[:, k:]  # the padding rows dequantize to 0
    np.testing.assert_array_equal(pad, np.repeat(b.zero[:, -1:], pad.shape[1], 1))


def test_input_hessians_stream_x_transpose_x(tmp_path):
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a"]),
        helper.make_node("MatMul", ["x", "w2"], ["b"]),  # shares x: one entry
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("MatMul", ["r", "w3"], ["y"]),
    ]
    weights = {
        "w1": rng.standard_normal((8, 6)),
        "w2": rng.standard_normal((8, 4)),
        "w3": rng.standard_normal((6, 5)),
    }
    proto = make_model(
        nodes,
        [("x", F, ["batch", 3, 8])],
        [("b", F, ["batch", 3, 4]), ("y", F, ["batch", 3, 5])],
        {k: v.astype(np.float32) for k, v in weights.items()},
    )
    x = rng.standard_normal((40, 3, 8)).astype(
        np.float32
    )  # 40 samples: several calibration batches
    np.savez(tmp_path / "calib.npz", x=x)
    model = ir.serde.deserialize_model(proto)
    matmuls = [n for n in model.graph if n.op_type == "MatMul"]
    sums, rows = input_hessians(model, matmuls, str(tmp_path / "calib.npz"))
    assert sorted(sums) == ["r", "x"] and rows == {"x": 120, "r": 120}
    xs = x.reshape(-1, 8).astype(np.float64)
    rs = np.maximum(x.reshape(-1, 8) @ weights["w1"].astype(np.float32), 0).astype(np.float64)
    assert sums["x"].dtype == np.float64 and sums["x"].shape == (8, 8)
    np.testing.assert_allclose(sums["x"], xs.T @ xs, rtol=1e-10)
    np.testing.assert_allclose(sums["r"], rs.T @ rs, rtol=1e-5)


def test_input_hessians_leave_out_padding_rows(tmp_path):
    """With an attention_mask input, the rows of [batch, seq, K] activations at padding do not count."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "last"], ["m3"]),
        helper.make_node("Add", ["x", "m3"], ["h"]),  # something that reads the mask
        helper.make_node("MatMul", ["h", "w"], ["y"]),
    ]
    proto = make_model(
        nodes,
        [("x", F, ["batch", 4, 8]), ("attention_mask", TensorProto.INT64, ["batch", 4])],
        [("y", F, ["batch", 4, 3])],
        {"w": rng.standard_normal((8, 3)).astype(np.float32), "last": np.array([-1], np.int64)},
    )
    x = rng.standard_normal((6, 4, 8)).astype(np.float32)
    mask = (np.arange(4)[None] < rng.integers(1, 5, (6, 1))).astype(np.int64)
    x[mask == 0] = 1000.0  # padding: huge, and ignored
    np.savez(tmp_path / "calib.npz", x=x, attention_mask=mask)
    model = ir.serde.deserialize_model(proto)
    sums, rows = input_hessians(
        model, [n for n in model.graph if n.op_type == "MatMul"], str(tmp_path / "calib.npz")
    )
    h = (x + mask[..., None].astype(np.float32))[mask != 0].astype(np.float64)
    assert rows == {"h": int(mask.sum())}
    np.testing.assert_allclose(sums["h"], h.T @ h, rtol=1e-6)
