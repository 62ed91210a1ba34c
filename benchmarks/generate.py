"""Generation speed: ours (fp32 and each speed option) beside transformers' ``generate`` on the same
random 124M-shape weights, measured in the same run.

Decode tokens/s at batch 1 and 8 (32-token prompts, 128 new tokens, greedy; the rate excludes the
prompt's forward pass), the time to read a 512-token prompt and make one token, and the peak memory
of each. Also this machine's memory bandwidth and the floor it sets: every weight is read once per
decode step, so tokens/s at batch 1 cannot exceed bandwidth / weight bytes.

Targets (2-core CPU, fp32): >= 1.25x transformers at batch 1, >= 1.5x at batch 8; the best option
>= 2x transformers' fp32 at batch 1; prefill >= 1.2x; peak memory <= transformers'.

    python benchmarks/generate.py [--device cuda] [--repeats 2] [--no-compile]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers

from gpt2 import GPT2
from gpt2.inference import load_for_inference
from gpt2.sampling import GenerationConfig, generate

PROMPT, NEW, PREFILL = 32, 128, 512


@dataclass
class Result:
    name: str
    weights_mb: float
    decode: dict[int, float]  # batch size -> tokens/s
    prefill_s: float
    peak_mb: float  # weights + the most memory that generating added
    agreement: float  # share of 2 x 16 greedy tokens equal to transformers'


# ----------------------------------------------------------------------------------------------------
# Memory


def exact_cpu_memory_accounting() -> None:
    """Make glibc return every large freed block to the OS at once, so resident memory tracks live
    tensors (otherwise the peak of one run would hide in the baseline of the next)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: fixed, so blocks above it are mmap'ed
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    except OSError:
        pass


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def with_peak_memory(run: Callable[[], float], device: torch.device) -> tuple[float, float]:
    """``run()``'s result, and the most memory (MiB) it held at once beyond what was allocated before."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = run()
        torch.cuda.synchronize()
        return result, (torch.cuda.max_memory_allocated() - before) / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the high-water mark of resident memory
    before = _status_kb("VmRSS")
    result = run()
    return result, (_status_kb("VmHWM") - before) / 1024


def weight_mb(model: torch.nn.Module) -> float:
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    for module in model.modules():  # int8 dynamic quantisation keeps packed weights outside parameters
        if isinstance(module, torch.ao.nn.quantized.dynamic.Linear):
            weight, bias = module.weight(), module.bias()
            size += weight.numel() * weight.element_size() + (bias.numel() * 4 if bias is not None else 0)
    return size / 2**20


# ----------------------------------------------------------------------------------------------------
# Timing


def seconds(run: Callable[[], object], device: torch.device, repeats: int) -> float:
    """The fastest of ``repeats`` runs (the machine may be shared: the minimum is the least disturbed)."""
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def measure(
    name: str, model: torch.nn.Module, gen: Callable, device: torch.device, repeats: int,
    reference: torch.Tensor,
) -> Result:
    """``gen(ids, new_tokens)`` generates greedily with ``model``; ``reference``: transformers' greedy
    tokens after the prompts ``reference_prompts``."""
    agreement = (gen(reference_prompts(device), 16)[:, PROMPT:] == reference).float().mean().item()
    decode = {}
    peak = 0.0
    for batch in (1, 8):
        ids = torch.randint(0, 50257, (batch, PROMPT), generator=torch.Generator().manual_seed(batch))
        ids = ids.to(device)
        gen(ids, 8)  # warm-up
        first = seconds(lambda ids=ids: gen(ids, 1), device, repeats)
        timed = lambda ids=ids: seconds(lambda: gen(ids, NEW), device, repeats)  # noqa: E731
        full, extra = with_peak_memory(timed, device)
        peak = max(peak, extra)
        decode[batch] = batch * (NEW - 1) / (full - first)
        print(f"  {name}: batch {batch}: {decode[batch]:.1f} tokens/s", file=sys.stderr, flush=True)
    long = torch.randint(0, 50257, (1, PREFILL), generator=torch.Generator().manual_seed(0)).to(device)
    gen(long, 1)
    prefill = seconds(lambda: gen(long, 1), device, repeats + 1)
    weights = weight_mb(model)
    return Result(name, weights, decode, prefill, weights + peak, agreement)


def reference_prompts(device: torch.device) -> torch.Tensor:
    return torch.randint(0, 50257, (2, PROMPT), generator=torch.Generator().manual_seed(0)).to(device)


def memory_bandwidth_gbs(device: torch.device) -> float:
    """Read bandwidth: summing a 512 MiB tensor, best of 5."""
    x = torch.ones(128 * 2**20, device=device)
    x.sum()
    best = seconds(lambda: x.sum(), device, 5)
    return x.numel() * 4 / best / 1e9


def matvec_seconds(model: torch.nn.Module, device: torch.device) -> tuple[float, float]:
    """One token's matrix-vector products alone (every Linear, the LM head included), best of 5:
    with PyTorch's default kernel (what transformers runs), and through the model's own layers."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(1, 1, m.in_features, device=device) for m in layers]

    def default() -> None:
        for layer, x in zip(layers, inputs, strict=True):
            torch.nn.functional.linear(x, layer.weight, layer.bias)

    def own() -> None:
        for layer, x in zip(layers, inputs, strict=True):
            layer(x)

    with torch.inference_mode():
        return seconds(default, device, 5), seconds(own, device, 5)


