"""Quantised inference on the CPU: the linear layers' weights in 8 or 4 bits, every other tensor in
float32 and the KV cache in bfloat16 (as llama.cpp keeps a 16-bit cache under every weight format;
attention runs in float32). Decoding reads every weight once per token, so fewer weight bytes is
more tokens per second.

- ``int8``: weights int8 with a scale per output channel; each input row is quantised to 8 bits on
  the fly and multiplied by the hand-written int8 kernel (``torch.ops.gpt2.int8_linear``, on our
  blocked layout) or, where that cannot run, by fbgemm's int8 product (``quantized::linear_dynamic``,
  what PyTorch's dynamic quantisation runs, faster than PyTorch's weight-only int8 kernel).
- ``int4``: groups of ``GROUP`` inputs with a scale and a zero point each (asymmetric, as llama.cpp's
  Q4_1), multiplied by the hand-written int4 kernel (``torch.ops.gpt2.int4_linear``; each input row
  quantised to 8 bits, as llama.cpp's Q4 products quantise theirs) or, where that cannot run, by
  ``torch._weight_int4pack_mm_for_cpu`` (tinygemm's packed layout, bfloat16 inputs; a prompt's many
  rows then multiply the weight unpacked to bfloat16, one layer at a time, by oneDNN). The LM head
  stays int8 (llama.cpp likewise keeps its output layer above 4 bits).

The tied embedding and LM head is one ``Int8Linear``, whose int8 rows ``Int8Embedding`` looks tokens
up in. Eager and compiled decoding call the same operators (``gpt2.inference.ops``).
``quantize_weights`` quantises a checkpoint tensor by tensor as it is read
(``gpt2.inference.load``), so no float copy of the model is ever held.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpt2.inference import ops
from gpt2.inference.cpu_layers import TiedEmbedding, replace_linear
from gpt2.model import Transformer
from gpt2.util.errors import UserError

BITS = {"int8": 8, "int4": 4}  # the quantised precisions of gpt2.config.PRECISIONS
GROUP = 32  # int4: inputs per scale and zero point (llama.cpp's Q4 blocks are 32 too)
_INT4_ROWS = 16  # tinygemm packs output channels in tiles of 16
# From this many rows on, unpacking an int4 weight to bfloat16 and multiplying that is faster than
# tinygemm's product (the two cross a little below this on the 124M shape's layers).
_UNPACK_ROWS = 192
_CHUNK_ROWS = 1024  # rows quantised at a time: the float temporaries stay small (the LM head has 50,257)


def _bias(bias: Tensor | None) -> nn.Parameter | None:
    return None if bias is None else nn.Parameter(bias.float(), requires_grad=False)


def int8_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """``weight`` (out, in) as int8 values and a float32 scale per row (symmetric: w = q * scale)."""
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(len(weight), dtype=torch.float32, device=weight.device)
    for start in range(0, len(weight), _CHUNK_ROWS):
        w = weight[start : start + _CHUNK_ROWS].float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        q[start : start + len(w)] = torch.round(w / scale[:, None]).to(torch.int8)
        scales[start : start + len(w)] = scale
    return q, scales


class Int8Linear(nn.Module):
    """``y = x W^T + b``, W int8 with a scale per output channel (``q`` and ``scales``: the weight's
    ``int8_rows``). Where the hand-written int8 kernel runs (``gpt2.inference.ops``), W is held in its blocked
    layout and multiplied by it, each input row quantised to 8 bits (faster than fbgemm's). Elsewhere
    fbgemm's dynamic int8 product multiplies it, adding the float32 bias itself (packed with the weight:
    one pass over the output, not two). ``rows``: the layer is the tied LM head, whose rows
    ``Int8Embedding`` looks tokens up in (fbgemm's packed copy cannot be read a row at a time, so its
    plain int8 rows are kept too)."""

    def __init__(self, q: Tensor, scales: Tensor, bias: Tensor | None, *, rows: bool = False,
                 gelu: bool = False) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("scales", scales)
        self.weight_bytes = 0  # bytes held outside the buffers: fbgemm's packed weight
        self.packed = None
        self.gelu = gelu  # an MLP's input layer, computing its tanh-GELU too (``replace_linear``)
        if ops.available("int8", self.in_features):
            self.register_buffer("weight", ops.int8_blocked(q))
            self.register_buffer("sums", ops.row_sums(q))
            self.bias = _bias(bias)
        else:
            self._pack(q, scales, bias)
            if rows:
                self.register_buffer("weight", q)

    def _pack(self, q: Tensor, scales: Tensor, bias: Tensor | None) -> None:
        zeros = torch.zeros(len(q), dtype=torch.long)
        with warnings.catch_warnings():  # torch announces that quantised tensors will move to torchao
            warnings.simplefilter("ignore", UserWarning)
            quantized = torch._make_per_channel_quantized_tensor(q, scales.double(), zeros, 0)
        self.weight_bytes = q.numel() + 4 * len(q)
        if bias is None or bias.is_meta:  # while loading, the bias comes after the weight: ``pack_bias``
            self.packed = torch.ops.quantized.linear_prepack(quantized, None)
            self.bias = _bias(bias)
        else:
            self.packed = torch.ops.quantized.linear_prepack(quantized, bias.float())
            self.weight_bytes += 4 * len(q)
            self.bias = None

    def pack_bias(self) -> None:
        """Move the bias, loaded after the layer was made, into fbgemm's packed weight (if it has one)."""
        if self.packed is None:
            return
        weight, _ = torch.ops.quantized.linear_unpack(self.packed)
        self.packed = torch.ops.quantized.linear_prepack(weight, self.bias.detach())
        self.weight_bytes += 4 * self.out_features
        self.bias = None

    def product(self, x: Tensor) -> Tensor:
        """The product of float32 ``x`` (and its GELU, for ``gelu``)."""
        if self.packed is None:
            return torch.ops.gpt2.int8_linear(x.contiguous(), self.weight, self.scales, self.sums, self.bias,
                                              self.out_features, self.gelu)
        y = torch.ops.quantized.linear_dynamic(x, self.packed, True)  # True: 7-bit inputs (fbgemm)
        return torch.ops.aten.gelu_(y, approximate="tanh") if self.gelu else y

    def rows(self, idx: Tensor) -> Tensor:
        """The float32 rows ``idx`` of W (for a layer made with ``rows``)."""
        blocked = self.packed is None  # else the plain rows kept beside fbgemm's packed copy
        q = ops.int8_blocked_rows(self.weight, idx) if blocked else F.embedding(idx, self.weight)
        return q.float() * self.scales[idx, None]

    def forward(self, x: Tensor) -> Tensor:
        return self.product(x.float())


