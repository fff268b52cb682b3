"""``python -m onnxopt``: the same CLI as the ``onnxopt`` command."""

from onnxopt.cli import main

main()
