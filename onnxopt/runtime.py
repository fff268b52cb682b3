"""onnxruntime access: one import point with a clear error, and sessions built the same way everywhere.

onnxruntime silently runs a model on the CPU when a requested provider cannot be loaded; every
session made here checks that the provider it asked for is the one it got.
"""

from __future__ import annotations

import os

from onnxopt.errors import UsageError

_INSTALL_HINT = "onnxruntime is not installed: pip install 'onnxopt[cpu]' (or 'onnxopt[cuda]' for onnxruntime-gpu)"

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def ort():
    try:
        import onnxruntime
    except ImportError:
        raise UsageError(_INSTALL_HINT) from None
    return onnxruntime


def parse_eps(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """``'cpu,cuda'`` → ``['cpu', 'cuda']``, refusing names onnxopt does not know."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    eps = [e.strip().lower() for e in items if e.strip()]
    for ep in eps:
        if ep not in PROVIDERS:
            raise UsageError(
                f"unknown execution provider {ep!r} (choose from {', '.join(PROVIDERS)})"
            )
    if not eps:
        raise UsageError("no execution provider given")
    return list(dict.fromkeys(eps))


def require(ep: str) -> None:
    """Fail with what to install when onnxruntime lacks the provider of ``ep``."""
    rt = ort()
    wanted = PROVIDERS[ep]
    if wanted not in rt.get_available_providers():
        raise UsageError(
            f"--ep {ep}: this onnxruntime {rt.__version__} has no {wanted} "
            f"(it has {', '.join(rt.get_available_providers())}); "
            "pip uninstall onnxruntime && pip install 'onnxopt[cuda]' (onnxruntime-gpu, with CUDA 12 and cuDNN 9)"
        )


def every_core() -> int:
    """The intra-op thread count passes time candidates with: every core, set explicitly. Left at
    0, onnxruntime pins its threads to cores, and on a shared machine a core busy elsewhere slowed
    the int8 model more than the float one (YOLOv8n, the same two models: 1.07x at 0 threads,
    1.44x at 2, measured alternately in one process)."""
    return os.cpu_count() or 1


def session(
    model: str | os.PathLike | bytes,
    *,
    ep: str = "cpu",
    optimize: bool = False,
    threads: int = 0,
    profile: str | None = None,
):
    """A session on ``ep``. Graph optimizations are off by default so that what runs is the model as written.
    With ``profile`` (a file prefix), onnxruntime records each node's time; ``end_profiling()`` writes it."""
    rt = ort()
    require(ep)
    opts = rt.SessionOptions()
    opts.log_severity_level = 4  # errors reach the user as onnxopt's one-line messages
    opts.intra_op_num_threads = threads
    if threads:
        opts.inter_op_num_threads = 1
    if profile:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile
    if not optimize:
        opts.graph_optimization_level = rt.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = model if isinstance(model, bytes) else os.fspath(model)
    wanted = PROVIDERS[ep]
    providers = [wanted] if ep == "cpu" else [wanted, PROVIDERS["cpu"]]
    sess = rt.InferenceSession(source, opts, providers=providers)
    if wanted not in sess.get_providers():
        raise UsageError(
            f"--ep {ep}: onnxruntime fell back to {', '.join(sess.get_providers())} because {wanted} failed to "
            f"load (its CUDA or cuDNN libraries are missing or do not match onnxruntime {rt.__version__}); "
            "see onnxruntime's CUDA execution provider requirements"
        )
    return sess
