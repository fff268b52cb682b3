"""Errors that the CLI turns into one line on stderr and an exit code."""


class OnnxoptError(Exception):
    exit_code = 1


class UsageError(OnnxoptError):
    """Bad input from the user: a missing file, a bad option, an unknown pass (exit 2)."""

    exit_code = 2


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (onnxruntime's span several), cut to ``limit`` characters."""
    return " ".join(str(e).split())[:limit]


class CheckFailed(OnnxoptError):
    """A model failed a check or a gate (exit 1)."""

    exit_code = 1


class InternalError(OnnxoptError):
    """A bug: an exception onnxopt did not expect, in the pass or stage it names (exit 3)."""

    exit_code = 3

    def __init__(self, where: str, cause: BaseException):
        super().__init__(
            f"internal error in {where} ({type(cause).__name__}: {one_line(cause, 200)}); "
            "rerun with --debug for the traceback"
        )
