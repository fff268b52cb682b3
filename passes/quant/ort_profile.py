"""Per-scope kernel times of models in onnxruntime, profiled in alternating runs so that the noise of
a shared machine hits them alike."""

from __future__ import annotations

import json
import re
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxopt import io, runtime

RUNS = 30
WARMUP = 3
# onnxruntime's names for nodes it made: QDQ fusions (``<node>_token_7``), NCHWc layout (``<output>_nchwc``)
_MADE_SUFFIX = re.compile(r"(_token_\d+|_nchwc)$")


def scope(node: ir.Node) -> str:
    """The exporter's module path of a node (``/model.2/m.0/cv1/conv/Conv`` → ``/model.2/m.0/cv1/conv``)."""
    return scope_of(node.name or node.outputs[0].name or "")


def scope_of(name: str) -> str:
    return name.rsplit("/", 1)[0] if "/" in name.strip("/") else name


def scope_times(
    models: list[ir.Model], feeds: dict[str, np.ndarray], owners: dict[str, str]
) -> list[dict[str, float]]:
    """For each model, the median microseconds its kernels spend per run, summed by scope.

    ``owners`` maps node names to scopes; kernels of nodes that onnxruntime made (layout changes,
    fusions it named itself) go to the scope of the longest known name they start with, else to ''.
    """
    with tempfile.TemporaryDirectory(prefix="onnxopt-profile-") as folder:
        sessions = []
        for i, model in enumerate(models):
            path = io.save(model, Path(folder, f"model{i}.onnx"))
            sessions.append(
                runtime.session(path, optimize=True, profile=str(Path(folder, f"profile{i}")))
            )
        for _ in range(WARMUP):
            for sess in sessions:
                sess.run(None, feeds)
        for _ in range(RUNS):
            for sess in sessions:
                sess.run(None, feeds)
        return [_by_scope(_kernel_times(sess.end_profiling()), owners) for sess in sessions]


def _kernel_times(profile_file: str) -> dict[str, float]:
    """Median microseconds per run of each kernel, by node name, skipping the warm-up runs."""
    runs: dict[str, list[float]] = defaultdict(list)
    for event in json.loads(Path(profile_file).read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            runs[event["name"].removesuffix("_kernel_time")].append(event["dur"])
    return {name: float(np.median(times[WARMUP:] or times)) for name, times in runs.items()}


def _by_scope(times: dict[str, float], owners: dict[str, str]) -> dict[str, float]:
    found: dict[str, float] = defaultdict(float)
    for name, us in times.items():
        found[_owner_of(name, owners)] += us
    return dict(found)


def _owner_of(name: str, owners: dict[str, str]) -> str:
    name = _MADE_SUFFIX.sub("", name)
    while name:
        if name in owners:
            return owners[name]
        name = name.rpartition("/")[0]
    return ""
