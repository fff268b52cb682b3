"""quant(bits=4): packing against numpy, onnxruntime's MatMulNBits and GatherBlockQuantized and
the standard blocked DequantizeLinear against the dequantized blocks, the opset raise, refusals."""

import re

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import F, make_model, ops, run_proto
from onnx import TensorProto, helper

import onnxopt
from onnxopt.errors import UsageError
from onnxopt.passes import Quantize
from onnxopt.passes.wquant.algos import BLOCK_8BIT, SYMMETRIC_ZERO, block_8bit, rtn, rtn_8bit
from onnxopt.passes.wquant.pack import (
    gbq_layout,
    nbits_layout,
    pack_nibbles,
    qdq_layout,
    unpack_nibbles,
)

RNG = np.random.default_rng(0)
K, N, BLOCK = 70, 5, 32  # K not a multiple of the block, N odd
V, D = 9, 80  # a table whose width is not a multiple of the block either


def rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def quantize(proto, **options):
    """Symmetric unless asked otherwise: the references below use rtn(..., symmetric=True). Returns
    the model and the pass's Outcome (notes, rows)."""
    model = ir.serde.deserialize_model(proto)
    result = Quantize(bits=4, **{"symmetric": True, **options})(model)
    assert result.modified
    return model, result


def kept_8bit(notes):
    """The nodes the run's note says keep_8bit kept at 8 bits."""
    for note in notes:
        found = re.fullmatch(r"kept (\d+) nodes \((.*)\) at 8 bits \(keep_8bit\)", note)
        if found:
            names = found[2].split(", ")
            assert int(found[1]) == len(names)
            return names
    return []


def nodes(model, op_type):
    return [n for n in model.graph if n.op_type == op_type]


def matmul_model(w, x_shape=(3, K)):
    y_shape = [1] * (w.ndim - len(x_shape)) + [*x_shape[:-1], w.shape[-1]]
    return make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [("x", F, list(x_shape))],
        [("y", F, y_shape)],
        {"w": w},
    )


def gather_model(table, indices_shape=(2, 3)):
    return make_model(
        [helper.make_node("Gather", ["table", "ids"], ["y"])],
        [("ids", TensorProto.INT64, list(indices_shape))],
        [("y", F, [*indices_shape, table.shape[1]])],
        {"table": table},
    )


IDS = np.array([[0, 8, 3], [2, 2, -1]], np.int64)


def test_nibbles_round_trip_low_nibble_first():
    codes = RNG.integers(0, 16, (4, 7)).astype(np.uint8)  # odd length: the last byte holds one code
    packed = pack_nibbles(codes)
    assert packed.shape == (4, 4)
    np.testing.assert_array_equal(packed[:, 0], codes[:, 0] | (codes[:, 1] << 4))
    np.testing.assert_array_equal(packed[:, 3], codes[:, 6])
    np.testing.assert_array_equal(unpack_nibbles(packed, 7), codes)