# ----------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed runs per figure, the best kept (one fewer for the speed options)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    args = parser.parse_args()
    device = torch.device(args.device)
    exact_cpu_memory_accounting()
    transformers.logging.set_verbosity_error()

    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval().to(device)  # 124M shape
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)

        def ours(**speed: object) -> GPT2:
            return load_for_inference(tmp, device=str(device), **speed)

        def gen_ours(model: GPT2) -> Callable:
            return lambda ids, new: generate(model, ids, GenerationConfig(max_new_tokens=new, temperature=0))

        def gen_hf(ids: torch.Tensor, new: int) -> torch.Tensor:
            with torch.inference_mode():
                return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                   min_new_tokens=new, do_sample=False, pad_token_id=0)

        fp32 = ours()
        ids = reference_prompts(device)
        reference = gen_hf(ids, 16)[:, PROMPT:]

        bandwidth = memory_bandwidth_gbs(device)
        default_matvec, our_matvec = matvec_seconds(fp32, device)
        results = [measure("transformers fp32", hf, gen_hf, device, args.repeats, reference),
                   measure("ours fp32", fp32, gen_ours(fp32), device, args.repeats, reference)]
        variants = {"ours bf16": dict(precision="bf16")}
        if device.type == "cpu":
            variants["ours int8 (dynamic)"] = dict(precision="int8")
        if not args.no_compile:
            variants["ours fp32 + compile"] = dict(compile=True)
            variants["ours bf16 + compile"] = dict(precision="bf16", compile=True)
        for name, speed in variants.items():
            model = ours(**speed)
            start = time.perf_counter()
            gen_ours(model)(ids, 2)
            print(f"  {name}: first call {time.perf_counter() - start:.1f} s", file=sys.stderr)
            results.append(measure(name, model, gen_ours(model), device, max(1, args.repeats - 1), reference))
            del model
            gc.collect()

    weight_bytes = sum(m.weight.numel() * 4 for m in fp32.modules() if isinstance(m, torch.nn.Linear))
    floor = bandwidth * 1e9 / weight_bytes
    hf_result = results[0]
    name = f"CPU, {torch.get_num_threads()} threads"
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
    print(f"\nGPT-2 124M shape, random weights, greedy; {name}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}; best of {args.repeats}")
    print(f"decode: {PROMPT}-token prompts, {NEW} new tokens; prefill: {PREFILL}-token prompt + 1 token")
    print(f"memory bandwidth {bandwidth:.1f} GB/s; fp32 weights read per token {weight_bytes / 1e9:.3f} GB "
          f"-> floor {floor:.1f} tokens/s at batch 1\none token's matrix-vector products alone: "
          f"{default_matvec * 1e3:.1f} ms with PyTorch's default kernel, "
          f"{our_matvec * 1e3:.1f} ms with ours\n")
    header = (f"{'':24}{'batch 1 tok/s':>14}{'vs HF':>7}{'vs floor':>9}{'batch 8 tok/s':>15}{'vs HF':>7}"
              f"{'prefill ms':>12}{'vs HF':>7}{'weights MB':>12}{'peak MB':>9}{'vs HF':>7}"
              f"{'same tokens':>13}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r.name:24}{r.decode[1]:14.1f}{r.decode[1] / hf_result.decode[1]:6.2f}x"
              f"{r.decode[1] / floor:8.0%} {r.decode[8]:15.1f}{r.decode[8] / hf_result.decode[8]:6.2f}x"
              f"{r.prefill_s * 1e3:12.0f}{hf_result.prefill_s / r.prefill_s:6.2f}x"
              f"{r.weights_mb:12.0f}{r.peak_mb:9.0f}{r.peak_mb / hf_result.peak_mb:6.2f}x{r.agreement:12.0%}")
    print("\nvs HF: speed ratios (higher is better) and memory ratio (lower is better); vs floor: share of "
          "the bandwidth floor (fp32 weight bytes); same tokens: greedy tokens equal to transformers' "
          "(2 prompts x 16)")
    print("targets: ours fp32 >= 1.25x (batch 1), >= 1.5x (batch 8), prefill >= 1.2x, peak <= 1.0x; "
          "best option >= 2x at batch 1")


if __name__ == "__main__":
    main()
