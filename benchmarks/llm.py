"""LLM yardstick: a decoder's quantized forms against its fp32 original, in one process.

    python benchmarks/llm.py CANDIDATE.onnx ... [--fp32 PATH] [--ort] [--rounds 20]
    python benchmarks/llm.py --write-calib calib.npz [--calib-windows 128]
    python benchmarks/llm.py --match-torch

Needs the ``[llm]`` extra (the model's tokenizer comes from its GGUF through transformers). The fp32
model is the zoo's ``smollm2-135m`` (KV cache) unless ``--fp32`` names another of the same tokenizer.
Per model it prints one line:

- ``ppl``: perplexity on real English text never calibrated on (``../shared/data/sentences.json``,
  joined, tokenized by the model's own tokenizer, cut into windows of 128 tokens, each a prefill from
  an empty cache); ``ppl_ratio`` against fp32's;
- ``top1``: how often the next-token argmax agrees with fp32's, over the same positions;
- ``prefill_ms`` (128 tokens, batch 1) and ``decode_tok_s`` (one token on a 128-token cache the model
  filled itself), timed interleaved with every other model (20th percentile over ``--rounds``,
  ``--threads`` intra-op threads), and their ratios to fp32's;
- ``size_mb`` on disk (graph and external data), ``rss_mb``: peak resident memory of a process that
  loads the model and runs one prefill and one step.

Calibration windows (``--write-calib``) come from other text: Python's own documentation topics
(``pydoc_data.topics``, in every CPython), tokenized the same way, as an .npz that ``calib=`` reads
(input_ids, attention_mask, position_ids and empty past tensors, one row per window).

``--ort`` first writes onnxruntime's ``MatMulNBitsQuantizer`` outputs of the fp32 model (RTN, block 32,
symmetric; at accuracy level 0 and 4) beside the candidates and measures them too.

``--build DIR`` makes the README's table: it writes the calibration windows and onnxopt's candidates
into DIR (``quant(bits=4)``, the same with ``grid=false``, with ``calib=`` and with ``calib=`` and the
head at 8 bits), printing each pass's wall time, then measures them with ``--ort``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = ROOT.parent / "shared" / "data" / "sentences.json"
WINDOW = 128
ZOO_NAME = "smollm2-135m"


def gguf_path() -> Path:
    from onnxopt import zoo

    return zoo.fetch_gguf(zoo.entries()[ZOO_NAME])


def tokenize(text: str) -> np.ndarray:
    from onnxopt.zoo import gguf_decoder

    tok = gguf_decoder.tokenizer(gguf_path())
    return np.asarray(tok(text, add_special_tokens=False)["input_ids"], dtype=np.int64)


def windows(tokens: np.ndarray, count: int | None = None) -> np.ndarray:
    n = len(tokens) // WINDOW
    rows = tokens[: n * WINDOW].reshape(n, WINDOW)
    return rows if count is None else rows[:count]


def eval_windows() -> np.ndarray:
    return windows(tokenize(" ".join(json.loads(SENTENCES.read_text()))))


def calib_text() -> str:
    """Python's documentation topics, less any that holds an evaluation sentence."""
    import pydoc_data.topics

    held_out = json.loads(SENTENCES.read_text())
    topics = pydoc_data.topics.topics
    return "\n\n".join(
        topics[k] for k in sorted(topics) if not any(s in topics[k] for s in held_out)
    )


class Inputs:
    """A decoder's inputs as its graph declares them (read without its weights): which of
    attention_mask and position_ids it takes, and its past tensors' names, heads and head size."""

    def __init__(self, path: Path):
        import onnx

        graph = onnx.load(str(path), load_external_data=False).graph
        self.names = {v.name for v in graph.input}
        self.past = [
            (
                v.name,
                v.type.tensor_type.shape.dim[1].dim_value,
                v.type.tensor_type.shape.dim[3].dim_value,
            )
            for v in graph.input
            if v.name.startswith("past")
        ]

    def feeds(self, ids: np.ndarray, past: list[np.ndarray] | None = None) -> dict:
        """Feeds for ``ids`` [batch, seq] after ``past`` (present tensors of an earlier run; None:
        an empty cache)."""
        batch, seq = ids.shape
        start = 0 if past is None else past[0].shape[2]
        feeds = {"input_ids": ids}
        if "attention_mask" in self.names:
            feeds["attention_mask"] = np.ones((batch, start + seq), np.int64)
        if "position_ids" in self.names:
            feeds["position_ids"] = np.tile(np.arange(start, start + seq), (batch, 1))
        for i, (name, heads, dim) in enumerate(self.past):
            feeds[name] = np.zeros((batch, heads, 0, dim), np.float32) if past is None else past[i]
        return feeds


