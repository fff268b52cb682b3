"""Gate policies: goals for a candidate model, resolved against its reference, read from TOML.

[inputs]                      # optional: what the models run on (default: generated)
data = "samples.npz"          # an .npz file or a folder of them, relative to this file
shape = { input_ids = [1, 64] }
range = { images = [0, 1] }
batch = 8                     # samples per run
samples = 256                 # at most this many samples
seed = 0

[bench]                       # optional: how latency is timed
iters = 100                   # or seconds = 10
warmup = 5
threads = 2

[accuracy]                    # goals for every output ...
min_cosine = 0.999            # mean cosine over samples
max_abs_error = 0.05
min_snr = 30                  # dB
min_top1 = 0.99               # class-score outputs ([batch, classes], or with topk = K)
[accuracy.outputs.logits]     # ... and for one output (overrides; also topk, mean_pool)
min_top1 = 0.995

[latency.cpu]                 # goals per execution provider (cpu, cuda)
percentile = "p50"            # mean, p50, p90 or p99
min_speedup = 1.5             # reference time / candidate time
max_regression_pct = 5        # candidate at most 5% slower

[size]
max_mb = 25                   # candidate file size, external data included (MB = 10^6 bytes)
min_reduction_pct = 50
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from onnxopt import bench
from onnxopt.compare import Settings
from onnxopt.errors import UsageError
from onnxopt.inputs import InputSpec
from onnxopt.runtime import PROVIDERS
from onnxopt.validate import Bounds

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclasses.dataclass(frozen=True)
class LatencyGoal:
    ep: str
    percentile: str = "p50"
    min_speedup: float | None = None
    max_regression_pct: float | None = None


@dataclasses.dataclass(frozen=True)
class SizeGoal:
    max_mb: float | None = None
    min_reduction_pct: float | None = None


@dataclasses.dataclass
class Policy:
    source: str
    inputs: InputSpec
    bench: bench.Settings
    compare: Settings
    accuracy: dict[str, Bounds]
    latency: list[LatencyGoal]
    size: SizeGoal

    @property
    def has_accuracy(self) -> bool:
        return any(b.any() for b in self.accuracy.values())


class _Reader:
    """Typed access to one table of the policy; every error names the key at fault."""

    def __init__(self, source: str, table: Any, where: str):
        self.source, self.where = source, where
        if not isinstance(table, dict):
            self.fail(where, "must be a table")
        self.table = table

    def fail(self, key: str, problem: str):
        raise UsageError(f"{self.source}: {key}: {problem}")

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def allow(self, *names: str) -> None:
        for name in self.table:
            if name not in names:
                self.fail(self.key(name), f"unknown key (expected one of: {', '.join(names)})")

    def number(
        self,
        name: str,
        *,
        integer: bool = False,
        low: float | None = None,
        high: float | None = None,
    ):
        if name not in self.table:
            return None
        value = self.table[name]
        ok = isinstance(value, int) if integer else isinstance(value, (int, float))
        if not ok or isinstance(value, bool):
            self.fail(
                self.key(name), f"must be {'an integer' if integer else 'a number'}, got {value!r}"
            )
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = (
                f"in [{low:g}, {high:g}]"
                if low is not None and high is not None
                else f">= {low:g}"
                if low is not None
                else f"<= {high:g}"
            )
            self.fail(self.key(name), f"must be {bounds}, got {value!r}")
        return value

    def text(self, name: str, choices: tuple[str, ...] | None = None) -> str | None:
        if name not in self.table:
            return None
        value = self.table[name]
        if not isinstance(value, str) or (choices and value not in choices):
            self.fail(
                self.key(name),
                f"must be {' or '.join(map(repr, choices)) if choices else 'a string'}, got {value!r}",
            )
        return value

    def sub(self, name: str) -> _Reader:
        return _Reader(self.source, self.table.get(name, {}), self.key(name))


def load(path: str | Path) -> Policy:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise UsageError(f"{path}: cannot read the policy ({e.strerror or e})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: not valid TOML ({e})") from None
    return parse(data, str(path), path.parent)


def parse(data: dict, source: str = "policy", base: Path = Path(".")) -> Policy:
    root = _Reader(source, data, "")
    root.allow("inputs", "bench", "accuracy", "latency", "size")
    policy = Policy(
        source,
        _inputs(root.sub("inputs"), base),
        _bench(root.sub("bench")),
        Settings(),
        {},
        [],
        SizeGoal(),
    )
    _accuracy(root.sub("accuracy"), policy)
    latency = root.sub("latency")
    latency.allow(*PROVIDERS)
    policy.latency = [_latency(latency.sub(ep), ep) for ep in latency.table]
    size = root.sub("size")
    size.allow("max_mb", "min_reduction_pct")
    policy.size = SizeGoal(size.number("max_mb", low=0), size.number("min_reduction_pct", high=100))
    if not (policy.has_accuracy or policy.latency or policy.size != SizeGoal()):
        root.fail("policy", "sets no goal (add [accuracy], [latency.cpu] or [size])")
    return policy


def _inputs(r: _Reader, base: Path) -> InputSpec:
    r.allow("data", "shape", "range", "batch", "samples", "seed")
    data = r.text("data")
    shapes = {}
    for name, dims in r.sub("shape").table.items():
        if not isinstance(dims, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims
        ):
            r.fail(f"inputs.shape.{name}", f"must be a list of positive integers, got {dims!r}")
        shapes[name] = dims
    ranges = {}
    for name, bounds in r.sub("range").table.items():
        if (
            not isinstance(bounds, list)
            or len(bounds) != 2
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)
            or bounds[0] > bounds[1]
        ):
            r.fail(f"inputs.range.{name}", f"must be [low, high] with low <= high, got {bounds!r}")
        ranges[name] = (float(bounds[0]), float(bounds[1]))
    return InputSpec(
        data=None if data is None else base / data,
        shapes=shapes,
        ranges=ranges,
        batch=r.number("batch", integer=True, low=1),
        samples=r.number("samples", integer=True, low=1),
        seed=r.number("seed", integer=True, low=0) or 0,
    )


def _bench(r: _Reader) -> bench.Settings:
    r.allow("iters", "seconds", "warmup", "threads")
    if "iters" in r.table and "seconds" in r.table:
        r.fail("bench", "set iters or seconds, not both")
    warmup = r.number("warmup", integer=True, low=0)
    return bench.Settings(
        iters=r.number("iters", integer=True, low=1),
        seconds=r.number("seconds", low=0),
        warmup=5 if warmup is None else warmup,
        threads=r.number("threads", integer=True, low=0) or 0,
    )


_BOUND_KEYS = ("min_cosine", "min_snr", "min_top1", "max_abs_error")


def _bounds(r: _Reader) -> Bounds:
    limits = {
        "min_cosine": (-1, 1),
        "min_top1": (0, 1),
        "max_abs_error": (0, None),
        "min_snr": (None, None),
    }
    return Bounds(**{k: r.number(k, low=limits[k][0], high=limits[k][1]) for k in _BOUND_KEYS})


def _accuracy(r: _Reader, policy: Policy) -> None:
    r.allow(*_BOUND_KEYS, "topk", "outputs")
    policy.accuracy[""] = _bounds(r)
    if "topk" in r.table:
        policy.compare.topk[""] = r.number("topk", integer=True, low=1)
    for name in r.sub("outputs").table:
        out = r.sub("outputs").sub(name)
        out.allow(*_BOUND_KEYS, "topk", "mean_pool")
        policy.accuracy[name] = _bounds(out)
        if "topk" in out.table:
            policy.compare.topk[name] = out.number("topk", integer=True, low=1)
        if "mean_pool" in out.table:
            policy.compare.mean_pool[name] = out.text("mean_pool")


def _latency(r: _Reader, ep: str) -> LatencyGoal:
    r.allow("percentile", "min_speedup", "max_regression_pct")
    goal = LatencyGoal(
        ep,
        r.text("percentile", bench.STATS) or "p50",
        r.number("min_speedup", low=0),
        r.number("max_regression_pct"),
    )
    if goal.min_speedup is None and goal.max_regression_pct is None:
        r.fail(r.where, "sets no goal (min_speedup or max_regression_pct)")
    return goal
