"""grid=true: weights already on a 4-bit grid (dequantized from GGUF Q4_1: per block of 32 along K,
w = m + d * q) keep their codes and steps; the offsets an integer zero point cannot hold are added
back from the input's block sums."""

import numpy as np
import onnx_ir as ir
import pytest
from helpers import F, make_model, ops, run_proto
from onnx import helper

from onnxopt.passes import Quantize
from onnxopt.passes.wquant.algos import on_grid, rtn

K, N, BLOCK = 96, 40, 32


def q4_1(k=K, n=N, seed=0):
    """A weight [k, n] as GGUF's Q4_1 dequantizes: each block of 32 along k uses codes 0 and 15."""
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 16, (n, k // BLOCK, BLOCK))
    q[..., 0], q[..., 1] = 0, 15
    d = (rng.random((n, k // BLOCK)) * 0.02 + 0.005).astype(np.float16).astype(np.float32)
    # a block's minimum, between -15 steps and 0: LLM weights' blocks straddle zero
    m = (-d * rng.uniform(0, 15, d.shape)).astype(np.float16).astype(np.float32)
    return np.ascontiguousarray(
        (m[..., None] + d[..., None] * q).reshape(n, k).T.astype(np.float32)
    )


def two_layers(w1, w2):
    return make_model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="first"),
            helper.make_node("MatMul", ["x", "w2"], ["y"], name="second"),
        ],
        [("x", F, [3, K])],
        [("h", F, [3, N]), ("y", F, [3, N])],
        {"w1": w1, "w2": w2},
    )


def test_on_grid_gives_the_weight_back_and_refuses_others():
    w = q4_1()
    blocks, offset = on_grid(w, BLOCK)
    restored = blocks.dequantize() + np.repeat(offset.T, BLOCK, axis=0)
    np.testing.assert_allclose(restored, w, atol=1e-6)
    assert np.abs(offset).max() <= 0.5 * blocks.scale.max() + 1e-7  # within half a step
    assert (
        on_grid(np.random.default_rng(1).standard_normal((K, N)).astype(np.float32), BLOCK) is None
    )
    assert on_grid(w, 64) is None  # two Q4_1 blocks are not one 4-bit block


def test_grid_layers_are_near_exact_where_round_to_nearest_is_not():
    w1, w2 = q4_1(seed=0), q4_1(seed=1)
    proto = two_layers(w1, w2)
    x = np.random.default_rng(2).standard_normal((3, K)).astype(np.float32) + 0.5
    ref = run_proto(proto, {"x": x})
    model = ir.serde.deserialize_model(proto)
    result = Quantize(bits=4, accuracy_level=0)(model)
    got = run_proto(model, {"x": x})
    assert any("2 weights were already on a 4-bit grid" in n for n in result.notes)
    # x and its block sums (made once for both layers), then one MatMulNBits a layer
    assert ops(model) == ["MatMul", "Concat", "MatMulNBits", "MatMulNBits"]
    rtn_error = np.abs(x @ rtn(w1, BLOCK, False).dequantize() - ref["h"]).max()
    for name in ("h", "y"):
        error = np.abs(got[name] - ref[name]).max()
        assert error < 0.05 * rtn_error, (name, error, rtn_error)


@pytest.mark.parametrize("options", [{"grid": False}, {"format": "qdq"}])
def test_without_grid_the_layers_are_rounded(options):
    model = ir.serde.deserialize_model(two_layers(q4_1(seed=0), q4_1(seed=1)))
    result = Quantize(bits=4, **options)(model)
    assert not any("grid" in n for n in result.notes)
    assert "MatMul" not in ops(model) or options.get("format") == "qdq"
