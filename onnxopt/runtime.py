"""onnxruntime access: one import point with a clear error, and sessions built the same way everywhere."""

from __future__ import annotations

import os

from onnxopt.errors import UsageError

_INSTALL_HINT = "onnxruntime is not installed: pip install 'onnxopt[cpu]' (or 'onnxopt[cuda]' for onnxruntime-gpu)"


def ort():
    try:
        import onnxruntime
    except ImportError:
        raise UsageError(_INSTALL_HINT) from None
    return onnxruntime


def session(model: str | os.PathLike | bytes, *, optimize: bool = False, threads: int = 0):
    """A CPU session. Graph optimizations are off by default so that what runs is the model as written."""
    rt = ort()
    opts = rt.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    if not optimize:
        opts.graph_optimization_level = rt.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = model if isinstance(model, bytes) else os.fspath(model)
    return rt.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
