"""onnxopt: make exported ONNX models smaller and faster without retraining, and prove it.

import onnxopt
model, report = onnxopt.optimize("model.onnx", ["fold", "prune"], output="model.opt.onnx")

``optimize`` does everything ``onnxopt run`` does: the passes, the check against the input (raising
CheckFailed where the CLI exits 1), the gate, the atomic save. ``run`` applies passes unchecked.
"""

from onnxopt.errors import CheckFailed, OnnxoptError, UsageError
from onnxopt.io import load, save
from onnxopt.optimize import Report, optimize
from onnxopt.passbase import Column, Option, OptPass, Outcome, get_pass, registry, run_context
from onnxopt.pipeline import RunReport, run

__version__ = "0.1.0"

__all__ = [
    "CheckFailed",
    "Column",
    "Outcome",
    "Report",
    "optimize",
    "run_context",
    "OnnxoptError",
    "Option",
    "OptPass",
    "RunReport",
    "UsageError",
    "get_pass",
    "load",
    "registry",
    "run",
    "save",
]
