from onnxopt.passes.slim.slim import Slim

__all__ = ["Slim"]