@pytest.mark.parametrize("symmetric", [True, False])
def test_matmul_nbits_layout_unpacks_to_the_blocks(symmetric):
    w = rand(K, N)
    blocks = rtn(w, BLOCK, symmetric)
    packed, scales, zeros = nbits_layout(blocks)
    kb = -(-K // BLOCK)
    assert (
        packed.shape == (N, kb, BLOCK // 2)
        and packed.dtype == np.uint8
        and scales.shape == (N * kb,)
    )
    codes = unpack_nibbles(packed, BLOCK).reshape(N, -1)[
        :, :K
    ]  # numpy reference: codes along K per column
    zero = (
        np.full((N, kb), SYMMETRIC_ZERO, np.uint8)
        if zeros is None
        else unpack_nibbles(zeros.reshape(N, -1), kb)
    )
    assert (zeros is None) == symmetric
    if zeros is not None:
        assert zeros.shape == (N * -(-kb // 2),)  # each column's zero points packed apart
    step = np.repeat(scales.reshape(N, kb), BLOCK, 1)[:, :K]
    dq = (codes.astype(np.float32) - np.repeat(zero, BLOCK, 1)[:, :K].astype(np.float32)) * step
    np.testing.assert_array_equal(dq.T, blocks.dequantize())


@pytest.mark.parametrize("symmetric", [True, False])
def test_qdq_layout_is_signed_int4_or_uint4_with_zero_points(symmetric):
    blocks = rtn(rand(K, N), BLOCK, symmetric)
    values, signed, scale, zero = qdq_layout(blocks)
    assert values.shape == (K, N) and scale.shape == (-(-K // BLOCK), N) and signed == symmetric
    if symmetric:
        assert values.dtype == np.int8 and values.min() >= -8 and values.max() <= 7 and zero is None
        zero = np.zeros_like(scale)
    rows = np.arange(K) // BLOCK
    np.testing.assert_array_equal(
        (values.astype(np.float32) - zero[rows].astype(np.float32)) * scale[rows],
        blocks.dequantize(),
    )


@pytest.mark.parametrize("symmetric", [True, False])
def test_matmul_nbits_in_onnxruntime_is_x_times_the_dequantized_weight(symmetric):
    w, x = rand(K, N), rand(3, K)
    model, _ = quantize(matmul_model(w), symmetric=symmetric, accuracy_level=0)
    (node,) = nodes(model, "MatMulNBits")
    assert node.domain == "com.microsoft" and model.opset_imports["com.microsoft"] == 1
    assert len(node.inputs) == (3 if symmetric else 4)  # no zero points: onnxruntime's default 8
    a = node.attributes
    assert (a["K"].value, a["N"].value, a["bits"].value, a["block_size"].value) == (K, N, 4, BLOCK)
    assert "accuracy_level" not in a
    expected = x @ rtn(w, BLOCK, symmetric).dequantize()
    np.testing.assert_allclose(run_proto(model, {"x": x})["y"], expected, rtol=1e-4, atol=1e-4)


def test_matmul_nbits_keeps_the_leading_ones_of_a_weight():
    w, x = rand(1, 1, K, N), rand(3, K)
    model, _ = quantize(matmul_model(w), accuracy_level=4)
    assert ops(model) == ["MatMulNBits", "Unsqueeze"]
    assert nodes(model, "MatMulNBits")[0].attributes["accuracy_level"].value == 4
    got = run_proto(model, {"x": x})["y"]
    assert got.shape == (1, 1, 3, N)
    # accuracy_level=4 quantizes x to int8 inside the kernel
    np.testing.assert_allclose(
        got[0, 0], x @ rtn(w[0, 0], BLOCK, True).dequantize(), rtol=0.05, atol=0.05
    )


@pytest.mark.parametrize("symmetric", [True, False])
def test_gather_block_quantized_returns_the_dequantized_rows(symmetric):
    table = rand(V, D)
    model, _ = quantize(gather_model(table), symmetric=symmetric)
    (node,) = nodes(model, "GatherBlockQuantized")
    data = node.inputs[0].const_value.numpy()
    assert (
        data.dtype == np.uint8
        and data.shape == (V, D // 2)
        and len(node.inputs) == (3 if symmetric else 4)
    )
    blocks = rtn(table.T, BLOCK, symmetric)
    np.testing.assert_array_equal(data, gbq_layout(blocks)[0])
    np.testing.assert_allclose(
        run_proto(model, {"ids": IDS})["y"], blocks.dequantize().T[IDS], rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("symmetric", [True, False])
def test_qdq_is_standard_opset_21_and_matches_numpy(symmetric):
    w, table, x = rand(K, N), rand(V, D), rand(2, 3, K)
    proto = make_model(
        [
            helper.make_node("Gather", ["table", "ids"], ["e"]),
            helper.make_node(
                "ReduceMean", ["e"], ["m"], axes=[-1], keepdims=0
            ),  # axes become an input at 18
            helper.make_node("MatMul", ["x", "w"], ["y"]),
        ],
        [("ids", TensorProto.INT64, [2, 3]), ("x", F, [2, 3, K])],
        [("m", F, [2, 3]), ("y", F, [2, 3, N]), ("e", F, [2, 3, D])],
        {"w": w, "table": table},
    )
    model, _ = quantize(proto, symmetric=symmetric, format="qdq")
    out = ir.serde.serialize_model(model)
    onnx.checker.check_model(out, full_check=True)
    assert model.opset_imports[""] == 21 and model.ir_version >= 10
    assert all(n.domain in ("", "ai.onnx") for n in model.graph)
    weight_types = {
        dq.inputs[0].dtype
        for dq in nodes(model, "DequantizeLinear")
        if dq.inputs[0].const_value is not None
    }
    assert weight_types == {ir.DataType.INT4 if symmetric else ir.DataType.UINT4}
    got = run_proto(out, {"ids": IDS, "x": x})
    np.testing.assert_allclose(
        got["y"], x @ rtn(w, BLOCK, symmetric).dequantize(), rtol=1e-4, atol=1e-4
    )
    rows = rtn(table.T, BLOCK, symmetric).dequantize().T[IDS]
    np.testing.assert_allclose(got["m"], rows.mean(-1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["e"], rows, rtol=1e-6, atol=1e-6)


def test_qdq_weight_with_leading_ones_stays_n_d():
    w, x = rand(1, K, N), rand(3, K)
    model, _ = quantize(matmul_model(w), format="qdq")
    (dq,) = nodes(model, "DequantizeLinear")
    assert dq.attributes["axis"].value == 1 and dq.inputs[1].shape == ir.Shape([1, 3, N])
    got = run_proto(model, {"x": x})["y"]
    np.testing.assert_allclose(
        got, (x @ rtn(w[0], BLOCK, True).dequantize())[None], rtol=1e-4, atol=1e-4
    )


def test_shared_weight_quantized_once_and_reported_per_layer():
    w = rand(K, N)
    proto = make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["y1"], name="first"),
            helper.make_node("Identity", ["x"], ["y0"]),
            helper.make_node("MatMul", ["y0", "w"], ["y2"], name="second"),
        ],
        [("x", F, [2, K])],
        [("y1", F, [2, N]), ("y2", F, [2, N])],
        {"w": w},
    )
    model, result = quantize(proto)
    assert len(model.graph.initializers) == 2  # one packed weight and its scales
    rows = result.rows
    assert [r["layer"] for r in rows] == ["first", "second"]
    mse = float(np.mean((rtn(w, BLOCK, True).dequantize().astype(np.float64) - w) ** 2))
    for row in rows:
        assert (row["weight"], row["bits"], row["block"], row["activation"]) == (
            "int4",
            4,
            BLOCK,
            "float32",
        )
        assert row["weight_mse"] == pytest.approx(mse)
        assert row["output"] in ("y1", "y2")


@pytest.mark.parametrize("fmt", ["ort", "qdq"])
def test_keep_8bit_is_weight_only_8bit_blocks(fmt):
    w1, w2 = rand(K, 64), rand(64, N)
    proto = make_model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="a"),
            helper.make_node("MatMul", ["h", "w2"], ["y"], name="b"),
        ],
        [("x", F, [2, K])],
        [("y", F, [2, N])],
        {"w1": w1, "w2": w2},
    )
    level = {"accuracy_level": 0} if fmt == "ort" else {}
    model, result = quantize(proto, keep_8bit="b", format=fmt, **level)
    assert "MatMulInteger" not in ops(model) and "DynamicQuantizeLinear" not in ops(
        model
    )  # activations stay float
    if fmt == "ort":
        assert [n.attributes["bits"].value for n in nodes(model, "MatMulNBits")] == [4, 8]
        # 8-bit at level 4 (its fast kernel on CPU), 4-bit at the user's level (0, left out)
        assert [n.attributes.get_int("accuracy_level", 0) for n in nodes(model, "MatMulNBits")] == [
            0,
            4,
        ]
    else:
        dtypes = {ir.DataType(n.inputs[0].dtype).name for n in nodes(model, "DequantizeLinear")}
        assert dtypes == {"INT4", "INT8"}
        onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    assert kept_8bit(result.notes) == ["b"] and any("keep_8bit" in n for n in result.notes)
    assert {(r["weight"], r["block"]) for r in result.rows} == {
        ("int4", BLOCK),
        ("int8", 64),
    }  # K = 64 fits one block
    x = rand(2, K)
    h = x @ rtn(w1, BLOCK, True).dequantize()
    expected = h @ rtn_8bit(w2, 64).dequantize()
    # at level 4 the kernel quantizes its input to int8 per block (measured: 0.4% of the largest output)
    np.testing.assert_allclose(
        run_proto(model, {"x": x})["y"], expected, rtol=0.01, atol=0.01 * np.abs(expected).max()
    )
    assert (
        np.abs(expected - h @ w2).max() < 0.01 * np.abs(h @ w2).max()
    )  # 8 bits: near the float layer


def test_8bit_block_is_128_or_the_least_that_holds_k():
    assert [block_8bit(k) for k in (8, 16, 32, 70, 128, 384, 1536)] == [
        16,
        16,
        32,
        128,
        128,
        128,
        128,
    ]


def test_8bit_blocks_are_symmetric_codes_about_128():
    w = rand(K, N)
    blocks = rtn_8bit(w, BLOCK_8BIT)
    assert blocks.symmetric and blocks.q.shape == (N, 1, BLOCK_8BIT) and blocks.q.min() >= 1
    assert (blocks.q.reshape(N, -1)[:, K:] == 128).all()  # padding rows encode 0
    np.testing.assert_allclose(blocks.dequantize(), w, atol=float(np.abs(w).max()) / 254 + 1e-7)
    packed, scales, zeros = nbits_layout(blocks)
    assert packed.dtype == np.uint8 and packed.shape == (N, 1, BLOCK_8BIT) and zeros is None
    values, signed, _, _ = qdq_layout(blocks)
    assert signed and values.dtype == np.int8 and values.shape == (K, N)
    np.testing.assert_array_equal(values.astype(np.int16) + 128, blocks.q.reshape(N, -1)[:, :K].T)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"block": 24}, "power of two"),
        ({"block": 8}, r"option block must be within \[16, inf\], got 8"),
        ({"bits": 3}, "option bits takes one of 4, 8, got 3"),
        ({"algo": "gptq"}, "needs calib"),
        ({"algo": "awq"}, "option algo takes one of auto, rtn, hqq, gptq, got 'awq'"),
        ({"format": "gguf"}, "option format takes one of ort, qdq, got 'gguf'"),
        ({"accuracy_level": 5}, r"option accuracy_level takes one of auto, 0, 1, 2, 3, 4, got 5"),
        ({"mode": "static", "calib": "random"}, "mode=static does not apply"),
        ({"keep_8bit": "auto"}, "keep_8bit=auto needs calib"),
    ],
)
def test_refusals(options, message):
    with pytest.raises(UsageError, match=message):
        Quantize(**{"bits": 4, **options})


