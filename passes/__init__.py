"""The onnxopt pass library: ``from onnxopt.passes import Fold, Prune, Fuse, Quantize``."""

from .fold import Fold
from .fuse import Fuse
from .prune import Prune
from .quant import Quantize

__all__ = ["Fold", "Fuse", "Prune", "Quantize"]
