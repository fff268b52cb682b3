"""Latency and throughput of models on onnxruntime execution providers, timed side by side.

Models are timed in alternating rounds in one process (the first model of a round rotates), so
the noise of a shared machine hits them alike. On CUDA, inputs and outputs stay on the device
(IO binding) and every run is synchronised, so the time is the GPU's work, not the copies.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np

from onnxopt import io, runtime
from onnxopt.errors import CheckFailed, OnnxoptError, one_line

PERCENTILES = ("p50", "p90", "p99")
STATS = ("mean", *PERCENTILES)
RUNS_PER_ROUND = 5


@dataclasses.dataclass
class Timing:
    model: str
    ep: str
    batch: int
    size_bytes: int
    session_s: float
    first_run_ms: float
    rss_mb: float | None
    times_ms: list[float] = dataclasses.field(default_factory=list, repr=False)
    speedup: float = 1.0

    def stat(self, name: str) -> float:
        if name == "mean":
            return float(np.mean(self.times_ms))
        if name == "std":
            return float(np.std(self.times_ms))
        return float(np.percentile(self.times_ms, float(name.removeprefix("p"))))

    @property
    def throughput(self) -> float:
        """Samples per second at the mean latency."""
        return self.batch * 1e3 / self.stat("mean")

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "ep": self.ep,
            "batch": self.batch,
            "iters": len(self.times_ms),
            **{f"{s}_ms": round(self.stat(s), 4) for s in ("mean", "std", *PERCENTILES)},
            "throughput": round(self.throughput, 3),
            "speedup": round(self.speedup, 4),
            "session_s": round(self.session_s, 4),
            "first_run_ms": round(self.first_run_ms, 4),
            "size_bytes": self.size_bytes,
            "rss_mb": None if self.rss_mb is None else round(self.rss_mb, 1),
        }


@dataclasses.dataclass
class Settings:
    iters: int | None = None
    seconds: float | None = None
    warmup: int = 5
    threads: int = 0
    speedup_stat: str = "p50"

    def next_round(self, done_iters: int, elapsed: float) -> int:
        """How many runs each model gets in the next round (0: timing is over)."""
        if self.seconds is not None:
            return RUNS_PER_ROUND if elapsed < self.seconds else 0
        return max(0, min(RUNS_PER_ROUND, (self.iters or 100) - done_iters))


class _Runner:
    """One model on one provider: a callable that runs it once, with inputs already in place."""

    def __init__(
        self, path: str | os.PathLike, ep: str, feeds: dict[str, np.ndarray], threads: int
    ):
        rss = current_rss_mb()
        t = time.perf_counter()
        try:
            self.session = runtime.session(path, ep=ep, optimize=True, threads=threads)
        except OnnxoptError:
            raise
        except Exception as e:
            raise CheckFailed(
                f"{path}: does not load in onnxruntime on {ep} ({one_line(e)})"
            ) from None
        self.session_s = time.perf_counter() - t
        wanted = {i.name for i in self.session.get_inputs()}
        missing = wanted - set(feeds)
        if missing:
            raise CheckFailed(
                f"{path}: needs inputs the first model does not have: {', '.join(sorted(missing))}"
            )
        feeds = {k: v for k, v in feeds.items() if k in wanted}
        self.run = self._bound(feeds, "cuda") if ep == "cuda" else self._plain(feeds)
        t = time.perf_counter()
        try:
            self.run()
        except Exception as e:
            raise CheckFailed(f"{path}: fails to run on {ep} ({one_line(e)})") from None
        self.first_run_ms = (time.perf_counter() - t) * 1e3
        after = current_rss_mb()
        self.rss_mb = None if rss is None or after is None else after - rss

    def _plain(self, feeds) -> Callable[[], None]:
        names = [o.name for o in self.session.get_outputs()]
        return lambda: self.session.run(names, feeds)

    def _bound(self, feeds, device: str) -> Callable[[], None]:
        """Inputs copied to ``device`` once, outputs left there, each run synchronised."""
        rt = runtime.ort()
        binding = self.binding = self.session.io_binding()
        self._device_inputs = {
            k: rt.OrtValue.ortvalue_from_numpy(v, device, 0) for k, v in feeds.items()
        }
        for name, value in self._device_inputs.items():
            binding.bind_ortvalue_input(name, value)
        for out in self.session.get_outputs():
            binding.bind_output(out.name, device, 0)

        def run():
            self.session.run_with_iobinding(binding)
            binding.synchronize_outputs()

        return run


def current_rss_mb() -> float | None:
    """Resident memory of this process now (Linux), in MB."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_mb() -> float:
    """The most resident memory this process has held, in MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak / 1e3


def batch_of(feeds: dict[str, np.ndarray]) -> int:
    first = next(iter(feeds.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1


def bench(
    models: Sequence[str | os.PathLike],
    feeds: dict[str, np.ndarray],
    eps: Sequence[str] = ("cpu",),
    settings: Settings | None = None,
    on_progress: Callable[[float, str], None] | None = None,
) -> list[Timing]:
    """Time every model on every provider; speedups are relative to the first model on the same provider."""
    settings = settings or Settings()
    for ep in eps:
        runtime.require(ep)
    timings = []
    for ep in eps:
        runners, rows = [], []
        for path in models:
            runner = _Runner(path, ep, feeds, settings.threads)
            runners.append(runner)
            rows.append(
                Timing(
                    str(path),
                    ep,
                    batch_of(feeds),
                    io.file_size(path),
                    runner.session_s,
                    runner.first_run_ms,
                    runner.rss_mb,
                )
            )
        _time(runners, rows, settings, lambda x, ep=ep: on_progress(x, ep) if on_progress else None)
        base = rows[0].stat(settings.speedup_stat)
        for row in rows:
            row.speedup = base / row.stat(settings.speedup_stat)
        timings += rows
    return timings


def _time(
    runners: list[_Runner],
    rows: list[Timing],
    settings: Settings,
    progress: Callable[[float], None],
) -> None:
    for runner in runners:
        for _ in range(settings.warmup):
            runner.run()
    start, done, round_ = time.perf_counter(), 0, 0
    while runs := settings.next_round(done, time.perf_counter() - start):
        for i in [(round_ + j) % len(runners) for j in range(len(runners))]:
            run, times = runners[i].run, rows[i].times_ms
            for _ in range(runs):
                t = time.perf_counter()
                run()
                times.append((time.perf_counter() - t) * 1e3)
        done += runs
        round_ += 1
        progress(runs)
