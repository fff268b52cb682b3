"""A tiny Llama-style decoder built with onnx.helper: embedding, per layer RMSNorm, grouped-query
attention (4 query heads sharing 2 key/value heads, rotary embedding by constant cos/sin tables,
causal mask) and a SiLU-gated MLP, a final RMSNorm and a head tied to the embedding table through a
Transpose, as torch.onnx exports SmolLM2."""

from __future__ import annotations

import numpy as np
from helpers import F, make_model
from onnx import TensorProto, helper

VOCAB, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN = 96, 64, 4, 2, 16, 128
SEQ = 6


def _weights(layers: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)

    out = {"table": rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)}
    for i in range(layers):
        out |= {
            f"q{i}": w(HIDDEN, HEADS * HEAD_DIM),
            f"k{i}": w(HIDDEN, KV_HEADS * HEAD_DIM),
            f"v{i}": w(HIDDEN, KV_HEADS * HEAD_DIM),
            f"o{i}": w(HEADS * HEAD_DIM, HIDDEN),
            f"gate{i}": w(HIDDEN, FFN),
            f"up{i}": w(HIDDEN, FFN),
            f"down{i}": w(FFN, HIDDEN),
        }
    return out


def _constants() -> dict[str, np.ndarray]:
    position = np.arange(SEQ)[:, None] * (1e4 ** (-np.arange(0, HEAD_DIM, 2) / HEAD_DIM))[None]
    angles = np.concatenate([position, position], -1).astype(np.float32)  # [SEQ, HEAD_DIM]
    mask = np.triu(np.full((SEQ, SEQ), -1e9, np.float32), 1)
    return {
        "cos": np.cos(angles),
        "sin": np.sin(angles),
        "mask": mask,
        "eps": np.array(1e-5, np.float32),
        "q_shape": np.array([1, SEQ, HEADS, HEAD_DIM], np.int64),
        "kv_shape": np.array([1, SEQ, KV_HEADS, HEAD_DIM], np.int64),
        "kv_grouped": np.array([1, KV_HEADS, 1, SEQ, HEAD_DIM], np.int64),
        "kv_expanded": np.array([1, KV_HEADS, HEADS // KV_HEADS, SEQ, HEAD_DIM], np.int64),
        "kv_heads": np.array([1, HEADS, SEQ, HEAD_DIM], np.int64),
        "merged": np.array([1, SEQ, HEADS * HEAD_DIM], np.int64),
        "scale": np.array(HEAD_DIM**-0.5, np.float32),
        "half": np.array([HEAD_DIM // 2], np.int64),
        "end": np.array([HEAD_DIM], np.int64),
        "zero": np.array([0], np.int64),
        "last": np.array([-1], np.int64),
    }


def _rms_norm(x: str, out: str, nodes: list) -> None:
    nodes += [
        helper.make_node("Mul", [x, x], [f"{out}.sq"]),
        helper.make_node("ReduceMean", [f"{out}.sq"], [f"{out}.ms"], axes=[-1]),
        helper.make_node("Add", [f"{out}.ms", "eps"], [f"{out}.mse"]),
        helper.make_node("Sqrt", [f"{out}.mse"], [f"{out}.rms"]),
        helper.make_node("Div", [x, f"{out}.rms"], [out]),
    ]


def _rotary(x: str, out: str, nodes: list) -> None:
    """x [1, heads, SEQ, HEAD_DIM] → x cos + rotate_half(x) sin."""
    nodes += [
        helper.make_node("Slice", [x, "zero", "half", "last"], [f"{out}.lo"]),
        helper.make_node("Slice", [x, "half", "end", "last"], [f"{out}.hi"]),
        helper.make_node("Neg", [f"{out}.hi"], [f"{out}.nhi"]),
        helper.make_node("Concat", [f"{out}.nhi", f"{out}.lo"], [f"{out}.rot"], axis=-1),
        helper.make_node("Mul", [x, "cos"], [f"{out}.c"]),
        helper.make_node("Mul", [f"{out}.rot", "sin"], [f"{out}.s"]),
        helper.make_node("Add", [f"{out}.c", f"{out}.s"], [out]),
    ]


def _layer(i: int, x: str, nodes: list) -> str:
    p = f"l{i}"
    _rms_norm(x, f"{p}.n1", nodes)
    for name, shape in (("q", "q_shape"), ("k", "kv_shape"), ("v", "kv_shape")):
        nodes += [
            helper.make_node(
                "MatMul", [f"{p}.n1", f"{name}{i}"], [f"{p}.{name}"], name=f"{p}.{name}_proj"
            ),
            helper.make_node("Reshape", [f"{p}.{name}", shape], [f"{p}.{name}4"]),
            helper.make_node("Transpose", [f"{p}.{name}4"], [f"{p}.{name}h"], perm=[0, 2, 1, 3]),
        ]
    _rotary(f"{p}.qh", f"{p}.qr", nodes)
    _rotary(f"{p}.kh", f"{p}.kr", nodes)
    for name, src in (("k", f"{p}.kr"), ("v", f"{p}.vh")):  # grouped-query: each kv head serves 2
        nodes += [
            helper.make_node("Reshape", [src, "kv_grouped"], [f"{p}.{name}g"]),
            helper.make_node("Expand", [f"{p}.{name}g", "kv_expanded"], [f"{p}.{name}e"]),
            helper.make_node("Reshape", [f"{p}.{name}e", "kv_heads"], [f"{p}.{name}all"]),
        ]
    nodes += [
        helper.make_node("Transpose", [f"{p}.kall"], [f"{p}.kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", [f"{p}.qr", f"{p}.kt"], [f"{p}.scores"]),
        helper.make_node("Mul", [f"{p}.scores", "scale"], [f"{p}.scaled"]),
        helper.make_node("Add", [f"{p}.scaled", "mask"], [f"{p}.masked"]),
        helper.make_node("Softmax", [f"{p}.masked"], [f"{p}.probs"], axis=-1),
        helper.make_node("MatMul", [f"{p}.probs", f"{p}.vall"], [f"{p}.ctx"]),
        helper.make_node("Transpose", [f"{p}.ctx"], [f"{p}.ctxt"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", [f"{p}.ctxt", "merged"], [f"{p}.ctxm"]),
        helper.make_node("MatMul", [f"{p}.ctxm", f"o{i}"], [f"{p}.attn"], name=f"{p}.o_proj"),
        helper.make_node("Add", [x, f"{p}.attn"], [f"{p}.h"]),
    ]
    _rms_norm(f"{p}.h", f"{p}.n2", nodes)
    nodes += [
        helper.make_node("MatMul", [f"{p}.n2", f"gate{i}"], [f"{p}.g"], name=f"{p}.gate_proj"),
        helper.make_node("Sigmoid", [f"{p}.g"], [f"{p}.gs"]),
        helper.make_node("Mul", [f"{p}.g", f"{p}.gs"], [f"{p}.silu"]),
        helper.make_node("MatMul", [f"{p}.n2", f"up{i}"], [f"{p}.u"], name=f"{p}.up_proj"),
        helper.make_node("Mul", [f"{p}.silu", f"{p}.u"], [f"{p}.gu"]),
        helper.make_node("MatMul", [f"{p}.gu", f"down{i}"], [f"{p}.mlp"], name=f"{p}.down_proj"),
        helper.make_node("Add", [f"{p}.h", f"{p}.mlp"], [f"{p}.out"]),
    ]
    return f"{p}.out"


def decoder(layers: int = 2, seed: int = 0, weights: dict | None = None):
    """The decoder as an onnx ModelProto: input_ids int64 [1, SEQ] -> logits [1, SEQ, VOCAB]. With
    ``weights``, those arrays (same names and shapes) instead of the seeded random ones."""
    arrays = weights if weights is not None else _weights(layers, seed)
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["embedded"], name="embed")]
    x = "embedded"
    for i in range(layers):
        x = _layer(i, x, nodes)
    _rms_norm(x, "final", nodes)
    nodes += [
        helper.make_node("Transpose", ["table"], ["table_t"], perm=[1, 0], name="tie"),
        helper.make_node("MatMul", ["final", "table_t"], ["logits"], name="lm_head"),
    ]
    return make_model(
        nodes,
        [("input_ids", TensorProto.INT64, [1, SEQ])],
        [("logits", F, [1, SEQ, VOCAB])],
        {**arrays, **_constants()},
    )


def weights(layers: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    return _weights(layers, seed)
