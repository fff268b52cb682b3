"""Conformance: the default passes (fold, prune, fuse) must not change what ONNX's own backend test models compute.

Every node test case of ``onnx.backend.test.case.node`` and every on-disk model under
``onnx/backend/test/data/{simple,pytorch-converted,pytorch-operator}`` is run in onnxruntime
(CPU, graph optimizations off) before and after ``onnxopt.run(model, DEFAULT_PASSES)`` on the
case's own inputs, and the outputs are compared. A case whose original model onnxruntime cannot
load or run is "unusable"; an onnxopt error, an optimized model onnxruntime cannot load or run,
or a different output is "failed".

    pytest -s tests/test_conformance.py        # prints the counts
    python tests/test_conformance.py [NAME...]   # the same, with every failure's reason
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxopt
from onnxopt.pipeline import DEFAULT_PASSES

ort = pytest.importorskip("onnxruntime")

RTOL, ATOL = 1e-4, 1e-5
DATA_SOURCES = ("simple", "pytorch-converted", "pytorch-operator")
# Ops whose outputs differ from run to run: only output names, dtypes and shapes are compared.
RANDOM_OPS = {
    "RandomNormal",
    "RandomNormalLike",
    "RandomUniform",
    "RandomUniformLike",
    "Bernoulli",
    "Multinomial",
}


@dataclasses.dataclass
class Case:
    name: str
    model: onnx.ModelProto
    data_sets: list[list] | None  # one list of inputs per data set, in graph-input order


# -- collecting the cases ----------------------------------------------------------------------


def node_cases() -> Iterator[Case]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the generators compute with inf and NaN
        from onnx.backend.test.case.node import collect_testcases

        cases = collect_testcases(None)
    for case in cases:
        yield Case(f"node/{case.name}", case.model, [list(inputs) for inputs, _ in case.data_sets])


def data_cases() -> Iterator[Case]:
    root = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data")
    for source in DATA_SOURCES:
        for path in sorted(glob.glob(os.path.join(root, source, "*", "model.onnx"))):
            name = f"{source}/{os.path.basename(os.path.dirname(path))}"
            folders = sorted(glob.glob(os.path.join(os.path.dirname(path), "test_data_set_*")))
            try:
                data_sets = [_load_inputs(folder) for folder in folders]
            except Exception:
                data_sets = None  # inputs that are not tensors (sequences, optionals): unusable
            yield Case(name, onnx.load(path), data_sets)


def _load_inputs(folder: str) -> list:
    count = len(glob.glob(os.path.join(folder, "input_*.pb")))
    inputs = []
    for i in range(count):
        with open(os.path.join(folder, f"input_{i}.pb"), "rb") as f:
            inputs.append(onnx.numpy_helper.to_array(onnx.TensorProto.FromString(f.read())))
    return inputs


# -- running and comparing ---------------------------------------------------------------------


def session(model_bytes: bytes):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def feed(model: onnx.ModelProto, inputs: list) -> dict:
    initializers = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in initializers]
    return dict(zip(names, (_as_input(x) for x in inputs)))


def _as_input(x):
    """What onnxruntime takes: numpy arrays (the node cases also hold TensorProtos and numpy scalars)."""
    if isinstance(x, onnx.TensorProto):
        return onnx.numpy_helper.to_array(x)
    if isinstance(x, np.generic):
        return np.asarray(x)
    if isinstance(x, list):
        return [_as_input(v) for v in x]
    return x


def run_all(sess, feeds: list[dict]) -> list[list]:
    names = [o.name for o in sess.get_outputs()]
    return [dict(zip(names, sess.run(names, f))) for f in feeds]


def is_random(model: onnx.ModelProto) -> bool:
    """Whether the model (its subgraphs and functions included) draws random numbers."""

    def nodes(graph):
        for node in graph.node:
            yield node
            for attr in node.attribute:
                if attr.g.node:
                    yield from nodes(attr.g)
                for g in attr.graphs:
                    yield from nodes(g)

    everything = [*nodes(model.graph), *(n for f in model.functions for n in f.node)]
    for node in everything:
        if node.op_type in RANDOM_OPS:
            return True
        # Dropout with a training_mode input may be in training mode: random masks.
        if node.op_type == "Dropout" and len(node.input) > 2 and node.input[2]:
            return True
    return False


def compare(want, got, exact_values: bool, where: str = "") -> str | None:
    """None when ``got`` matches ``want``; else a short reason."""
    if isinstance(want, list) or isinstance(got, list):  # a sequence
        if not (isinstance(want, list) and isinstance(got, list)) or len(want) != len(got):
            return f"{where}: sequence {_describe(want)} became {_describe(got)}"
        for i, (w, g) in enumerate(zip(want, got)):
            if (reason := compare(w, g, exact_values, f"{where}[{i}]")) is not None:
                return reason
        return None
    if want is None or got is None:  # an optional
        return (
            None
            if want is None and got is None
            else f"{where}: {_describe(want)} became {_describe(got)}"
        )
    want, got = np.asarray(want), np.asarray(got)
    if want.dtype != got.dtype or want.shape != got.shape:
        return f"{where}: {_describe(want)} became {_describe(got)}"
    if not exact_values:
        return None
    if want.dtype.kind in "fc":
        wide = np.complex128 if want.dtype.kind == "c" else np.float64
        # Same at the output's own precision: for float16 that is one unit in the last place. onnxruntime's
        # CPU runs float16 Mul and others in float32 between inserted Casts and then cancels a model's
        # Cast(float->float16) against its own Cast(float16->float), skipping the rounding that ONNX
        # requires (microsoft/onnxruntime#8787). Once fold has made that Cast an initializer the rounding
        # happens, so the optimized model can be 1 ulp off the original (and no farther from onnx's reference).
        rtol = max(RTOL, float(np.finfo(want.dtype).eps)) if want.dtype.kind == "f" else RTOL
        try:
            np.testing.assert_allclose(
                got.astype(wide), want.astype(wide), rtol=rtol, atol=ATOL, equal_nan=True
            )
        except AssertionError as e:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            return f"{where}: values differ ({'; '.join(lines[1:4])})"
        return None
    if not np.array_equal(want, got):
        bad = int(np.sum(want != got)) if want.shape == got.shape else "?"
        return f"{where}: {bad} of {want.size} values differ"
    return None


def _describe(x) -> str:
    if isinstance(x, list):
        return f"list of {len(x)}"
    if x is None:
        return "None"
    x = np.asarray(x)
    return f"{x.dtype}{list(x.shape)}"


def check(case: Case) -> tuple[str, str]:
    """("ok" | "failed" | "unusable", reason)."""
    # The original model, as onnxruntime runs it.
    try:
        original = case.model.SerializeToString()
        if case.data_sets is None:
            raise ValueError("inputs that are not tensors")
        feeds = [feed(case.model, inputs) for inputs in case.data_sets]
        sess = session(original)
        expected = run_all(sess, feeds)
    except Exception as e:
        return "unusable", _short(e)
    # The optimized model, from a fresh copy.
    try:
        model = ir.serde.deserialize_model(onnx.ModelProto.FromString(original))
        model, _ = onnxopt.run(model, list(DEFAULT_PASSES))
        optimized = ir.serde.serialize_model(model).SerializeToString()
    except Exception as e:
        return "failed", f"onnxopt raised {_short(e)}"
    try:
        sess = session(optimized)
    except Exception as e:
        return "failed", f"optimized model does not load: {_short(e)}"
    try:
        actual = run_all(sess, feeds)
    except Exception as e:
        return "failed", f"optimized model does not run: {_short(e)}"
    exact_values = not is_random(case.model)
    for i, (want, got) in enumerate(zip(expected, actual)):
        if list(want) != list(got):
            return "failed", f"outputs {list(want)} became {list(got)}"
        for name in want:
            if (
                reason := compare(
                    want[name], got[name], exact_values, f"data set {i} output {name!r}"
                )
            ) is not None:
                return "failed", reason
    return "ok", ""


def _short(e: Exception, limit: int = 300) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


CASE_SECONDS = 60  # a pass that loops forever fails its case instead of hanging the suite


class CaseTimeout(BaseException):
    """A BaseException, so that the passes' ``except Exception`` fallbacks cannot swallow it."""