def test_int4_options_need_bits_4():
    with pytest.raises(UsageError, match="block apply to bits=4 only"):
        Quantize(block=64)


def test_tune_is_skipped_with_a_note():
    model, result = quantize(matmul_model(rand(K, N)), tune="latency")
    assert any("tune does not apply" in n for n in result.notes)


def test_columns_quantized_in_chunks_give_the_same_blocks(monkeypatch):
    from onnxopt.passes.wquant import wquant as _quant_int4

    w = rand(K, 11)
    monkeypatch.setattr(_quant_int4, "CHUNK", 3 * K)  # three columns per call, the last call two
    blocks, mse = _quant_int4._blocks(w, lambda part: rtn(part, BLOCK, False))
    whole = rtn(w, BLOCK, False)
    for field in ("q", "scale", "zero"):
        np.testing.assert_array_equal(getattr(blocks, field), getattr(whole, field))
    assert mse == pytest.approx(float(np.mean((whole.dequantize().astype(np.float64) - w) ** 2)))


def test_nothing_to_quantize_leaves_the_opset_and_says_so():
    proto = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [("x", F, [2, K]), ("w", F, [K, N])],
        [("y", F, [2, N])],
    )
    model = ir.serde.deserialize_model(proto)
    result = Quantize(bits=4, format="qdq")(model)
    assert not result.modified
    assert model.opset_imports[""] == 17 and any("nothing to quantize" in n for n in result.notes)