class Int4Linear(nn.Module):
    """``y = x W^T + b`` with W in 4 bits, groups of ``GROUP`` inputs sharing a scale and a zero point.
    Where the hand-written int4 kernel runs (``gpt2.inference.ops``), W is held in its blocked layout (output
    channels padded to a multiple of 64) and multiplied by it, each input row quantised to 8 bits
    (faster than tinygemm's at every number of rows); elsewhere by tinygemm (channels padded to a
    multiple of 16)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, *, gelu: bool = False) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        if self.in_features % GROUP:
            raise UserError(f"int4 needs the model's width to be a multiple of {GROUP}, not "
                            f"{self.in_features}; choose int8")
        self.hand = ops.available("int4", self.in_features)
        multiple = 64 if self.hand else _INT4_ROWS
        padded = self.out_features + -self.out_features % multiple
        groups = self.in_features // GROUP
        if self.hand:
            blocked = torch.empty(padded // 64, groups, 1280, dtype=torch.uint8)
        else:
            packed = torch.empty(padded, self.in_features // 2, dtype=torch.uint8, device=weight.device)
            both = torch.empty(groups, padded, 2, dtype=torch.bfloat16, device=weight.device)
        for start in range(0, padded, _CHUNK_ROWS):
            q, scales, low = _int4_values(weight[start : start + _CHUNK_ROWS], multiple)
            if self.hand:
                blocked[start // 64 : (start + len(q)) // 64] = ops.int4_blocked(q, scales, low)
                continue
            packed[start : start + len(q)] = torch._convert_weight_to_int4pack_for_cpu(q, 1)
            # tinygemm's dequantisation is (q - 8) * scale + zero, so zero is the value of q = 8.
            both[:, start : start + len(q)] = torch.stack([scales, low + 8 * scales], dim=2).transpose(0, 1)
        if self.hand:
            self.register_buffer("weight", blocked)
        else:
            self.register_buffer("weight", packed)
            self.register_buffer("scales_and_zeros", both)
        self.bias = _bias(bias)
        self.gelu = gelu  # as ``Int8Linear``'s
        self.unpackable = not self.hand and padded % 64 == 0 and _unpacking_matches()  # for ``unpacked``

    def unpacked(self) -> Tensor:
        """The weight (out, in) in bfloat16, as tinygemm's product dequantises it."""
        padded, k = len(self.weight), self.in_features
        q = _unpack_int4(self.weight, k).view(padded, k // GROUP, GROUP)
        scales, zeros = self.scales_and_zeros.transpose(0, 1).unbind(dim=2)
        w = q.to(torch.bfloat16).sub_(8).mul_(scales[..., None]).add_(zeros[..., None])  # in place: one copy
        return w.view(padded, k)[: self.out_features]

    def forward(self, x: Tensor) -> Tensor:
        if self.hand:
            x = x.float().contiguous()
            return torch.ops.gpt2.int4_linear(x, self.weight, self.bias, self.out_features, self.gelu)
        y = self._tinygemm(x)
        return F.gelu(y, approximate="tanh") if self.gelu else y

    def _tinygemm(self, x: Tensor) -> Tensor:
        """The product where the hand kernel does not run: tinygemm's, or for many rows bfloat16's on
        the unpacked weight."""
        rows = x.reshape(-1, self.in_features).bfloat16()
        if len(rows) >= _UNPACK_ROWS and self.unpackable:
            y = F.linear(rows, self.unpacked())
        else:
            y = torch._weight_int4pack_mm_for_cpu(rows, self.weight, GROUP, self.scales_and_zeros)
        if y.shape[1] != self.out_features:
            y = y[:, : self.out_features]
        y = y.view(*x.shape[:-1], self.out_features)
        # bfloat16 + a float32 bias is float32 already: one pass over the output
        return y.float() if self.bias is None else torch.add(y, self.bias)


def _int4_values(weight: Tensor, multiple: int) -> tuple[Tensor, Tensor, Tensor]:
    """Rows of ``weight`` (padded with zero rows to a ``multiple``) in 4 bits: the values q (rows, in)
    int32, 0 to 15, and each group's scale and low (rows, in / GROUP), w = q * scale + low."""
    w = weight.float()
    w = F.pad(w, (0, 0, 0, -len(w) % multiple)).view(len(w) + -len(w) % multiple, -1, GROUP)
    low, high = w.amin(dim=2, keepdim=True), w.amax(dim=2, keepdim=True)
    scales = ((high - low) / 15).clamp(min=1e-8)
    q = torch.round((w - low) / scales).clamp(0, 15).to(torch.int32).flatten(1)
    return q, scales.squeeze(2), low.squeeze(2)


def _unpack_int4(packed: Tensor, in_features: int) -> Tensor:
    """tinygemm's packed int4 weight (out, in / 2) as uint8 values (out, in). Its CPU layout in
    PyTorch 2.13, for a multiple of 64 output channels: blocks of 64 channels, byte ``(block, k, j)``
    holding input ``k`` of channel ``j`` in its low nibble and of channel ``32 + j`` in its high one."""
    tiles = packed.view(len(packed) // 64, in_features, 32)
    return torch.cat([tiles & 15, tiles >> 4], dim=2).transpose(1, 2).reshape(len(packed), in_features)


@functools.cache
def _unpacking_matches() -> bool:
    """Whether this PyTorch packs int4 weights as ``_unpack_int4`` reads them (checked once, on a
    probe; where not, prompts stay on tinygemm's product)."""
    q = torch.randint(0, 16, (128, 96), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    return packed.shape == (128, 48) and torch.equal(_unpack_int4(packed, 96), q.to(torch.uint8))


class Int8Embedding(TiedEmbedding):
    """The token embedding tied to an ``Int8Linear`` LM head: a row is its int8 values times its scale."""


def quantize_linear(weight: Tensor, bias: Tensor | None, bits: int, *, gelu: bool = False) -> nn.Module:
    """The quantised layer of a float ``weight`` (out, in) and ``bias`` (computing tanh-GELU too when
    ``gelu``)."""
    if bits == 8:
        return Int8Linear(*int8_rows(weight), bias, gelu=gelu)
    return Int4Linear(weight, bias, gelu=gelu)


def quantize_weights(model: Transformer, weights: Iterable[tuple[str, Tensor]], bits: int) -> None:
    """Build ``model`` (made on the meta device) from ``weights`` ((name, float tensor) in the model's
    names, e.g. read from a checkpoint one at a time): each linear layer replaced by its quantised
    layer as its weight comes, the tied embedding and LM head by one int8 layer, every other tensor
    in float32."""
    layers = {f"{name}.weight": name for name, module in model.named_modules()
              if type(module) is nn.Linear and name != "lm_head"}
    rest = {}
    for name, tensor in weights:
        if name in layers:
            replace_linear(model, layers[name], lambda layer, gelu, w=tensor: quantize_linear(
                w, layer.bias, bits, gelu=gelu))
        elif name == "transformer.wte.weight":
            q, scales = int8_rows(tensor)
            tensor = None  # the float embedding, the largest tensor, goes before its int8 rows are laid out
            head = Int8Linear(q, scales, None, rows=True)
            model.set_submodule("lm_head", head)
            model.set_submodule("transformer.wte", Int8Embedding(head))
        elif name != "lm_head.weight":
            rest[name] = tensor.float()
        del tensor  # before the next is read: the float copy goes now, not with the next one
    model.load_state_dict(rest, strict=False, assign=True)
    for module in model.modules():
        if isinstance(module, Int8Linear) and module.bias is not None:
            module.pack_bias()
