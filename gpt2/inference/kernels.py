"""Inference's products, written by hand (``kernels.cpp``): rows of x (decoding's, one per sequence:
up to ``MAX_ROWS`` for the blocks, any number for the LM head) times a float32 or bfloat16 weight in
oneDNN's blocked layout, the one ``gpt2.model``'s blocked layers and head hold, read from memory once
for 8 rows; and any number of rows times an int8 weight in a blocked layout of ours
(``gpt2.inference.quantization``'s int8 and int4 layers), each row quantised to 8 bits; and a decoding step's or
a prompt's attention (``attend``), read straight from a float32 or bfloat16 KV cache.

Why by hand: a decoding step reads every weight once for a row or a few, so its speed is the speed
at which the products stream their weights. Measured on the 124M shape's 49 products of a token (AMD
EPYC, 2 threads, the same weights): oneDNN's own product on the blocked weights streams them at 18-25
GB/s at 1 row; this one, reading each block of 64 rows input by input and multiplying 16 rows per
instruction (no sums across a vector), at 26-45 GB/s: 1.3-1.9x at 1 row, 1.5x at 4 and 1.15-1.3x at
8 rows, in float32 and in bfloat16. In int8 (vpdpbusd on the same kind of blocks) it is 1.35x
fbgemm's product at 1 row, 1.6x at 4, 1.25x at 8 and 1.1-1.25x at 512 (a prompt). No PyTorch kernel
streams a row through a weight faster on this CPU (MKL, oneDNN plain and blocked, fbgemm, tinygemm
and Inductor's generated products were measured). In int4 (our layout: each group's scales beside
its values, one stream), 2.1x tinygemm's at 1 row and 2.0-2.4x at 8 and 512. Attention by hand
replaces, per layer and token, a float32 copy of the whole bfloat16 cache, the conversions around
it and PyTorch's attention call over every position of the cache, written or not; for a prompt of
512 tokens it takes 3.1 ms a layer against 6.3-9.6 ms for PyTorch's causal attention (flash
attention's CPU kernel) on the 124M shape.

The source is compiled once per machine by the system's C++ compiler (``-march=native``) into
``cache_dir() / "kernels"`` and loaded with ctypes; its threads are the OpenMP pool PyTorch runs.
Where there is no compiler or no AVX-512, or a weight's blocked layout is not the one the kernel
reads (each float layer is checked against oneDNN's product when it is made), the layers keep
oneDNN's and fbgemm's products. ``GPT2_MATVEC=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from gpt2.config import cache_dir

SOURCE = Path(__file__).with_name("kernels.cpp")
MAX_ROWS = 8  # rows of x the blocks' layers give the kernel (decoding's batches); oneDNN's beyond
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
_ABILITIES = {"fp32": 1, "bf16": 2, "int8": 4, "int4": 8, "attention": 16}  # matvec_abilities()
_MULTIPLE = {"fp32": 1, "bf16": 2, "int8": 16, "int4": 32, "attention": 64}  # of the inputs
_FLOATS = {torch.float32: "fp32", torch.bfloat16: "bf16"}
_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}  # of the largest output, against oneDNN's


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels (built on first use, then read from the cache), or None where they cannot
    be had here."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if os.environ.get("GPT2_MATVEC") == "0" or compiler is None or platform.machine() != "x86_64":
        return None
    try:
        path = _build(compiler)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError):
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    for name in ("matvec_f32", "matvec_bf16"):
        getattr(lib, name).argtypes = [pointer] * 4 + [size] * 4 + [ctypes.c_int] * 2
        getattr(lib, name).restype = None
    lib.matvec_i8.argtypes = [pointer] * 6 + [size] * 3 + [ctypes.c_int] * 2
    lib.matvec_i4.argtypes = [pointer] * 4 + [size] * 3 + [ctypes.c_int] * 2
    lib.matvec_attend.argtypes = [pointer] * 5 + [size] * 5 + [ctypes.c_int] * 3
    lib.matvec_i8.restype = lib.matvec_i4.restype = None
    lib.matvec_attend.restype = None
    return lib


def _build(compiler: str) -> Path:
    """The library for this source, compiler and CPU: compiled into the cache unless it is there."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), version, *_FLAGS, _cpu_flags()]).encode())
    path = cache_dir() / "kernels" / f"kernels-{key.hexdigest()[:16]}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            built = Path(tmp) / path.name
            command = [compiler, *_FLAGS, "-o", str(built), str(SOURCE)]
            subprocess.run(command, capture_output=True, check=True, timeout=300)
            os.replace(built, path)  # whole or not at all, for processes building at the same time
    return path


