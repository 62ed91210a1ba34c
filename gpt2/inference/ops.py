"""The hand-written CPU kernels (``gpt2.inference.kernels``) as PyTorch operators, ``torch.ops.gpt2.*``,
and the weight layouts they read.

The operators are C++ (``ops.cpp``, built once per machine against this PyTorch's headers, into the
same cache and with the same guards as the kernels: a build bounded in time, a library loaded only
when it matches the size and SHA-256 its build recorded, a failed build remembered): each checks its
arguments (device, dtype, shape, contiguity; a wrong one is one clear ``ValueError`` naming the
operator and the argument, never a read of memory the tensors do not hold), makes its output and
calls the kernel that ``gpt2.inference.kernels`` built for this CPU. Their fake implementations, here,
give each output's shape and dtype, so ``torch.compile`` traces a decode step through the operators
(a compiled step's C++ wrapper calls them with no Python between) and fuses the small ops between
them. Eager and compiled decoding call the same operators: the layers of
``gpt2.inference.cpu_layers`` and ``gpt2.inference.quantization`` have one forward pass each.

- ``blocked_linear(x, weight, bias, out_features, gelu)``: float32 or bfloat16 rows times a weight in
  oneDNN's blocked layout (``blocked``), given as parts of consecutive rows (the tied LM head keeps its
  whole blocks in the embedding's memory and its last rows in a padded block of their own);
- ``int8_linear(x, weight, scales, sums, bias, out_features, gelu)`` and ``int4_linear(x, weight,
  bias, out_features, gelu)``: float32 rows, each quantised to 8 bits, times an 8- or 4-bit weight in
  the layouts of ``int8_blocked`` and ``int4_blocked``;
- ``attend(qkv, keys, values, real, length)``: one layer's attention over the KV cache, writing the
  chunk's keys and values into it (the operator mutates ``keys`` and ``values``).

``available(precision, in_features)`` says whether a layer can use them; where not, the layers keep
PyTorch's products, and the reason is ``gpt2.inference.kernels.summary()``'s (``gpt2 info``).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import Tensor

from gpt2.inference import kernels

SOURCE = Path(__file__).with_name("ops.cpp")
_LIBRARIES = ("-lc10", "-ltorch_cpu")  # after the source: linkers drop libraries named before what uses them
_ENTRY_POINTS = {"fp32": "matvec_f32", "bf16": "matvec_bf16", "int8": "matvec_i8", "int4": "matvec_i4",
                 "attention": "matvec_attend"}


def available(precision: str, in_features: int) -> bool:
    """Whether the operator for ``precision`` (fp32, bf16, int8, int4, attention) runs here, for
    ``in_features`` inputs: the operators are loaded and the kernel is in this CPU's build."""
    return operators() and kernels.kernel(precision, in_features)


def operators() -> bool:
    """Load the operators (building them on first use) and bind them to the kernels
    ``kernels.library()`` gives now; False where either cannot be had here (``kernels.summary()``
    says why)."""
    global _bound
    lib = kernels.library()
    if lib is None or not _loaded():
        return False
    if lib is not _bound:
        addresses = [ctypes.cast(getattr(lib, name), ctypes.c_void_p) if kernels.kernel(precision, 4096)
                     else None for precision, name in _ENTRY_POINTS.items()]
        _loaded().gpt2_bind(*addresses, kernels.summary().encode())
        _bound = lib
    return True


_bound: ctypes.CDLL | None = None  # the kernels the operators call
_off: str | None = None  # why the operators could not be had


def summary() -> str:
    """``on: <variant> (fp32, bf16, ...)``, or ``off: <why>`` (the kernels' or their operators'), for
    ``gpt2 info``."""
    state = kernels.summary()
    if state.startswith("on"):
        disabled, kernels.log.disabled = kernels.log.disabled, True
        try:
            if not operators():
                return f"off: {_off}"
        finally:
            kernels.log.disabled = disabled
    return state


@functools.cache
def _loaded() -> ctypes.CDLL | None:
    """The operators' library, loaded into PyTorch (built on first use) with their fake
    implementations; None, said once in a WARNING, where it cannot be."""
    try:
        path = kernels.built("ops", SOURCE, _flags(), _LIBRARIES, key=torch.__version__)
        try:
            torch.ops.load_library(str(path))
        except OSError as e:
            why = e.__cause__ or e
            raise kernels.Unavailable(f"cannot load {path}: {why}; delete it to rebuild it") from None
    except kernels.Unavailable as e:
        global _off
        _off = f"their PyTorch operators: {' '.join(str(e).split())}"
        kernels.log.warning("gpt2: the hand-written CPU kernels are off, so decoding runs on PyTorch's "
                            "slower products: %s", _off)
        return None
    _register_fakes()
    return ctypes.CDLL(str(path))


def _flags() -> list[str]:
    """How ``ops.cpp`` is compiled: against this PyTorch's headers and libraries, with its C++ ABI."""
    from torch.utils import cpp_extension

    torch_lib = Path(torch.__file__).parent / "lib"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return ["-O2", "-std=c++17", "-shared", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            *(f"-I{p}" for p in cpp_extension.include_paths()), f"-L{torch_lib}", f"-Wl,-rpath,{torch_lib}"]


