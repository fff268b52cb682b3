"""The onnxopt pass library, one folder per pass, named as on the command line:
``from onnxopt.passes import Fold, Prune, Fuse, Quantize, WeightQuantize``."""

from onnxopt.passes.fold import Fold
from onnxopt.passes.fuse import Fuse
from onnxopt.passes.prune import Prune
from onnxopt.passes.quant import Quantize
from onnxopt.passes.wquant import WeightQuantize

__all__ = ["Fold", "Fuse", "Prune", "Quantize", "WeightQuantize"]
