"""Per-scope kernel times of models in onnxruntime (``onnxopt.profile``), traced to the scopes of
the model the pass rewrote."""

from __future__ import annotations

import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxopt import io, profile, runtime
from onnxopt.profile import scope_of


def scope(node: ir.Node) -> str:
    """The exporter's module path of a node (``/model.2/m.0/cv1/conv/Conv`` → ``/model.2/m.0/cv1/conv``)."""
    return scope_of(node.name or node.outputs[0].name or "")


def scope_times(
    models: list[ir.Model], feeds: dict[str, np.ndarray], owners: dict[str, str]
) -> list[dict[str, float]]:
    """For each model, the median microseconds its kernels spend per run, summed by scope.

    ``owners`` maps node names to scopes; kernels of nodes that onnxruntime made (layout changes,
    fusions it named itself) go to the scope of the longest known name they start with, else to ''.
    """
    with tempfile.TemporaryDirectory(prefix="onnxopt-profile-") as folder:
        paths = [io.save(model, Path(folder, f"model{i}.onnx")) for i, model in enumerate(models)]
        found = profile.profile(paths, feeds, threads=runtime.every_core())
    return [_by_scope(p.kernels, owners) for p in found]


def _by_scope(kernels: list[profile.Kernel], owners: dict[str, str]) -> dict[str, float]:
    found: dict[str, float] = defaultdict(float)
    for k in kernels:
        found[_owner_of(k.name, owners)] += k.us
    return dict(found)


def _owner_of(name: str, owners: dict[str, str]) -> str:
    name = profile.unmade(name)
    while name:
        if name in owners:
            return owners[name]
        name = name.rpartition("/")[0]
    return ""