def _register_fakes() -> None:
    """The operators' fake implementations: each output's shape and dtype, for ``torch.compile``."""

    @torch.library.register_fake("gpt2::blocked_linear")
    def _(x: Tensor, weight: list[Tensor], bias: Tensor | None, out_features: int, gelu: bool) -> Tensor:
        return x.new_empty(*x.shape[:-1], out_features)

    @torch.library.register_fake("gpt2::int8_linear")
    def _(x: Tensor, weight: Tensor, scales: Tensor, sums: Tensor, bias: Tensor | None, out_features: int,
          gelu: bool) -> Tensor:
        return x.new_empty(*x.shape[:-1], out_features)

    @torch.library.register_fake("gpt2::int4_linear")
    def _(x: Tensor, weight: Tensor, bias: Tensor | None, out_features: int, gelu: bool) -> Tensor:
        return x.new_empty(*x.shape[:-1], out_features)

    @torch.library.register_fake("gpt2::attend")
    def _(qkv: Tensor, keys: Tensor, values: Tensor, real: Tensor, length: Tensor) -> Tensor:
        return qkv.new_empty(*qkv.shape[:-1], qkv.shape[-1] // 3)


# ----------------------------------------------------------------------------------------------------
# The layouts


def pairs(dtype: torch.dtype) -> int:
    """Inputs side by side in a blocked weight of ``dtype``: 2 for bfloat16 (as vdpbf16ps takes them)."""
    return 2 if dtype == torch.bfloat16 else 1


def blocked(weight: Tensor) -> Tensor:
    """A float32 or bfloat16 weight (out, in) in oneDNN's blocked layout, which the float kernels read:
    blocks of 64 rows (the last padded with zeros), each input-major, bfloat16's inputs in pairs:
    (ceil(out / 64), in / pair, 64, pair)."""
    out_features, in_features = weight.shape
    pair = pairs(weight.dtype)
    rows = weight.detach()
    if out_features % 64:
        rows = torch.cat([rows, rows.new_zeros(-out_features % 64, in_features)])
    return rows.view(-1, 64, in_features // pair, pair).transpose(1, 2).contiguous()


def unblocked(parts: list[Tensor], out_features: int) -> Tensor:
    """The plain weight (out, in) of a blocked one (``blocked``, in parts of consecutive rows): a copy."""
    rows = [part.transpose(1, 2).reshape(-1, part.shape[1] * part.shape[3]) for part in parts]
    return torch.cat(rows)[:out_features]


def int8_blocked(q: Tensor) -> Tensor:
    """int8 rows ``q`` (out, in) in the int8 kernel's layout: blocks of 64 rows (the last padded with
    zeros), groups of 4 inputs side by side, (ceil(out / 64), in / 4, 64, 4)."""
    out_features, in_features = q.shape
    layout = q.new_zeros(-(-out_features // 64), in_features // 4, 64, 4)
    whole = out_features // 64 * 64  # written in place: no padded copy of q beside the blocked one
    layout[: whole // 64] = q[:whole].view(-1, 64, in_features // 4, 4).transpose(1, 2)
    if whole < out_features:
        layout[-1, :, : out_features - whole] = q[whole:].view(-1, in_features // 4, 4).transpose(0, 1)
    return layout


def int8_blocked_rows(layout: Tensor, idx: Tensor) -> Tensor:
    """Rows ``idx`` (any shape) of an ``int8_blocked`` weight, as int8 (*idx.shape, in)."""
    return layout[idx // 64, :, idx % 64].flatten(-2)


def row_sums(q: Tensor) -> Tensor:
    """Each row's sum of int8 values ``q`` (out, in), int32. By numpy, which converts a few thousand
    values at a time: torch converts all of its input first (the LM head's: 4x its int8 bytes), and
    chunk by chunk its freed temporaries stay resident."""
    return torch.from_numpy(q.numpy().sum(axis=1, dtype="int32"))


def int4_blocked(q: Tensor, scales: Tensor, lows: Tensor) -> Tensor:
    """4-bit values ``q`` (out, in; 0 to 15, any integer dtype; out a multiple of 64) with a scale and a
    low per 32 inputs of a row (``scales``, ``lows``: (out, in / 32); w = q * scale + low) in the int4
    kernel's layout, one stream of bytes: blocks of 64 rows, each a run of groups of 32 inputs, each
    group 4 steps of 8 inputs (4 vectors of 16 rows x 4 bytes, byte b of a row holding inputs b and
    4 + b in its low and high nibbles), then its 64 scales and 64 lows in bfloat16:
    (out / 64, in / 32, 1280) uint8."""
    out_features, in_features = q.shape
    groups = in_features // 32
    halves = q.to(torch.uint8).view(out_features, in_features // 8, 2, 4)
    packed = (halves[:, :, 0] | (halves[:, :, 1] << 4)).view(-1, 4, 16, groups, 4, 4)
    steps = packed.permute(0, 3, 4, 1, 2, 5).reshape(-1, groups, 1024)
    both = [t.bfloat16().view(-1, 64, groups).transpose(1, 2).contiguous() for t in (scales, lows)]
    return torch.cat([steps, *(t.view(torch.uint8) for t in both)], dim=2)