class Decoder:
    """One decoder's session and its inputs."""

    def __init__(self, path: Path, threads: int):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.path = path
        self.inputs = Inputs(path)
        self.past = self.inputs.past
        self.feeds = self.inputs.feeds

    def run(self, ids: np.ndarray, past=None) -> tuple[np.ndarray, list[np.ndarray]]:
        out = self.session.run(None, self.feeds(ids, past))
        return out[0], out[1:]


def nll_and_argmax(logits: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Negative log-likelihood of each next token, and each position's argmax (last position left out)."""
    z = logits[0, :-1].astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return -logp[np.arange(len(z)), ids[0, 1:]], z.argmax(axis=-1)


def accuracy(decoder: Decoder, rows: np.ndarray) -> tuple[float, np.ndarray]:
    nll, tops = [], []
    for row in rows:
        logits, _ = decoder.run(row[None])
        n, top = nll_and_argmax(logits, row[None])
        nll.append(n)
        tops.append(top)
    return float(np.exp(np.mean(np.concatenate(nll)))), np.concatenate(tops)


def timings(decoders: list[Decoder], ids: np.ndarray, rounds: int, steps: int) -> list[tuple]:
    """(prefill ms, decode step ms) of each decoder, 20th percentiles, interleaved."""
    step_ids = ids[:, :1]
    caches = [d.run(ids)[1] for d in decoders]
    prefill = [[] for _ in decoders]
    decode = [[] for _ in decoders]
    for _ in range(rounds):
        for i, d in enumerate(decoders):
            feeds = d.feeds(ids)
            t = time.perf_counter()
            d.session.run(None, feeds)
            prefill[i].append(time.perf_counter() - t)
            feeds = d.feeds(step_ids, caches[i])
            for _ in range(steps):
                t = time.perf_counter()
                d.session.run(None, feeds)
                decode[i].append(time.perf_counter() - t)
    return [
        (1e3 * np.percentile(p, 20), 1e3 * np.percentile(s, 20)) for p, s in zip(prefill, decode)
    ]


def size_mb(path: Path) -> float:
    data = {path} | {p for p in path.parent.iterdir() if p.name.startswith(path.name + ".")}
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    locations = {
        e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"
    }
    data |= {path.parent / loc for loc in locations}
    return sum(p.stat().st_size for p in data if p.is_file()) / 1e6


def peak_rss_mb(path: Path, threads: int) -> float:
    """Peak RSS of a fresh process that loads ``path`` and runs a 128-token prefill and one step."""
    out = subprocess.run(
        [sys.executable, __file__, "--rss", str(path), "--threads", str(threads)],
        check=True,
        capture_output=True,
        text=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def _rss(path: Path, threads: int) -> None:
    d = Decoder(path, threads)
    ids = np.arange(1, WINDOW + 1, dtype=np.int64)[None]
    _, past = d.run(ids)
    d.run(ids[:, :1], past)
    print(_high_water_mb())


def _high_water_mb() -> float:
    """Peak RSS of this process. Not getrusage's ru_maxrss: Linux keeps that across exec, so a child
    started by a parent holding every model reports the parent's peak; /proc's VmHWM is per image."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (
        1 << 20 if sys.platform == "darwin" else 1024
    )


def write_ort_models(fp32: Path, folder: Path) -> list[Path]:
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # a line per node

    made = []
    for level in (None, 4):
        target = folder / f"ort_matmulnbits{'' if level is None else f'_acc{level}'}.onnx"
        if not target.exists():
            q = MatMulNBitsQuantizer(
                str(fp32), block_size=32, is_symmetric=True, accuracy_level=level
            )
            q.process()
            q.model.save_model_to_file(str(target), use_external_data_format=True)
        made.append(target)
    return made


def write_calib(target: Path, count: int, fp32: Path) -> None:
    rows = windows(tokenize(calib_text()), count)
    np.savez(target, **Inputs(fp32).feeds(rows))
    print(f"wrote {target}: {len(rows)} windows of {WINDOW} tokens from pydoc_data.topics")


def match_torch(fp32: Path) -> None:
    """The fp32 ONNX against transformers' model on the first evaluation window: prefill of 127
    tokens, then one cached step."""
    import torch

    from onnxopt.zoo import gguf_decoder

    model = gguf_decoder.load(gguf_path())
    row = eval_windows()[:1]
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(row), use_cache=False).logits.numpy()
    d = Decoder(fp32, 2)
    logits, past = d.run(row[:, :-1])
    step, _ = d.run(row[:, -1:], past) if d.past else (None, None)
    worst = float(np.abs(logits - ref[:, :-1]).max())
    if step is not None:
        worst = max(worst, float(np.abs(step - ref[:, -1:]).max()))
    print(f"model={fp32.name}  torch_max_abs={worst:.3g}  logits_max_abs={np.abs(ref).max():.3g}")


CANDIDATES = {
    "q4": "quant(bits=4)",
    "q4_grid_false": "quant(bits=4,grid=false)",
    "q4_calib": "quant(bits=4,calib={calib})",
    "q4_calib_head8": "quant(bits=4,calib={calib},keep_8bit={head})",
}


def build(folder: Path, fp32: Path, windows: int) -> list[Path]:
    """onnxopt's candidates of ``fp32`` in ``folder`` (see the module docstring), each timed."""
    import onnx

    folder.mkdir(parents=True, exist_ok=True)
    calib = folder / "calib.npz"
    write_calib(calib, windows, fp32)
    graph = onnx.load(str(fp32), load_external_data=False).graph
    head = next(n.name for n in graph.node if "logits" in n.output)
    made = []
    for name, passes in CANDIDATES.items():
        target = folder / f"{name}.onnx"
        spec = passes.format(calib=calib, head=head)
        start = time.perf_counter()
        subprocess.run(
            ["onnxopt", "run", str(fp32), "-o", str(target), "--passes", spec],
            check=True,
            capture_output=True,
        )
        print(f"built {target.name}: {spec} in {time.perf_counter() - start:.0f} s", flush=True)
        made.append(target)
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("candidates", nargs="*", type=Path)
    parser.add_argument("--fp32", type=Path)
    parser.add_argument("--ort", action="store_true")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--steps", type=int, default=5, help="decode steps timed per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-windows", type=int, default=None)
    parser.add_argument("--write-calib", type=Path)
    parser.add_argument("--calib-windows", type=int, default=128)
    parser.add_argument("--match-torch", action="store_true")
    parser.add_argument("--build", type=Path, help="write onnxopt's candidates here, then measure")
    parser.add_argument("--rss", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss:
        return _rss(args.rss, args.threads)
    if args.fp32 is None:
        from onnxopt import zoo

        args.fp32 = zoo.fetch(ZOO_NAME)
    if args.match_torch:
        return match_torch(args.fp32)
    if args.write_calib:
        return write_calib(args.write_calib, args.calib_windows, args.fp32)
    paths = list(args.candidates)
    if args.build:
        paths += build(args.build, args.fp32, args.calib_windows)
        args.ort = True
    if args.ort:
        folder = paths[0].parent if paths else Path.cwd()
        paths += write_ort_models(args.fp32, folder)
    rows = windows(eval_windows().ravel(), args.eval_windows)
    decoders = [Decoder(p, args.threads) for p in [args.fp32, *paths]]
    base_ppl, base_top = accuracy(decoders[0], rows)
    times = timings(decoders, rows[:1], args.rounds, args.steps)
    print(
        f"# {len(rows)} windows of {WINDOW} tokens ({rows.size} tokens), {args.threads} threads, "
        f"{args.rounds} rounds; onnxruntime {ort.__version__}"
    )
    for d, (prefill, step) in zip(decoders, times):
        ppl, top = (base_ppl, base_top) if d is decoders[0] else accuracy(d, rows)
        print(
            f"model={d.path.name}  size_mb={size_mb(d.path):.1f}  ppl={ppl:.2f}  "
            f"ppl_ratio={ppl / base_ppl:.4f}  top1={np.mean(top == base_top):.4f}  "
            f"prefill_ms={prefill:.1f}  prefill_speedup={times[0][0] / prefill:.3f}  "
            f"decode_tok_s={1e3 / step:.1f}  decode_speedup={times[0][1] / step:.3f}  "
            f"rss_mb={peak_rss_mb(d.path, args.threads):.0f}",
            flush=True,
        )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
