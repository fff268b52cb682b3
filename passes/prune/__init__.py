"""The prune pass: Dead-node and no-op removal."""

from onnxopt.passes.prune.prune import Prune

__all__ = ["Prune"]
