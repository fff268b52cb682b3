"""Which ranks make a layer faster in onnxruntime: the product x·W against (x·A)·B, timed side by
side on the CPU at the row count of a calibration run. A 1x1 Conv is timed as the MatMul of its
positions (onnxruntime runs both as one GEMM)."""

from __future__ import annotations

import statistics
import time

import numpy as np
import onnx

from onnxopt import runtime

ROUNDS = 7  # alternating rounds; the median of each variant's best-of-RUNS times
RUNS = 3
FASTER = 0.97  # a factorized product must take at most this share of the full one's time


def _model(k: int, n: int, rank: int | None) -> bytes:
    """y = x·W, or (x·A)·B at ``rank``: random weights (only the time matters)."""
    rng = np.random.default_rng(0)
    h = onnx.helper
    x = h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["m", k])
    y = h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["m", n])

    def weight(name: str, shape: tuple[int, int]) -> onnx.TensorProto:
        return onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    if rank is None:
        nodes, inits = [h.make_node("MatMul", ["x", "w"], ["y"])], [weight("w", (k, n))]
    else:
        nodes = [h.make_node("MatMul", ["x", "a"], ["t"]), h.make_node("MatMul", ["t", "b"], ["y"])]
        inits = [weight("a", (k, rank)), weight("b", (rank, n))]
    graph = h.make_graph(nodes, "product", [x], [y], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 13)])
    return model.SerializeToString()


def _median_times(sessions: list, feeds: dict[str, np.ndarray]) -> list[float]:
    for sess in sessions:
        sess.run(None, feeds)
    rounds: list[list[float]] = [[] for _ in sessions]
    for _ in range(ROUNDS):
        for sess, times in zip(sessions, rounds):
            best = float("inf")
            for _ in range(RUNS):
                start = time.perf_counter()
                sess.run(None, feeds)
                best = min(best, time.perf_counter() - start)
            times.append(best)
    return [statistics.median(t) for t in rounds]


def model_ms(model: bytes, feeds: dict[str, np.ndarray]) -> float:
    """The median time of a whole model's run on ``feeds``, in ms."""
    sess = runtime.session(model, optimize=True, threads=runtime.every_core())
    wanted = {i.name for i in sess.get_inputs()}
    return _median_times([sess], {k: v for k, v in feeds.items() if k in wanted})[0] * 1e3


def faster_ranks(k: int, n: int, rows: int, ranks: list[int]) -> tuple[dict[int, float], float]:
    """The measured time of x·A·B at each of ``ranks`` over that of x·W (x [rows, K]), and the
    full product's time in ms."""
    sessions = [runtime.session(_model(k, n, None), optimize=True, threads=runtime.every_core())]
    sessions += [
        runtime.session(_model(k, n, r), optimize=True, threads=runtime.every_core()) for r in ranks
    ]
    x = np.random.default_rng(1).standard_normal((rows, k)).astype(np.float32)
    full, *times = _median_times(sessions, {"x": x})
    return {r: t / full for r, t in zip(ranks, times)}, full * 1e3
