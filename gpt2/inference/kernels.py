"""Inference's products, written by hand (``kernels.cpp``): rows of x (decoding's, one per sequence:
up to ``MAX_ROWS`` for the blocks, any number for the LM head) times a float32 or bfloat16 weight in
oneDNN's blocked layout, the one ``gpt2.inference.cpu_layers``' blocked layers and head hold, read
from memory once for 8 rows; and any number of rows times an int8 weight in a blocked layout of ours
(``gpt2.inference.quantization``'s int8 and int4 layers), each row quantised to 8 bits; and a
decoding step's or a prompt's attention (``attend``), read straight from a float32 or bfloat16 KV
cache.

Why by hand: a decoding step reads every weight once for a row or a few, so its speed is the speed
at which the products stream their weights. These read each block of 64 rows input by input and
multiply a vector of rows per instruction (no sums across a vector), in float32 and bfloat16, and in
int8 and int4 with vpdpbusd (or, without VNNI, vpmaddubsw) on blocks of the same kind (int4: each
group's scales beside its values, one stream), 16 KB of a block at a time, which stay in the L1 cache
while 8 rows are multiplied by them. Attention by hand replaces, per layer and token, a
float32 copy of the whole bfloat16 cache, the conversions around it and PyTorch's attention call over
every position of the cache, written or not. The benchmarks page of the docs compares them with
oneDNN's, fbgemm's, tinygemm's and PyTorch's attention.

The variants (``VARIANTS``): the same source, built for one level of x86-64 instruction sets each,
every precision in every one, with the same entry points and weight layouts:

- ``avx512bf16``: AVX-512 F/BW/DQ/VL with VNNI and BF16 (Cooper Lake, Sapphire Rapids and later Xeons,
  AMD Zen 4 and later);
- ``avx512``: AVX-512 F/BW/DQ/VL, with VNNI where the CPU has it (``avx512+vnni``: Cascade Lake, Ice
  Lake; without: Skylake-SP); bfloat16 widened to float32 by shifting, narrowed in integer operations;
- ``avx2``: AVX2, FMA and F16C, with AVX-VNNI where the CPU has it (``avx2+vnni``: Alder Lake and later
  desktops); 8 floats a vector.

The best variant the CPU runs (its flags in /proc/cpuinfo) is chosen; ``GPT2_KERNELS_ISA=<variant>``
(``avx512bf16``, ``avx512``, ``avx2``, or either of the ``+vnni`` ones) forces one, and is refused
where the CPU lacks its instructions. Other CPUs (ARM, x86 without AVX2) keep PyTorch's products.
``variant()`` names the variant in use.

The source is compiled once per machine and variant by the system's C++ compiler (``$CXX``, else
``g++``), with the variant's own ``-m`` flags (never ``-march=native``: a variant needs exactly the
instructions checked for), into ``cache_dir() / "kernels"`` and loaded with ctypes; its threads are
the OpenMP pool PyTorch runs. The library is written whole or not at all, and its size and SHA-256
beside it (``.sha256``), written last; a library that does not match them is never loaded (loading a
truncated one kills the process with SIGBUS) but rebuilt, once. Every call to the compiler is bounded
in time: ``$GPT2_KERNELS_TIMEOUT`` seconds for the build (default ``BUILD_TIMEOUT``), at most
``PROBE_TIMEOUT`` for ``--version``. A failed build is remembered beside the library
(``kernels-<variant>-<key>.so.failed``, holding its reason; the key covers the source, the compiler's
version, the variant's flags and the CPU), so later processes go straight to PyTorch's products;
delete that file, or set ``GPT2_KERNELS_RETRY=1``, to build again.

Where there is no compiler, its build fails or times out, the library lacks a kernel's symbol, the
CPU runs no variant, or ``GPT2_KERNELS_ISA`` names one it cannot run, the layers keep oneDNN's and
fbgemm's products, and the first use of the kernels in a process prints why, in one line (a WARNING
of this module's logger); ``gpt2 info`` shows it too, or the variant in use. ``GPT2_MATVEC=0`` turns
the kernels off, silently.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import signal
import subprocess
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from gpt2.config import cache_dir
from gpt2.util.atomic import write_atomic

SOURCE = Path(__file__).with_name("kernels.cpp")
MAX_ROWS = 8  # rows of x the blocks' layers give the kernel (decoding's batches); oneDNN's beyond
BUILD_TIMEOUT = 120.0  # seconds a build may take, unless GPT2_KERNELS_TIMEOUT says otherwise
PROBE_TIMEOUT = 10.0  # seconds for `c++ --version` (at most the build's bound)
SYMBOLS = ("matvec_f32", "matvec_bf16", "matvec_i8", "matvec_i4", "matvec_attend", "matvec_abilities")
# every variant's; only the entry points are exported, so two variants in one process share nothing
_FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-fvisibility=hidden"]
_ABILITIES = {"fp32": 1, "bf16": 2, "int8": 4, "int4": 8, "attention": 16}  # matvec_abilities()
_MULTIPLE = {"fp32": 1, "bf16": 2, "int8": 16, "int4": 32, "attention": 64}  # of the inputs
_FLOATS = {torch.float32: "fp32", torch.bfloat16: "bf16"}
_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}  # of the largest output, against oneDNN's


class Variant(NamedTuple):
    """A level of instruction sets the kernels are built for: the CPU's flags it needs (as /proc/cpuinfo
    names them), the compiler's flags for them, and the VNNI flag it also takes where the CPU has it
    (the CPU's name, the compiler's flag), or None."""

    needs: tuple[str, ...]
    flags: tuple[str, ...]
    vnni: tuple[str, str] | None = None


_AVX512 = Variant(("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma", "f16c"),
                  ("-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx2", "-mfma", "-mf16c"))
VARIANTS = {  # best first: the first one the CPU runs is built
    "avx512bf16": Variant((*_AVX512.needs, "avx512_vnni", "avx512_bf16"),
                          (*_AVX512.flags, "-mavx512vnni", "-mavx512bf16")),
    "avx512": _AVX512._replace(vnni=("avx512_vnni", "-mavx512vnni")),
    "avx2": Variant(("avx2", "fma", "f16c"), ("-mavx2", "-mfma", "-mf16c"), ("avx_vnni", "-mavxvnni")),
}


class _Build(NamedTuple):
    """The variant chosen here: its name as ``variant()`` gives it (``+vnni`` where it takes VNNI) and
    the compiler's flags for it."""

    name: str
    flags: tuple[str, ...]


