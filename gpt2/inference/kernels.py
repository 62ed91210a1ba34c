"""Inference's products and attention, written by hand (``kernels.cpp``), built for this CPU: rows of x
(decoding's, one per sequence, or a prompt's) times a float32 or bfloat16 weight in oneDNN's blocked
layout, each block read from memory once for 8 rows; rows times an int8 or int4 weight in blocked
layouts of ours, each row quantised to 8 bits; and a decoding step's or a prompt's attention, read
straight from a float32 or bfloat16 KV cache. This module builds and loads them; the PyTorch
operators that call them, and the layouts they read, are ``gpt2.inference.ops``'s.

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

from gpt2.config import cache_dir
from gpt2.util.atomic import write_atomic

SOURCE = Path(__file__).with_name("kernels.cpp")
BUILD_TIMEOUT = 120.0  # seconds a build may take, unless GPT2_KERNELS_TIMEOUT says otherwise
PROBE_TIMEOUT = 10.0  # seconds for `c++ --version` (at most the build's bound)
SYMBOLS = ("matvec_f32", "matvec_bf16", "matvec_i8", "matvec_i4", "matvec_attend", "matvec_abilities")
# every variant's; only the entry points are exported, so two variants in one process share nothing
_FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-fvisibility=hidden"]
_ABILITIES = {"fp32": 1, "bf16": 2, "int8": 4, "int4": 8, "attention": 16}  # matvec_abilities()
_MULTIPLE = {"fp32": 1, "bf16": 2, "int8": 16, "int4": 32, "attention": 64}  # of the inputs


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
    path = built(f"kernels-{build.name}", SOURCE, [*_FLAGS, *build.flags], key=cpu)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise Unavailable(f"cannot load {path}: {e}") from None
    missing = [symbol for symbol in SYMBOLS if not hasattr(lib, symbol)]
    if missing:
        raise Unavailable(f"{path} lacks {', '.join(missing)}; delete it to rebuild it")
    if not lib.matvec_abilities():
        raise Unavailable(f"{' '.join(build.flags)} built no kernels ({build.name})")
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


def built(stem: str, source: Path, flags: list[str], after: tuple[str, ...] = (), key: str = "") -> Path:
    """The shared library ``source`` compiles into with ``flags`` (``after``: what follows the source on
    the command line, such as libraries), kept in the cache as ``<stem>-<key>.so``, the key covering the
    source, the compiler (``$CXX``, else ``g++``: its ``--version``), the flags and ``key``: the cached
    one when it is sound, else built once, every call to the compiler bounded in time; a failed build
    is remembered. Unavailable, with the reason, where it cannot be had."""
    name = os.environ.get("CXX", "g++")
    compiler = shutil.which(name)
    if compiler is None:
        raise Unavailable(f"no C++ compiler: {name} is not on PATH (install g++, or name one in CXX)")
    timeout = _build_timeout()
    path = _library_path(compiler, stem, source, [*flags, *after, key], min(PROBE_TIMEOUT, timeout))
    return _sound_library(path, [compiler, *flags, "-o", "", str(source), *after], timeout)


def _library_path(compiler: str, stem: str, source: Path, keyed: list[str], timeout: float) -> Path:
    """Where the library of ``source`` built by ``compiler`` (its ``--version``) with what ``keyed``
    holds is kept in the cache."""
    version = _run([compiler, "--version"], timeout, f"{Path(compiler).name} --version")
    key = hashlib.sha256("\0".join([source.read_text(), version, *keyed]).encode())
    return cache_dir() / "kernels" / f"{stem}-{key.hexdigest()[:16]}.so"


def _sound_library(path: Path, command: list[str], timeout: float) -> Path:
    """``path`` when it matches the size and SHA-256 its build recorded (loading a truncated library
    kills the process with SIGBUS); else built afresh by ``command`` (its output after ``-o``), once. A
    failed build is remembered beside it (``.failed``, with its reason) so that later processes skip
    straight to PyTorch's products."""
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
        _build(path, command, timeout)
    except Unavailable as e:
        why = f"{path.name} in the cache was unsound and rebuilding it failed: {e}" if unsound else str(e)
        with contextlib.suppress(OSError):  # a cache we cannot write: every process tries again
            write_atomic(failed, lambda tmp: tmp.write_text(why + "\n"))
        raise Unavailable(why) from None
    failed.unlink(missing_ok=True)
    return path


def _build(path: Path, command: list[str], timeout: float) -> None:
    """Run ``command`` with ``path`` after its ``-o`` (written whole or not at all), then record the
    library's size and SHA-256 beside it (``.sha256``), the record written last."""
    out = command.index("-o") + 1
    name = Path(command[0]).name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda tmp: _run([*command[:out], str(tmp), *command[out + 1 :]], timeout, name))
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
    """Whether the kernel for ``precision`` (fp32, bf16, int8, int4, attention) is in the library built
    here and takes ``in_features`` inputs (a multiple of what it reads at a time; attention: heads of
    64)."""
    lib = library()
    return lib is not None and bool(lib.matvec_abilities() & _ABILITIES[precision]) \
        and in_features % _MULTIPLE[precision] == 0
