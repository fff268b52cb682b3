"""The onnxopt pass library: ``from onnxopt.passes import Fold, Prune, Fuse``."""

from .fold import Fold
from .fuse import Fuse
from .prune import Prune

__all__ = ["Fold", "Fuse", "Prune"]