@contextlib.contextmanager
def time_limit(seconds: int):
    """Raise CaseTimeout in the main thread after ``seconds``, and every second after that until it
    gets out (POSIX; elsewhere no limit)."""
    if (
        not hasattr(signal, "setitimer")
        or threading.current_thread() is not threading.main_thread()
    ):
        yield
        return

    def expire(signum, frame):
        raise CaseTimeout(f"no result after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_cases(
    names: list[str] | None = None,
) -> tuple[dict[str, int], list[tuple[str, str]], float]:
    start = time.perf_counter()
    counts = {"ok": 0, "failed": 0, "unusable": 0}
    failures = []
    for case in [*node_cases(), *data_cases()]:
        if names and not any(n in case.name for n in names):
            continue
        try:
            with warnings.catch_warnings(), time_limit(CASE_SECONDS):
                warnings.simplefilter("ignore", RuntimeWarning)
                status, reason = check(case)
        except CaseTimeout as e:
            status, reason = "failed", str(e)
        counts[status] += 1
        if status == "failed":
            failures.append((case.name, reason))
    return counts, failures, time.perf_counter() - start


# -- the test ----------------------------------------------------------------------------------


def test_default_passes_keep_backend_outputs():
    counts, failures, seconds = run_cases()
    summary = (
        f"conformance: {counts['ok']} ok, {counts['failed']} failed, "
        f"{counts['unusable']} unusable in {seconds:.0f} s"
    )
    print("\n" + summary)
    listing = "\n".join(f"  {name}: {reason}" for name, reason in failures)
    assert not failures, f"{summary}\n{listing}"
    assert counts["ok"] > 1000, f"{summary}: too few usable cases to mean anything"


if __name__ == "__main__":
    counts, failures, seconds = run_cases(sys.argv[1:] or None)
    for name, reason in failures:
        print(f"FAILED {name}: {reason}")
    print(
        f"{counts['ok']} ok, {counts['failed']} failed, {counts['unusable']} unusable in {seconds:.1f} s"
    )
