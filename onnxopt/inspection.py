"""What is in a model: versions, interface, ops, parameters, where its tensors live."""

from __future__ import annotations

import collections
import os

import onnx_ir as ir

from onnxopt import io
from onnxopt.stats import Stats


def dims_text(value: ir.Value) -> list[str | int] | None:
    if value.shape is None:
        return None
    return [d if isinstance(d, int) else (d.value or "?") for d in value.shape]


def describe(model: ir.Model, path: str | os.PathLike | None = None) -> dict:
    stats = Stats.of(model)
    by_dtype: dict[str, dict[str, int]] = collections.defaultdict(lambda: {"params": 0, "bytes": 0})
    initializers = constants = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                initializers += 1
                entry = by_dtype[value.const_value.dtype.name]
                entry["params"] += value.const_value.size
                entry["bytes"] += value.const_value.nbytes
        for node in graph:
            if node.op_type == "Constant" and node.domain == "":
                constants += 1
                if "value" in node.attributes:
                    tensor = node.attributes["value"].as_tensor()
                    entry = by_dtype[tensor.dtype.name]
                    entry["params"] += tensor.size
                    entry["bytes"] += tensor.nbytes
    graph = model.graph
    interface = [
        {"name": v.name, "dtype": v.dtype.name if v.dtype else None, "dims": dims_text(v)}
        for v in graph.inputs
        if v.name not in graph.initializers
    ]
    info = {
        "path": None if path is None else os.fspath(path),
        "ir_version": model.ir_version,
        "opsets": dict(sorted(model.opset_imports.items())),
        "producer": " ".join(filter(None, [model.producer_name, model.producer_version])),
        "inputs": interface,
        "outputs": [
            {"name": v.name, "dtype": v.dtype.name if v.dtype else None, "dims": dims_text(v)}
            for v in graph.outputs
        ],
        "nodes": stats.nodes,
        "ops": dict(sorted(stats.ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "params": stats.params,
        "tensor_bytes": stats.tensor_bytes,
        "by_dtype": dict(sorted(by_dtype.items())),
        "initializers": initializers,
        "constant_nodes": constants,
        "subgraphs": sum(1 for _ in model.graphs()) - 1,
        "functions": len(model.functions),
        "external_data": sorted({t.location for t in io.external_tensors(model)}),
    }
    info["findings"] = findings(model)
    if path is not None:
        info["file_bytes"] = io.file_size(path)
    return info


def findings(model: ir.Model) -> dict[str, int]:
    """What the passes recognise and leave as is, as ``"pass: pattern" -> count``."""
    from onnxopt.passbase import registry

    found = {}
    for name, cls in registry().items():
        found.update({f"{name}: {k}": n for k, n in cls.findings(model).items() if n})
    return found