def test_keep_8bit_auto_keeps_the_costliest_layer_per_byte(tmp_path):
    """A small weight with one outlier per block loses most at 4 bits: auto keeps it at 8, within the budget."""
    hard = rand(32, 32) * 0.1
    hard[::32] = 20.0  # one huge weight per block: 4 bits leave the rest of the block at zero
    easy = rand(
        128, 512
    )  # large enough that the budget (3% of the 4-bit bytes) holds the small layer
    proto = make_model(
        [
            helper.make_node("MatMul", ["a", "hard"], ["y1"], name="hard_mm"),
            helper.make_node("MatMul", ["b", "easy"], ["y2"], name="easy_mm"),
        ],
        [("a", F, [4, 32]), ("b", F, [4, 128])],
        [("y1", F, [4, 32]), ("y2", F, [4, 512])],
        {"hard": hard, "easy": easy},
    )
    np.savez(tmp_path / "calib.npz", a=rand(16, 4, 32), b=rand(16, 4, 128))
    model, result = quantize(
        proto, calib=str(tmp_path / "calib.npz"), algo="rtn"
    )  # keep_8bit=auto is the default
    assert kept_8bit(result.notes) == ["hard_mm"]
    assert [n.attributes["bits"].value for n in nodes(model, "MatMulNBits")] == [8, 4]


