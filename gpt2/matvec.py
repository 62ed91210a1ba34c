"""Decoding's products, written by hand (``matvec.cpp``): up to ``MAX_ROWS`` rows of x (one per
sequence) times a float32 or bfloat16 weight in oneDNN's blocked layout, the one ``gpt2.model``'s
blocked layers hold, read once for all rows.

Why by hand: a decoding step reads every weight once for a row or a few, so its speed is the speed
at which the products stream their weights. Measured on the 124M shape's 49 products of a token (AMD
EPYC, 2 threads, the same blocked weights): oneDNN's own product streams them at 18-25 GB/s at 1 row;
this one, reading each block of 64 rows input by input and multiplying 16 rows per instruction (no
sums across a vector), at 26-45 GB/s: 1.3-1.9x at 1 row, 1.5x at 4 and 1.15-1.3x at 8 rows, in
float32 and in bfloat16. No PyTorch kernel streams a row through a weight faster on this CPU
(MKL, oneDNN plain and blocked, Inductor's generated products were measured).

The source is compiled once per machine by the system's C++ compiler (``-march=native``) into
``cache_dir() / "kernels"`` and loaded with ctypes; its threads are the OpenMP pool PyTorch runs.
Where there is no compiler or no AVX-512, or a weight's blocked layout is not the one the kernel
reads (each layer is checked against oneDNN's product when it is made), the layers keep oneDNN's.
``GPT2_MATVEC=0`` turns it off.
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

import torch
from torch import Tensor

from gpt2.config import cache_dir

SOURCE = Path(__file__).with_name("matvec.cpp")
MAX_ROWS = 8  # rows of x a product takes; decoding's batches of up to 8 sequences
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
_ABILITIES = {torch.float32: 1, torch.bfloat16: 2}  # matvec_abilities()'s bits
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
        getattr(lib, name).argtypes = [pointer] * 4 + [size] * 3 + [ctypes.c_int]
        getattr(lib, name).restype = None
    return lib


def _build(compiler: str) -> Path:
    """The library for this source, compiler and CPU: compiled into the cache unless it is there."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), version, *_FLAGS, _cpu_flags()]).encode())
    path = cache_dir() / "kernels" / f"matvec-{key.hexdigest()[:16]}.so"
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


def blocked_weight(blocked: Tensor, out_features: int, in_features: int) -> int | None:
    """The address of oneDNN's blocked ``blocked`` (from ``torch.ops.mkldnn._reorder_linear_weight``)
    when the kernels can multiply it, checked against oneDNN's own product; None where they cannot."""
    lib, dtype = library(), blocked.dtype
    if lib is None or not lib.matvec_abilities() & _ABILITIES.get(dtype, 0) or in_features % 2:
        return None
    padded = -(-out_features // 64) * 64 * in_features * blocked.element_size()
    if torch.ops.mkldnn._nbytes(blocked) != padded:  # not the layout read here
        return None
    address = torch.ops.mkldnn.data_ptr(blocked)
    x = torch.randn(5, in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
    expected = torch.ops.mkldnn._linear_pointwise(x, blocked, None, "none", [], "").float()
    error = (product(x, address, None, out_features).float() - expected).abs().max()
    return address if error <= _TOLERANCE[dtype] * expected.abs().max() else None


def product(x: Tensor, weight: int, bias: Tensor | None, out_features: int) -> Tensor:
    """``x @ W.T + bias`` for the blocked weight at address ``weight`` (``blocked_weight``), x (..., in)
    float32 or bfloat16 as the weight, at most ``MAX_ROWS`` rows."""
    x = x.contiguous()
    y = x.new_empty(*x.shape[:-1], out_features)
    kernel = library().matvec_f32 if x.dtype == torch.float32 else library().matvec_bf16
    kernel(x.data_ptr(), weight, None if bias is None else bias.data_ptr(), y.data_ptr(),
           x.numel() // x.shape[-1], x.shape[-1], out_features, torch.get_num_threads())
    return y