log = logging.getLogger(__name__)
_off: str | None = None  # why library() gave None, for summary()
_in_use: str | None = None  # the variant library() loaded
_told: set[str] = set()  # the reasons already printed in this process


class Unavailable(Exception):
    """Why the kernels cannot be had here, in one line for the user."""


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels (built on first use, then read from the cache once verified), or None
    where they cannot be had here; then the reason is printed once per process (a WARNING of this
    module's logger; not for ``GPT2_MATVEC=0``, which asks for it) and kept for ``summary``."""
    global _off, _in_use
    try:
        lib, _in_use = _open()
    except Unavailable as e:
        _off, _in_use = " ".join(str(e).split()), None  # one line, whatever the compiler printed
        if os.environ.get("GPT2_MATVEC") != "0" and _off not in _told:
            _told.add(_off)
            log.warning("gpt2: the hand-written CPU kernels are off, so decoding runs on PyTorch's slower "
                        "products: %s", _off)
        return None
    _off = None
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


def variant() -> str | None:
    """The variant of the kernels in use here (``avx512bf16``, ``avx512+vnni``, ``avx512``,
    ``avx2+vnni`` or ``avx2``), or None where they are off (``summary`` says why)."""
    return _in_use if library() is not None else None


def summary() -> str:
    """``on: <variant> (fp32, bf16, ...)``: which variant multiplies what here; or ``off: <why>``, for
    ``gpt2 info`` (which prints it as a row: no notice besides)."""
    disabled, log.disabled = log.disabled, True
    try:
        lib = library()
    finally:
        log.disabled = disabled
    if lib is None:
        return f"off: {_off}"
    abilities = ", ".join(k for k, bit in _ABILITIES.items() if lib.matvec_abilities() & bit)
    return f"on: {_in_use} ({abilities})"


def _open() -> tuple[ctypes.CDLL, str]:
    """The verified library, loaded, and its variant's name; Unavailable, with the reason, where it
    cannot be."""
    if os.environ.get("GPT2_MATVEC") == "0":
        raise Unavailable("GPT2_MATVEC=0")
    cpu = _cpu_flags()
    build = _choose(cpu)
    name = os.environ.get("CXX", "g++")
    compiler = shutil.which(name)
    if compiler is None:
        raise Unavailable(f"no C++ compiler: {name} is not on PATH (install g++, or name one in CXX)")
    timeout = _build_timeout()
    path = _library_path(compiler, build, cpu, min(PROBE_TIMEOUT, timeout))
    path = _sound_library(path, compiler, build, timeout)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise Unavailable(f"cannot load {path}: {e}") from None
    missing = [symbol for symbol in SYMBOLS if not hasattr(lib, symbol)]
    if missing:
        raise Unavailable(f"{path} lacks {', '.join(missing)}; delete it to rebuild it")
    if not lib.matvec_abilities():
        raise Unavailable(f"{Path(compiler).name} {' '.join(build.flags)} built no kernels ({build.name})")
    return lib, build.name


def _choose(cpu: str) -> _Build:
    """The variant for this CPU (``cpu``: ``_cpu_flags()``): the one ``GPT2_KERNELS_ISA`` names, else the
    best it runs, with VNNI where the CPU has it; Unavailable where it runs none, or not the one named."""
    machine = platform.machine()
    if machine.lower() not in ("x86_64", "amd64"):
        raise Unavailable(f"this CPU ({machine}) is not x86-64: the kernels are written for AVX2 and AVX-512")
    has = cpu_has(cpu)
    if not has:
        raise Unavailable("this CPU's instruction sets cannot be read (no flags in /proc/cpuinfo)")
    forced = os.environ.get("GPT2_KERNELS_ISA", "")
    name, plus, extra = forced.partition("+")
    if not forced:
        name = next((name for name, v in VARIANTS.items() if set(v.needs) <= has), "")
        if not name:
            raise Unavailable("this CPU has no AVX2 with FMA and F16C, the least the kernels need")
    elif name not in VARIANTS or (plus and (extra != "vnni" or VARIANTS[name].vnni is None)):
        raise Unavailable(f"GPT2_KERNELS_ISA={forced} is not a variant of the kernels: {', '.join(_names())}")
    v = VARIANTS[name]
    missing = [flag for flag in (*v.needs, *(v.vnni[:1] if plus and v.vnni else ())) if flag not in has]
    if missing:
        raise Unavailable(f"GPT2_KERNELS_ISA={forced} needs {', '.join(missing)}, which this CPU lacks")
    if v.vnni is not None and v.vnni[0] in has:
        return _Build(f"{name}+vnni", (*v.flags, v.vnni[1]))
    return _Build(name, v.flags)


def cpu_has(cpu: str) -> set[str]:
    """The instruction sets in ``cpu`` (``_cpu_flags()``), as /proc/cpuinfo names them."""
    line = next((line for line in cpu.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def _names() -> list[str]:
    """Every name ``GPT2_KERNELS_ISA`` takes."""
    return [n for name, v in VARIANTS.items() for n in (name, f"{name}+vnni")[: 1 + (v.vnni is not None)]]


def _build_timeout() -> float:
    """The build's bound in seconds: ``$GPT2_KERNELS_TIMEOUT`` or ``BUILD_TIMEOUT``."""
    given = os.environ.get("GPT2_KERNELS_TIMEOUT", str(BUILD_TIMEOUT))
    try:
        seconds = float(given)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < float("inf"):
        raise Unavailable(f"GPT2_KERNELS_TIMEOUT must be a positive number of seconds, not {given!r}")
    return seconds


def _library_path(compiler: str, build: _Build, cpu: str, timeout: float) -> Path:
    """Where the library for this source, compiler (its ``--version``), variant and CPU is kept in the
    cache."""
    version = _run([compiler, "--version"], timeout, f"{Path(compiler).name} --version")
    key = hashlib.sha256("\0".join([SOURCE.read_text(), version, *_FLAGS, *build.flags, cpu]).encode())
    return cache_dir() / "kernels" / f"kernels-{build.name}-{key.hexdigest()[:16]}.so"


def _sound_library(path: Path, compiler: str, build: _Build, timeout: float) -> Path:
    """``path`` when it matches the size and SHA-256 its build recorded (loading a truncated library
    kills the process with SIGBUS); else built afresh, once. A failed build is remembered beside it
    (``.failed``, with its reason) so that later processes skip straight to PyTorch's products."""
    if _sound(path):
        return path
    failed = path.with_name(path.name + ".failed")
    if failed.is_file() and os.environ.get("GPT2_KERNELS_RETRY") != "1":
        try:
            reason = failed.read_text(errors="replace").strip()
        except OSError as e:
            reason = f"the build failed ({e.strerror})"
        raise Unavailable(f"{reason} (remembered in {failed}: delete it, or set GPT2_KERNELS_RETRY=1, "
                          "to build again)")
    unsound = path.exists()
    try:
        _build(path, compiler, build, timeout)
    except Unavailable as e:
        why = f"{path.name} in the cache was unsound and rebuilding it failed: {e}" if unsound else str(e)
        with contextlib.suppress(OSError):  # a cache we cannot write: every process tries again
            write_atomic(failed, lambda tmp: tmp.write_text(why + "\n"))
        raise Unavailable(why) from None
    failed.unlink(missing_ok=True)
    return path


def _build(path: Path, compiler: str, build: _Build, timeout: float) -> None:
    """Compile the source for ``build`` into ``path`` (written whole or not at all), then record its
    size and SHA-256 beside it (``.sha256``), the record written last."""
    name = Path(compiler).name
    command = [compiler, *_FLAGS, *build.flags, "-o"]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda tmp: _run([*command, str(tmp), str(SOURCE)], timeout, name))
        write_atomic(_record(path), lambda tmp: tmp.write_text(_fingerprint(path)))
    except OSError as e:
        raise Unavailable(f"cannot write the kernels into {path.parent}: {e.strerror or e}") from None


def _record(path: Path) -> Path:
    """The file holding ``path``'s size and SHA-256, as its build wrote it."""
    return path.with_name(path.name + ".sha256")


def _fingerprint(path: Path) -> str:
    """``path``'s size and SHA-256, one line."""
    data = path.read_bytes()
    return f"{len(data)} {hashlib.sha256(data).hexdigest()}\n"


def _sound(path: Path) -> bool:
    """Whether ``path`` is the library its build recorded: whole, and not changed since."""
    try:
        return path.is_file() and _record(path).read_text() == _fingerprint(path)
    except (OSError, UnicodeDecodeError):
        return False


def _run(command: list[str], timeout: float, what: str) -> str:
    """``command``'s standard output; Unavailable (its first error line, or that it did not answer
    within ``timeout`` seconds: its whole process group is killed) where it fails."""
    try:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, errors="replace",
                                   start_new_session=True)  # its own group: killed whole on a timeout
    except OSError as e:
        raise Unavailable(f"{what} cannot run: {e.strerror or e}") from None
    with process:  # its pipes closed, and the process waited for, on the way out
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                os.killpg(process.pid, signal.SIGKILL)
            raise Unavailable(f"{what} did not answer within {timeout:g} s (GPT2_KERNELS_TIMEOUT)") from None
    if process.returncode:
        lines = [line.strip() for line in err.splitlines() if line.strip()]
        first = next((line for line in lines if "error" in line.lower()), lines[0] if lines else "")
        raise Unavailable(f"{what} failed: {first or f'exit status {process.returncode}'}")
    return out


def _cpu_flags() -> str:
    """The CPU's model and instruction sets (``/proc/cpuinfo``'s lines): what the variant is chosen by,
    and part of its library's key."""
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
    chunk by chunk its freed temporaries stay resident."""
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
