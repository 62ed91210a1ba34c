"""A model ready for inference, decided once when it is loaded (as gpt-fast's ``_load_model``).

``load_for_inference`` takes the precision, the device and the compile choice and returns a model in
eval mode that every inference path (generation, chat, the paper's tasks, serving, evaluation,
detection) uses as it is: nothing in a decode loop converts, quantises or compiles.

- ``fp32``: the published weights as they are. On the CPU the blocks' weights are reordered into
  oneDNN's blocked layout (``gpt2.model.blocked_linears``: same values, 1.2x faster decoding at
  batch 8), which ``gpt2.inference.kernels``'s hand-written kernel reads when decoding (up to 8 rows: 1.3x
  faster tokens at batch 1), and the tied LM head into the same layout in the embedding's own
  memory (``gpt2.model.blocked_head``, which ``blocked_linears`` calls); on Intel CPUs the weights
  stay plain (MKL for a row or two, measured faster there; oneDNN beyond, ``onednn_linears``).
- ``bf16``: bfloat16 weights and KV cache, read straight from the checkpoint in that precision:
  half the bytes per token (logits are processed in fp32). On the CPU the weights are reordered
  into oneDNN's blocked layout (``gpt2.model.blocked_linears``: same values, 1.7x faster products),
  read when decoding by ``gpt2.inference.kernels``'s kernel (1.6x faster tokens at batch 1), the LM head as
  fp32's.
- attention on the CPU (decoding's and prompts') reads the KV cache by hand too (``KVCache.attend``),
  and the weights move onto 2 MB pages (``gpt2.util.memory.huge_pages``: 1.2x faster tokens).
- ``int8``, ``int4``: quantisation (``gpt2.inference.quantization``; CPU only): the linear layers' weights in 8
  or 4 bits, quantised tensor by tensor as the checkpoint is read (no float copy of the model is
  ever held), float32 activations, a bfloat16 KV cache.
- ``compile``: ``torch.compile`` the decode step (``GPT2.compile_decode_step``), fp32's products
  autotuned against Inductor's generated C++ kernels. Faster on a GPU; on a CPU with AVX-512, eager
  decoding on ``gpt2.inference.kernels``'s kernels is faster (generate.py, batch 1: fp32 52.9 against 30.5
  tok/s compiled, bf16 90.3 against 46.7, int8 125.1 against 114.1; int4 even, 152.6 against 159.5),
  as the compiled step keeps Inductor's products and attention, and holds 200+ MB more.
- ``adapter``: a LoRA adapter (``gpt2.adapters.lora``) is folded into its base's weights in float32 first
  (``load_merged``), so that every precision and path above runs the merged model at the base's speed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gpt2.adapters.lora import load_adapter, merge_lora, read_adapter_config
from gpt2.api import GPT2
from gpt2.checkpoints import ADAPTER_CONFIG, empty_model, find_adapter, finish_loading, read_weights, resolve
from gpt2.config import PRECISIONS
from gpt2.inference.quantization import BITS, quantize_weights
from gpt2.model import blocked_linears, intel_cpu, onednn_linears, weight_memory
from gpt2.tokenizer.bpe import Tokenizer, find_tokenizer_files
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
    eval mode, its decode step compiled when ``compile``. Given a ``GPT2`` instead of a path, that
    model is converted in place and returned.

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
    if isinstance(model, GPT2):
        model.to(device=dev, dtype=dtype)
        if bits:
            quantize_weights(model, model.state_dict().items(), bits)
    elif bits:
        model = _load_quantized(model, bits)
    else:
        model = GPT2.from_pretrained(model, device=dev, dtype=dtype)
    model.eval()
    if dev.type == "cpu":
        _cpu_products(model, precision, compile)
        huge_pages(weight_memory(model))  # decoding streams the weights: 1.2x from 2 MB pages
    if compile:  # autotuning: fp32 1.14-1.3x at batch 1 (measured); it gained nothing for bf16 or int4
        model.compile_decode_step(autotune=precision == "fp32")
    return model


def _cpu_products(model: GPT2, precision: str, compile: bool) -> None:
    """The faster CPU products: the hand kernels and oneDNN on blocked weights, the tied LM head
    blocked in place (not when compiling, which blocks the weights itself, nor for fp32 on Intel
    CPUs, where it stays on the plain weights: MKL for a row or two, measured faster there)."""
    if precision == "fp32":
        if not compile and not intel_cpu():
            blocked_linears(model)
        onednn_linears(model)
    elif precision == "bf16" and not compile:
        blocked_linears(model)


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
    if isinstance(model, GPT2):
        base = model.to(device=device, dtype=torch.float32)
    else:
        base = GPT2.from_pretrained(model, device=device, dtype=torch.float32)
    load_adapter(base, directory)
    merge_lora(base)
    if find_tokenizer_files(directory):
        base.tokenizer = Tokenizer.from_pretrained(directory)
    return base


def _load_quantized(path: str | Path, bits: int) -> GPT2:
    """The checkpoint at ``path`` with its linear layers quantised to ``bits`` as each tensor is read
    (the float copy of one tensor at a time)."""
    directory = resolve(path)
    model = empty_model(directory, GPT2)
    quantize_weights(model, read_weights(directory, model, torch.device("cpu"), torch.float32), bits)
    return finish_loading(model, directory)
