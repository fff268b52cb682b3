"""onnxopt: make exported ONNX models smaller and faster without retraining, and prove it.

    import onnxopt
    model, report = onnxopt.run("model.onnx", ["fold", "prune"])
    onnxopt.save(model, "model.opt.onnx")
"""

from onnxopt.errors import CheckFailed, OnnxoptError, UsageError
from onnxopt.io import load, save
from onnxopt.passbase import Option, OptPass, get_pass, registry
from onnxopt.pipeline import RunReport, run

__version__ = "0.1.0"

__all__ = [
    "CheckFailed",
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