def test_auto_defaults_use_the_calibration_data_when_given():
    plain, calibrated = Quantize(bits=4), Quantize(bits=4, calib="random")
    assert (plain.int4_algo, plain.auto_8bit) == ("rtn", False)  # data-free: nothing to refuse
    assert (calibrated.int4_algo, calibrated.auto_8bit) == ("gptq", True)
    assert Quantize(bits=4, calib="random", algo="hqq", keep_8bit="").int4_algo == "hqq"


def tied_decoder(table):
    """ids → Gather(table) → MatMul(·, Transpose(table)): a head tied to the embedding table."""
    v, d = table.shape
    return make_model(
        [
            helper.make_node("Gather", ["table", "ids"], ["h"], name="embed"),
            helper.make_node("Transpose", ["table"], ["table_t"], perm=[1, 0], name="tie"),
            helper.make_node("MatMul", ["h", "table_t"], ["logits"], name="lm_head"),
        ],
        [("ids", TensorProto.INT64, [2, 3])],
        [("logits", F, [2, 3, v])],
        {"table": table},
    )


@pytest.mark.parametrize("fmt", ["ort", "qdq"])
def test_a_head_tied_through_transpose_is_quantized(fmt):
    """The table is quantized for the lookup and, as its transpose, for the head; no float copy is
    left, and the logits are the dequantized rows times the dequantized head."""
    table = rand(40, 64)
    options = {"format": fmt, **({"accuracy_level": 0} if fmt == "ort" else {})}
    model, result = quantize(tied_decoder(table), **options)
    floats = [
        v for v in model.graph.initializers.values() if v.const_value.dtype == ir.DataType.FLOAT
    ]
    assert all(v.const_value.size < table.size for v in floats)
    assert "Transpose" not in ops(model)
    assert {"embed", "lm_head"} <= {r["layer"] for r in result.rows}
    head = rtn(table.T, BLOCK, True).dequantize()  # [K=64, N=40]
    rows = rtn(table.T, BLOCK, True).dequantize().T[IDS_TIED]
    got = run_proto(model, {"ids": IDS_TIED})["logits"]
    np.testing.assert_allclose(got, rows @ head, rtol=1e-4, atol=1e-4)
    if fmt == "ort":
        assert {"MatMulNBits", "GatherBlockQuantized"} <= set(ops(model))
        # one packed table, read by both; its zero points are the lookup's own (packed apart)
        packed = [
            v
            for v in model.graph.initializers.values()
            if v.const_value.dtype == ir.DataType.UINT8 and v.const_value.size >= table.size // 2
        ]
        assert len(packed) == 1 and packed[0].const_value.shape == (40, 64 // BLOCK, BLOCK // 2)


IDS_TIED = np.array([[0, 39, 3], [2, 2, 17]], np.int64)


def test_a_transposed_weight_the_pass_skips_stays_as_it_was():
    """A Transpose of a constant the pass would not quantize (excluded): no float copy is added."""
    table = rand(40, 64)
    model = ir.serde.deserialize_model(tied_decoder(table))
    Quantize(bits=4, exclude=["lm_head"])(model)
    assert "Transpose" in ops(model)
    assert not any("transposed" in name for name in model.graph.initializers)
    assert model.graph.initializers["table"].const_value.shape == table.shape


def test_a_tied_table_in_external_data(tmp_path):
    """The table is mapped from external data: unmapping it after the lookup is quantized must wait
    for the head, which still reads a view of it (a BufferError before)."""
    table = rand(40, 64)
    path = tmp_path / "tied.onnx"
    onnx.save(tied_decoder(table), str(path), save_as_external_data=True, size_threshold=0)
    model, _ = onnxopt.optimize(str(path), ["quant(bits=4,symmetric=true)"], check=False)
    head = rtn(table.T, BLOCK, True).dequantize()
    got = run_proto(model, {"ids": IDS_TIED})["logits"]
    np.testing.assert_allclose(got, head.T[IDS_TIED] @ head, rtol=1e-4, atol=1e-4)
