"""Where the time goes: onnxruntime's profiler on several models run alternately on the same inputs
(so a shared machine's noise hits them alike), kernel times per run by node, op type and scope.

A scope is the exporter's module path of a node (``/m/encoder/layer.0/attention/self/query/MatMul``
→ ``/m/encoder/layer.0/attention/self/query``). Nodes onnxruntime made or renamed (QDQ fusions
``<node>_token_7``, NCHWc layout ``<output>_nchwc``, a quantizer's ``<node>_quant``) keep the scope
of the name they came from, so two models built from one export line up scope by scope.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from onnxopt import runtime

RUNS = 30
WARMUP = 3
_MADE_SUFFIX = re.compile(r"(_token_\d+|_nchwc|_quant|_QuantizeLinear|_DequantizeLinear)$")


@dataclasses.dataclass
class Kernel:
    name: str  # the node's name in onnxruntime's optimized graph
    op: str  # the kernel's op type (after onnxruntime's fusions)
    us: float  # median microseconds per run


@dataclasses.dataclass
class Profile:
    model: str
    kernels: list[Kernel]

    @property
    def total_us(self) -> float:
        return sum(k.us for k in self.kernels)

    def by_op(self) -> dict[str, tuple[int, float]]:
        """Op type → (kernels, microseconds per run)."""
        found: dict[str, list] = defaultdict(lambda: [0, 0.0])
        for k in self.kernels:
            found[k.op][0] += 1
            found[k.op][1] += k.us
        return {op: (n, us) for op, (n, us) in found.items()}

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "total_ms": round(self.total_us / 1e3, 4),
            "by_op": {
                op: {"kernels": n, "ms": round(us / 1e3, 4)} for op, (n, us) in self.by_op().items()
            },
            "by_scope_ms": {s: round(us / 1e3, 4) for s, us in self.by_scope().items()},
        }

    def by_scope(self) -> dict[str, float]:
        found: dict[str, float] = defaultdict(float)
        for k in self.kernels:
            found[scope_of(k.name)] += k.us
        return dict(found)


def unmade(name: str) -> str:
    """A kernel's node name without the suffix onnxruntime or a quantizer added to it."""
    return _MADE_SUFFIX.sub("", name)


def scope_of(name: str) -> str:
    """The module path of a node name, with onnxruntime's and quantizers' suffixes taken off."""
    name = unmade(name)
    return name.rsplit("/", 1)[0] if "/" in name.strip("/") else name


def profile(
    models: list[str | os.PathLike],
    feeds: dict[str, np.ndarray],
    *,
    runs: int = RUNS,
    threads: int = 0,
    ep: str = "cpu",
) -> list[Profile]:
    """Each model's kernels, profiled with onnxruntime's graph optimizations on (as users run it),
    the models run alternately ``runs`` times after ``WARMUP`` runs each."""
    with tempfile.TemporaryDirectory(prefix="onnxopt-profile-") as folder:
        sessions = [
            runtime.session(
                path, ep=ep, optimize=True, threads=threads, profile=str(Path(folder, f"p{i}"))
            )
            for i, path in enumerate(models)
        ]
        for _ in range(WARMUP):
            for sess in sessions:
                sess.run(None, feeds)
        for _ in range(runs):
            for sess in sessions:
                sess.run(None, feeds)
        return [
            Profile(str(path), kernels(sess.end_profiling(), WARMUP))
            for path, sess in zip(models, sessions)
        ]


def kernels(profile_file: str, warmup: int = WARMUP) -> list[Kernel]:
    """Median microseconds per run of each kernel in an onnxruntime profile, skipping ``warmup`` runs."""
    runs: dict[str, list[float]] = defaultdict(list)
    ops: dict[str, str] = {}
    for event in json.loads(Path(profile_file).read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            name = event["name"].removesuffix("_kernel_time")
            runs[name].append(event["dur"])
            ops[name] = event.get("args", {}).get("op_name", "?")
    return [
        Kernel(name, ops[name], float(np.median(times[warmup:] or times)))
        for name, times in runs.items()
    ]
