"""The onnxopt pass library: ``from onnxopt.passes import Fold, Prune``."""

from .fold import Fold
from .prune import Prune

__all__ = ["Fold", "Prune"]
