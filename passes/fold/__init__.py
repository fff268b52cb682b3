"""The fold pass: Constant folding."""

from onnxopt.passes.fold.fold import Fold

__all__ = ["Fold"]