def _cpu_flags() -> str:
    """The CPU's model and instruction sets (a library built with -march=native is for them only)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read(1 << 16).splitlines()
    except OSError:
        return platform.processor()
    return "\n".join(line for line in lines[:40] if line.startswith(("model name", "flags")))


def kernel(precision: str, in_features: int) -> bool:
    """Whether the kernel for ``precision`` runs here, for ``in_features`` inputs: fp32 (oneDNN's
    blocked weights) needs AVX-512, bf16 its BF16 instructions, int8 and int4 its VNNI ones,
    attention (heads of 64) AVX-512 with BF16."""
    lib = library()
    return lib is not None and bool(lib.matvec_abilities() & _ABILITIES[precision]) \
        and in_features % _MULTIPLE[precision] == 0


def blocked_weight(blocked: Tensor, out_features: int, in_features: int) -> int | None:
    """The address of oneDNN's blocked ``blocked`` (from ``torch.ops.mkldnn._reorder_linear_weight``)
    when the kernels can multiply it, checked against oneDNN's own product; None where they cannot."""
    dtype = blocked.dtype
    if dtype not in _FLOATS or not kernel(_FLOATS[dtype], in_features):
        return None
    padded = -(-out_features // 64) * 64 * in_features * blocked.element_size()
    if torch.ops.mkldnn._nbytes(blocked) != padded:  # not the layout read here
        return None
    address = torch.ops.mkldnn.data_ptr(blocked)
    x = torch.randn(5, in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
    expected = torch.ops.mkldnn._linear_pointwise(x, blocked, None, "none", [], "").float()
    error = (product(x, address, None, out_features).float() - expected).abs().max()
    return address if error <= _TOLERANCE[dtype] * expected.abs().max() else None


def product(x: Tensor, weight: int, bias: Tensor | None, out_features: int, gelu: bool = False) -> Tensor:
    """``x @ W.T + bias`` for the blocked weight at address ``weight`` (``blocked_weight``), x (..., in)
    float32 or bfloat16 as the weight, any number of rows (from the cache after the first 8); then
    tanh-GELU when ``gelu``."""
    x = x.contiguous()
    y = x.new_empty(*x.shape[:-1], out_features)
    _multiply(x, weight, bias, y, 0, out_features, gelu)
    return y


def split_product(x: Tensor, parts: list[tuple[int, int]], out_features: int) -> Tensor:
    """``x @ W.T`` for a weight held as blocked parts of consecutive rows, (address, rows) each."""
    x = x.contiguous()
    y = x.new_empty(*x.shape[:-1], out_features)
    first = 0
    for address, rows in parts:
        if rows:
            _multiply(x, address, None, y, first, rows, False)
        first += rows
    return y


def _multiply(x: Tensor, weight: int, bias: Tensor | None, y: Tensor, first: int, rows: int,
              gelu: bool) -> None:
    """Outputs ``first`` to ``first + rows`` of ``y`` (..., out) for x (..., in), contiguous both."""
    run = library().matvec_f32 if x.dtype == torch.float32 else library().matvec_bf16
    out = y.data_ptr() + first * y.element_size()
    run(x.data_ptr(), weight, None if bias is None else bias.data_ptr(), out, x.numel() // x.shape[-1],
        x.shape[-1], rows, y.shape[-1], gelu, torch.get_num_threads())


def int8_blocked(q: Tensor) -> Tensor:
    """int8 rows ``q`` (out, in) in the int8 kernel's layout: blocks of 64 rows (the last padded with
    zeros), groups of 4 inputs side by side, (out / 64, in / 4, 64, 4)."""
    out_features, in_features = q.shape
    blocked = q.new_zeros(-(-out_features // 64), in_features // 4, 64, 4)
    whole = out_features // 64 * 64  # written in place: no padded copy of q beside the blocked one
    blocked[: whole // 64] = q[:whole].view(-1, 64, in_features // 4, 4).transpose(1, 2)
    if whole < out_features:
        blocked[-1, :, : out_features - whole] = q[whole:].view(-1, in_features // 4, 4).transpose(0, 1)
    return blocked


def row_sums(q: Tensor) -> Tensor:
    """Each row's sum of int8 values ``q`` (out, in), int32. By numpy, which converts a few thousand
    values at a time: torch converts all of its input first (the LM head's: 4x its int8 bytes), and
    chunk by chunk its freed temporaries stayed resident (97 MB for a 50,257 x 512 head)."""
    return torch.from_numpy(q.numpy().sum(axis=1, dtype=np.int32))


def int8_blocked_rows(blocked: Tensor, idx: Tensor) -> Tensor:
    """Rows ``idx`` (any shape) of an ``int8_blocked`` weight, as int8 (*idx.shape, in)."""
    return blocked[idx // 64, :, idx % 64].flatten(-2)


def int8_product(x: Tensor, blocked: Tensor, scales: Tensor, sums: Tensor, bias: Tensor | None,
                 out_features: int, gelu: bool = False) -> Tensor:
    """``x @ W.T + bias`` for W = ``int8_blocked`` rows times a float32 scale each (``sums``: each row's
    sum of int8 values, int32), x float32 (..., in) of any number of rows, each quantised to 8 bits;
    then tanh-GELU when ``gelu``."""
    x = x.contiguous()
    y = x.new_empty(*x.shape[:-1], out_features)
    library().matvec_i8(x.data_ptr(), blocked.data_ptr(), scales.data_ptr(), sums.data_ptr(),
                        None if bias is None else bias.data_ptr(), y.data_ptr(), x.numel() // x.shape[-1],
                        x.shape[-1], out_features, gelu, torch.get_num_threads())
    return y


def int4_blocked(q: Tensor, scales: Tensor, lows: Tensor) -> Tensor:
    """4-bit values ``q`` (out, in; 0 to 15, any integer dtype; out a multiple of 64) with a scale and a
    low per 32 inputs of a row (``scales``, ``lows``: (out, in / 32); w = q * scale + low) in the int4
    kernel's layout, one stream of bytes: blocks of 64 rows, each a run of groups of 32 inputs, each
    group 4 steps of 8 inputs (4 vectors of 16 rows x 4 bytes, byte b of a row holding inputs b and
    4 + b in its low and high nibbles), then its 64 scales and 64 lows in bfloat16:
    (out / 64, in / 32, 1280) uint8."""
    out_features, in_features = q.shape
    groups = in_features // 32
    pairs = q.to(torch.uint8).view(out_features, in_features // 8, 2, 4)
    packed = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).view(-1, 4, 16, groups, 4, 4)
    steps = packed.permute(0, 3, 4, 1, 2, 5).reshape(-1, groups, 1024)
    both = [t.bfloat16().view(-1, 64, groups).transpose(1, 2).contiguous() for t in (scales, lows)]
    return torch.cat([steps, *(t.view(torch.uint8) for t in both)], dim=2)


def int4_product(x: Tensor, blocked: Tensor, bias: Tensor | None, out_features: int,
                 gelu: bool = False) -> Tensor:
    """``x @ W.T + bias`` for W = an ``int4_blocked`` weight, x float32 (..., in) of any number of rows,
    each quantised to 8 bits; then tanh-GELU when ``gelu``."""
    x = x.contiguous()
    y = x.new_empty(*x.shape[:-1], out_features)
    library().matvec_i4(x.data_ptr(), blocked.data_ptr(), None if bias is None else bias.data_ptr(),
                        y.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], out_features, gelu,
                        torch.get_num_threads())
    return y


def attend(qkv: Tensor, keys: Tensor, values: Tensor, real: Tensor, length: int) -> Tensor:
    """One layer's attention over a KV cache: each row's T keys and values (in ``qkv`` (B, T, 3 C),
    float32 or bfloat16, after the queries) written from position ``length`` of the cache's ``keys``
    and ``values`` (rows, heads, max_len, 64; float32 or bfloat16), then each query attending over the
    positions up to its own that ``real`` (rows, max_len) marks, and itself, softmax in float32; the
    output (B, T, C) in ``qkv``'s dtype."""
    qkv = qkv.contiguous()
    out = qkv.new_empty(*qkv.shape[:-1], qkv.shape[-1] // 3)
    pointers = [t.data_ptr() for t in (qkv, keys, values, real, out)]
    library().matvec_attend(*pointers, qkv.shape[0], qkv.shape[1], keys.shape[1], keys.shape[2], length,
                            qkv.element_size(), keys.element_size(), torch.get_num_threads())
    return out
