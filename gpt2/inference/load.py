"""A model built for inference, once, when it is loaded (as gpt-fast's ``_load_model``).

``load_for_inference`` takes the precision, the device and the compile choice and returns a model in
eval mode that every inference path (generation, chat, the paper's tasks, serving, evaluation,
detection) uses as it is: nothing in a decode loop converts, quantises or compiles. The network's
layers are replaced with layers built from them for that precision and device:

- ``fp32``: the published weights as they are. On the CPU the blocks' weights are reordered into
  oneDNN's blocked layout, which the hand-written kernels read (``cpu_layers.HandLinear``; where they
  do not run, oneDNN does: ``cpu_layers.BlockedLinear``), and the tied LM head into the same layout
  in the embedding's own memory (``cpu_layers.BlockedHead``); on Intel CPUs the weights stay plain
  (MKL for a row or two, oneDNN beyond: ``cpu_layers.OneDNNLinear``).
- ``bf16``: bfloat16 weights and KV cache, read straight from the checkpoint in that precision (logits
  are processed in fp32); on the CPU in oneDNN's blocked layout, as fp32's.
- ``int8``, ``int4``: quantisation (``gpt2.inference.quantization``; CPU only): the linear layers'
  weights in 8 or 4 bits, quantised tensor by tensor as the checkpoint is read (no float copy of the
  model is ever held), float32 activations, a bfloat16 KV cache.
- on the CPU, attention over the KV cache (decoding's and prompts') is the hand-written kernel's
  (``cpu_layers.HandAttention``) and the weights move onto 2 MB pages (``gpt2.util.memory.huge_pages``).
- ``compile``: ``torch.compile`` the decode step (``GPT2.compile_decode_step``): on the CPU it calls the
  same hand-written kernels (``gpt2.inference.ops``) and fuses the small ops between them.
- ``adapter``: a LoRA adapter (``gpt2.adapters.lora``) is folded into its base's weights in float32
  first (``load_merged``), so that every precision and path above runs the merged model at the base's
  speed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gpt2.adapters.lora import load_adapter, merge_lora, read_adapter_config
from gpt2.api import GPT2
from gpt2.checkpoints import ADAPTER_CONFIG, empty_model, find_adapter, read_tokenizer, read_weights, resolve
from gpt2.config import PRECISIONS
from gpt2.inference.cpu_layers import (
    HandLinear,
    blocked_linears,
    hand_attention,
    hand_linears,
    intel_cpu,
    onednn_linears,
    weight_memory,
)
from gpt2.inference.quantization import BITS, quantize_weights
from gpt2.tokenizer.bpe import Tokenizer
from gpt2.util.errors import UserError
from gpt2.util.memory import huge_pages


def default_device() -> str:
    """cuda when a GPU is visible, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str) -> torch.device:
    """``device`` as a torch.device, refused in one line when it is not one this machine has."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is visible; use --device cpu")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {device}: only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    return dev


def load_for_inference(
    model: str | Path | GPT2 | None,
    *,
    adapter: str | Path | None = None,
    precision: str = "fp32",
    device: str | None = None,
    compile: bool = False,
) -> GPT2:
    """A model ready to generate, score or serve: a checkpoint (directory, run directory or hub name)
    loaded in ``precision`` (see ``PRECISIONS``) on ``device`` (default: cuda when available), in
    eval mode, its decode step compiled when ``compile``. Given a ``GPT2`` instead of a path, the
    inference model is built from it (at fp32 and bf16, from its own layers, which it takes over).

    ``adapter``: a LoRA adapter directory (or LoRA run) merged into ``model`` first (see
    ``load_merged``; ``model`` None: the base its adapter_config.json names). A LoRA run or adapter
    given as ``model`` is its base with that adapter."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    dev = check_device(device or default_device())
    bits = BITS.get(precision)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if bits and dev.type != "cpu":
        raise UserError(f"{precision} runs on the CPU only; choose fp32 or bf16, or --device cpu")
    if adapter is not None or model is None or (not isinstance(model, GPT2) and find_adapter(model)):
        model = load_merged(model, adapter, device=dev)
    if bits:
        model = _quantized(model, bits)
    elif isinstance(model, GPT2):
        model.to(device=dev, dtype=dtype)
    else:
        model = GPT2.from_pretrained(model, device=dev, dtype=dtype)
    if dev.type == "cpu":
        _build_for_cpu(model, precision, compile)
    model.eval()
    if compile:  # autotuning: fp32's products, where not ours, timed against Inductor's C++ kernels
        ours = any(isinstance(m, HandLinear) for m in model.modules())
        model.compile_decode_step(autotune=precision == "fp32" and not ours)
    return model


