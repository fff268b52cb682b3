"""A GGUF decoder LLM -> fp32 ONNX, with a KV cache or without, through transformers and torch.onnx.

Only the zoo's LLM entries use this, with the ``[llm]`` extra installed (torch, transformers, gguf,
accelerate, onnxscript); onnxopt itself never imports it. transformers reads the GGUF (dequantizing
every tensor to fp32) as its architecture (Llama for SmolLM2), and torch.onnx's dynamo exporter writes
the graph with its weights as external data beside it.

With the cache, the inputs and outputs are named as optimum and onnxruntime-genai name them:
``input_ids``, ``attention_mask`` [batch, past + seq], ``position_ids``, ``past_key_values.{i}.key``
and ``.value`` [batch, kv_heads, past, head_dim] -> ``logits``, ``present.{i}.key`` and ``.value``.
A prefill passes past tensors of length 0.
"""

from __future__ import annotations

import os
from pathlib import Path

from onnxopt.errors import UsageError

EXTRA = "pip install 'onnxopt[llm]'"  # what the conversion needs beyond onnxopt
# cache and sequence lengths of the example inputs the graph is traced with: not 0 or 1, which
# torch.export would specialize, and unequal, so the two dims stay apart
EXPORT_PAST = 3
EXPORT_SEQ = 5
# node metadata the exporter writes for debugging the trace (source paths of the converting machine,
# fx printouts, module classes): 2.5 of SmolLM2-135M's 4.4 MB graph; each node's module path,
# ``namespace``, is kept
TRACE_PREFIX = "pkg.torch.onnx."


def _torch_modules():
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise UsageError(
            f"converting a GGUF model needs torch and transformers ({EXTRA}): {exc}"
        ) from None
    return torch, transformers


def load(gguf: Path):
    """The transformers causal LM that ``gguf`` holds, in fp32, eval mode."""
    torch, transformers = _torch_modules()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


def tokenizer(gguf: Path):
    """The model's own tokenizer, read from the GGUF."""
    _, transformers = _torch_modules()
    return transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def _wrapper(model, cache: bool):
    torch, transformers = _torch_modules()
    layers = model.config.num_hidden_layers

    class NoCache(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            return self.model(input_ids=input_ids, use_cache=False).logits

    class WithCache(NoCache):
        def forward(self, input_ids, attention_mask, position_ids, *past):
            kv = transformers.DynamicCache(
                [(past[2 * i], past[2 * i + 1]) for i in range(layers)], config=model.config
            )
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=kv,
                use_cache=True,
            )
            present = [
                t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)
            ]
            return (out.logits, *present)

    return WithCache() if cache else NoCache()


def cache_names(layers: int) -> tuple[list[str], list[str]]:
    """The past and present tensor names, key then value per layer."""
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    return past, [p.replace("past_key_values", "present") for p in past]


def example_inputs(config, cache: bool, seq: int = EXPORT_SEQ, past: int = EXPORT_PAST):
    torch, _ = _torch_modules()
    ids = torch.randint(0, config.vocab_size, (1, seq))
    if not cache:
        return (ids,)
    kv_heads = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    mask = torch.ones(1, past + seq, dtype=torch.int64)
    positions = torch.arange(past, past + seq).unsqueeze(0)
    kv = [torch.randn(1, kv_heads, past, head_dim) for _ in range(2 * config.num_hidden_layers)]
    return (ids, mask, positions, *kv)


def export(gguf: Path, target: Path, cache: bool) -> Path:
    """Write ``gguf``'s decoder to ``target`` (+ ``target.data``), atomically: a temporary folder
    beside it, then renames (the data first: a graph never points at missing weights)."""
    torch, _ = _torch_modules()
    model = load(gguf)
    config = model.config
    past, present = cache_names(config.num_hidden_layers)
    inputs = example_inputs(config, cache)
    if cache:
        names = ["input_ids", "attention_mask", "position_ids", *past]
        outputs = ["logits", *present]
        dims = [
            {0: "batch", 1: "sequence"},
            {0: "batch", 1: "total_sequence"},
            {0: "batch", 1: "sequence"},
            # *past: one argument of the forward, so one entry of its own
            tuple([{0: "batch", 2: "past_sequence"}] * len(past)),
        ]
    else:
        names, outputs, dims = ["input_ids"], ["logits"], [{0: "batch", 1: "sequence"}]
    tmp = target.parent / f".{target.name}.part"
    tmp.mkdir(parents=True, exist_ok=True)
    part = tmp / target.name
    with torch.no_grad():
        program = torch.onnx.export(
            _wrapper(model, cache),
            inputs,
            input_names=names,
            output_names=outputs,
            dynamic_shapes=tuple(dims),
            dynamo=True,
            external_data=True,
            optimize=True,
        )
        for node in program.model.graph.all_nodes():
            for key in [k for k in node.metadata_props if k.startswith(TRACE_PREFIX)]:
                del node.metadata_props[key]
        program.save(str(part), external_data=True)
    data = part.with_name(part.name + ".data")
    if data.exists():
        os.replace(data, target.with_name(target.name + ".data"))
    os.replace(part, target)
    tmp.rmdir()
    return target