def _build_for_cpu(model: GPT2, precision: str, compile: bool) -> None:
    """Replace the layers of ``model`` with the faster CPU ones (``gpt2.inference.cpu_layers``): the
    hand-written kernels' operators, which eager and compiled decoding call alike; where they do not
    run, oneDNN on blocked weights (not when compiling, which blocks the weights itself). fp32 on an
    Intel CPU stays on the plain weights (MKL for a row or two, measured faster there). Attention over
    the cache by hand; then the weights on 2 MB pages (decoding streams them)."""
    if precision in ("fp32", "bf16") and not (precision == "fp32" and intel_cpu()):
        hand_linears(model, precision)
        if not compile:
            blocked_linears(model)
    if precision == "fp32":
        onednn_linears(model)
    hand_attention(model)
    huge_pages(weight_memory(model))


def load_merged(
    model: str | Path | GPT2 | None, adapter: str | Path | None = None, *, device: str | torch.device = "cpu"
) -> GPT2:
    """The float32 base ``model`` with LoRA ``adapter`` folded into its weights (``model`` None: the
    base named in the adapter's adapter_config.json; ``adapter`` None: ``model`` is a LoRA run or
    adapter directory). Its tokenizer is the one saved beside the adapter, else the base's."""
    if adapter is None and model is not None and not isinstance(model, GPT2):
        model, adapter = None, model
    if adapter is None:
        raise UserError("give the model to load (--model M), or a LoRA adapter (--adapter DIR)")
    directory = find_adapter(adapter) or Path(adapter)
    if model is None:
        model = read_adapter_config(directory).base_model
        if model is None:
            raise UserError(f"{directory / ADAPTER_CONFIG} names no base model; give it with --model BASE")
    if not isinstance(model, GPT2) and find_adapter(model) is not None:
        raise UserError(f"--model {model} is itself a LoRA adapter; give its base as --model, or merge it "
                        "first with `gpt2 merge`")
    tokenizer = read_tokenizer(directory)
    if isinstance(model, GPT2):
        base = model.to(device=device, dtype=torch.float32)
        tokenizer = tokenizer or base.tokenizer
        if tokenizer is not base.tokenizer:  # a new model object, built from the given one's layers
            base = _with_tokenizer(base, tokenizer)
    else:
        base = GPT2.from_pretrained(model, device=device, dtype=torch.float32, tokenizer=tokenizer)
    load_adapter(base, directory)
    merge_lora(base)
    return base


def _with_tokenizer(model: GPT2, tokenizer: Tokenizer | None) -> GPT2:
    """A ``GPT2`` with the weights of float32 ``model`` (shared, not copied) and ``tokenizer``."""
    with torch.device("meta"):
        other = GPT2(model.config, tokenizer=tokenizer)
    other.load_state_dict(model.state_dict(), assign=True)
    other.lm_head.weight = other.transformer.wte.weight
    return other.train(model.training)


def _quantized(source: str | Path | GPT2, bits: int) -> GPT2:
    """A model with the linear layers of ``source`` (a checkpoint, read a tensor at a time, or a
    ``GPT2``'s weights) quantised to ``bits`` and a bfloat16 KV cache (as llama.cpp's 16-bit cache:
    half the bytes, attention in float32)."""
    if isinstance(source, GPT2):
        with torch.device("meta"):
            model = GPT2(source.config, tokenizer=source.tokenizer, cache_dtype=torch.bfloat16)
        weights = source.state_dict().items()
    else:
        directory = resolve(source)
        model = empty_model(directory, GPT2, tokenizer=read_tokenizer(directory), cache_dtype=torch.bfloat16)
        weights = read_weights(directory, model, torch.device("cpu"), torch.float32)
    quantize_weights(model, weights, bits)
    return model.eval()
