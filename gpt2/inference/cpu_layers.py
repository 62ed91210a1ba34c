"""Layers that make fp32 and bf16 inference faster on the CPU, each built from the network's own layer
(same weights, same values): the hand-written kernels' products on blocked weights (``HandLinear``),
the tied LM head blocked in the embedding's own memory (``BlockedHead``) and attention over the KV
cache (``HandAttention``), all through the operators of ``gpt2.inference.ops``, which eager and
compiled decoding call alike; and, where those kernels do not run, oneDNN's products on plain or
blocked weights. ``gpt2.inference.load`` builds them into a model once, when it is loaded for inference.

PyTorch hands every fp32 CPU product to MKL, whose products with a few rows (one per sequence when
decoding) run below oneDNN's except on Intel CPUs for a row or two; a weight reordered once into
oneDNN's blocked layout multiplies faster still, and the hand-written kernels read that layout at
memory speed for decoding's few rows.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpt2.inference import ops
from gpt2.kv_cache import KVCache
from gpt2.model import MLP, CausalSelfAttention, Transformer


@torch.library.custom_op("gpt2::onednn_linear", mutates_args=())
def _onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None, gelu: bool) -> Tensor:
    """``F.linear`` computed by oneDNN on the plain (out, in) weight, then tanh-GELU when ``gelu``. As
    a custom op, a compiled graph calls it as it is rather than lowering it to the kernel PyTorch
    would pick."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, *_post_op(gelu))


@_onednn_linear.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None, gelu: bool) -> Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _post_op(gelu: bool) -> tuple[str, list, str]:
    """oneDNN's post-op arguments: tanh-GELU computed on the product's output as it is written."""
    return ("gelu", [], "tanh") if gelu else ("none", [], "")


def intel_cpu() -> bool:
    """Whether this is an Intel CPU (whose MKL multiplies a row or two faster than oneDNN)."""
    try:
        with open("/proc/cpuinfo") as f:
            return "GenuineIntel" in f.read(4096)
    except OSError:
        return False


def replace_linears(model: nn.Module, names: list[str],
                    build: Callable[[nn.Linear, bool], nn.Module]) -> None:
    """Replace the ``nn.Linear`` layers ``names`` of ``model`` with ``build(layer, gelu)`` (see
    ``replace_linear``), one at a time: each old layer can be freed as soon as its replacement is made."""
    for name in names:
        replace_linear(model, name, build)


def replace_linear(model: nn.Module, name: str, build: Callable[[nn.Linear, bool], nn.Module]) -> None:
    """Replace layer ``name`` of ``model`` with ``build(layer, gelu)``; ``gelu`` is True for an MLP's
    input layer, whose new layer computes the MLP's tanh-GELU as it writes its output (one pass over
    it), the MLP's own activation then the identity."""
    gelu = name.endswith("mlp.c_fc") and _gelu_after(model, name)
    model.set_submodule(name, build(model.get_submodule(name), gelu))
    if gelu:
        model.set_submodule(name.removesuffix("c_fc") + "act", nn.Identity())


def _gelu_after(model: nn.Module, name: str) -> bool:
    """Whether layer ``name`` is the input of an MLP whose activation is GPT-2's tanh-GELU."""
    mlp = model.get_submodule(name.removesuffix(".c_fc"))
    return isinstance(mlp, MLP) and isinstance(mlp.act, nn.GELU) and mlp.act.approximate == "tanh"


# ----------------------------------------------------------------------------------------------------
# oneDNN on the plain weights (fp32)


class OneDNNLinear(nn.Linear):
    """An fp32 ``nn.Linear`` (the same parameters) whose gradient-free products run on oneDNN, except
    those of at most ``mkl_rows`` rows, which stay on MKL. ``gelu``: the layer is an MLP's input and
    computes its tanh-GELU too (oneDNN's post-op)."""

    def __init__(self, linear: nn.Linear, *, mkl_rows: int, gelu: bool) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # the same parameters (a tied head stays tied)
        self.mkl_rows, self.gelu = mkl_rows, gelu

    def forward(self, x: Tensor) -> Tensor:
        if not x.is_cpu or x.dtype != torch.float32 or torch.is_grad_enabled() \
                or torch.is_autocast_enabled("cpu") or x.numel() <= self.mkl_rows * x.shape[-1]:
            y = super().forward(x)
            return F.gelu(y, approximate="tanh") if self.gelu else y
        if torch.compiler.is_compiling():
            return _onednn_linear(x, self.weight, self.bias, self.gelu)
        # eager: the product itself (a custom op's first call imports torch._dynamo)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, *_post_op(self.gelu))


def onednn_linears(model: nn.Module) -> None:
    """Compute the fp32 ``nn.Linear`` layers of ``model`` with oneDNN when no gradient is wanted, and
    with MKL for up to 2 rows on an Intel CPU. Only weights of 2**18 values or more: below that,
    oneDNN's fixed cost per call outweighs its faster product."""
    if not torch.backends.mkldnn.is_available():
        return
    mkl_rows = 2 if torch.backends.mkl.is_available() and intel_cpu() else 0
    names = [name for name, m in model.named_modules() if type(m) is nn.Linear
             and m.weight.dtype == torch.float32 and m.weight.numel() >= 2**18]
    replace_linears(model, names, lambda linear, gelu: OneDNNLinear(linear, mkl_rows=mkl_rows, gelu=gelu))


# ----------------------------------------------------------------------------------------------------
# Blocked weights (fp32 and bf16)


class HandLinear(nn.Module):
    """A float32 or bfloat16 linear layer for inference only, multiplied by the hand-written kernel
    (``torch.ops.gpt2.blocked_linear``, any number of rows): its weight reordered once into the layout
    the kernel reads (oneDNN's blocked one, ``ops.blocked``), which cannot be trained; the state dict
    holds its plain copy, made when asked for. ``gelu``: as ``OneDNNLinear``'s."""

    def __init__(self, linear: nn.Linear, *, gelu: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", ops.blocked(linear.weight), persistent=False)  # saved plain
        self.bias = linear.bias
        self.gelu = gelu

    def forward(self, x: Tensor) -> Tensor:
        x = x.contiguous()
        return torch.ops.gpt2.blocked_linear(x, [self.weight], self.bias, self.out_features, self.gelu)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = ops.unblocked([self.weight], self.out_features)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object) -> None:
        if prefix + "weight" in state_dict:
            self.weight.copy_(ops.blocked(state_dict.pop(prefix + "weight").to(self.weight.dtype)))
        super()._load_from_state_dict(state_dict, prefix, *args)


class BlockedLinear(nn.Module):
    """A float32 or bfloat16 linear layer for inference only where the hand-written kernels do not run:
    its weight reordered once into oneDNN's blocked layout (what Inductor's freezing does to the
    weights it packs), the product computed by oneDNN on it: the same products (summed in another
    order at most), faster. The blocked weight is an opaque oneDNN tensor that cannot be trained; the
    state dict holds its plain copy, made when asked for. ``gelu``: as ``OneDNNLinear``'s."""

    def __init__(self, linear: nn.Linear, *, gelu: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.blocked = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.bias = linear.bias
        self.gelu = gelu
        self.weight_bytes = linear.weight.nbytes

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.blocked, self.bias, *_post_op(self.gelu))

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.blocked.to_dense()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object) -> None:
        if prefix + "weight" in state_dict:
            weight = state_dict.pop(prefix + "weight").to(self.blocked.dtype)
            self.blocked = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        super()._load_from_state_dict(state_dict, prefix, *args)


class BlockedHead(nn.Module):
    """The tied LM head for CPU inference in float32 or bfloat16, in the hand kernel's blocked layout
    (oneDNN's: blocks of 64 rows, input-major, bfloat16's inputs in pairs), reordered block by block
    in the embedding's own memory: no second copy of the embedding, nothing held while reordering but
    one block. The last rows, short of a whole block, go to a padded block of their own. Every
    product, of any number of rows, is ``gpt2.inference.kernels``'s; the tied embedding gathers its
    rows from the blocks (``BlockedEmbedding``). The state dict holds the plain weight, made when
    asked for."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.whole = self.out_features // 64 * 64  # the rows of whole blocks
        flat, pair = weight.detach().view(-1), ops.pairs(weight.dtype)
        width = self.in_features
        for start in range(0, self.whole * width, 64 * width):
            block = flat[start : start + 64 * width]
            block.copy_(block.view(64, width // pair, pair).transpose(0, 1).flatten())
        tail = weight.new_zeros(64, width)
        tail[: self.out_features - self.whole] = weight.detach()[self.whole :]
        self.register_buffer("blocks", flat[: self.whole * width])
        self.register_buffer("tail", tail.view(64, width // pair, pair).transpose(0, 1).contiguous())

    def forward(self, x: Tensor) -> Tensor:
        pair = ops.pairs(self.blocks.dtype)
        parts = [self.blocks.view(-1, self.in_features // pair, 64, pair), self.tail[None]]
        if self.whole == self.out_features:  # no rows beyond the whole blocks
            parts.pop()
        x = x.to(self.blocks.dtype).contiguous()
        return torch.ops.gpt2.blocked_linear(x, parts, None, self.out_features, False)

    def rows(self, idx: Tensor) -> Tensor:
        """Rows ``idx`` (any shape) of the weight, (*idx.shape, in)."""
        pair = ops.pairs(self.blocks.dtype)
        blocks = self.blocks.view(-1, self.in_features // pair, 64, pair)
        inside = idx.clamp(max=self.whole - 1)
        rows = blocks[inside // 64, :, inside % 64].flatten(-2)
        past = (idx - self.whole).clamp(min=0, max=63)  # the rows of the tail (no branch: a compiled step)
        late = self.tail[:, past].movedim(0, -2).flatten(-2)
        return torch.where((idx >= self.whole)[..., None], late, rows)

    @property
    def weight(self) -> Tensor:
        """The plain weight (out, in): a copy."""
        return self.rows(torch.arange(self.out_features, device=self.blocks.device))

    def fill(self, weight: Tensor) -> None:
        """Take the values of a plain weight (out, in) into the blocks."""
        pair = ops.pairs(self.blocks.dtype)
        width = self.in_features // pair
        weight = weight.to(self.blocks.dtype)
        blocks = weight[: self.whole].view(-1, 64, width, pair).transpose(1, 2)
        self.blocks.view(-1, width, 64, pair).copy_(blocks)
        self.tail.zero_()[:, : self.out_features - self.whole].copy_(
            weight[self.whole :].view(-1, width, pair).transpose(0, 1))

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.weight

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        if prefix + "weight" in state_dict:
            self.fill(state_dict.pop(prefix + "weight"))
        elif strict:
            missing_keys.append(prefix + "weight")


class TiedEmbedding(nn.Module):
    """The token embedding tied to an LM head that holds the weight in a layout of its own (blocked,
    quantised): a token's row is the head's ``rows``."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = [head]  # a list: not a submodule, so its buffers are counted once

    def forward(self, idx: Tensor) -> Tensor:
        return self.head[0].rows(idx)


class BlockedEmbedding(TiedEmbedding):
    """The token embedding tied to a ``BlockedHead``: its rows gathered from the head's blocks; the
    state dict holds the plain weight, as ``nn.Embedding``'s."""

    @property
    def weight(self) -> Tensor:
        return self.head[0].weight

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.weight

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        if prefix + "weight" in state_dict:  # tied: the head's values
            self.head[0].fill(state_dict.pop(prefix + "weight"))
        elif strict:
            missing_keys.append(prefix + "weight")


def blocked_head(model: Transformer) -> None:
    """Replace the tied LM head and embedding of ``model`` with a ``BlockedHead`` and its
    ``BlockedEmbedding``, for inference only, where the hand kernel multiplies its dtype (and the
    vocabulary fills a block)."""
    weight = model.lm_head.weight
    precision = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(weight.dtype)
    if precision is None or not weight.is_cpu or len(weight) < 64 or not weight.is_contiguous() \
            or not ops.available(precision, weight.shape[1]):
        return
    head = BlockedHead(weight)
    model.set_submodule("lm_head", head)
    model.set_submodule("transformer.wte", BlockedEmbedding(head))


def hand_linears(model: Transformer, precision: str) -> None:
    """Replace the blocks' linear layers of ``model`` with ``HandLinear``s and its tied LM head with a
    ``BlockedHead`` (``blocked_head``), for inference only, where the hand kernels multiply
    ``precision`` (fp32 or bf16)."""
    names = [name for name, module in model.named_modules() if type(module) is nn.Linear and name != "lm_head"
             and ops.available(precision, module.in_features)]
    replace_linears(model, names, lambda linear, gelu: HandLinear(linear, gelu=gelu))
    blocked_head(model)


def blocked_linears(model: Transformer) -> None:
    """Replace the blocks' linear layers of ``model`` with oneDNN's ``BlockedLinear``s, for inference
    only (where the hand kernels do not run), in bfloat16 only where oneDNN multiplies it."""
    if not torch.backends.mkldnn.is_available() or \
            (model.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return
    names = [name for name, module in model.named_modules()
             if type(module) is nn.Linear and name != "lm_head"]
    replace_linears(model, names, lambda linear, gelu: BlockedLinear(linear, gelu=gelu))


def weight_memory(model: nn.Module) -> dict[int, int]:
    """Where the weights of ``model`` live on the CPU: address -> bytes of each parameter's and buffer's
    memory, and of each ``BlockedLinear``'s oneDNN weight."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    regions = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t.is_cpu}
    return regions | {torch.ops.mkldnn.data_ptr(m.blocked): torch.ops.mkldnn._nbytes(m.blocked)
                      for m in model.modules() if isinstance(m, BlockedLinear)}


# ----------------------------------------------------------------------------------------------------
# Attention over the KV cache by hand


class HandAttention(CausalSelfAttention):
    """A block's attention (the same layers) whose cached attention, a decode step's or a prompt's, is
    ``torch.ops.gpt2.attend``: the chunk's keys and values written into the cache, each query
    attending over the real positions before it and its own in float32, straight from a float32 or
    bfloat16 cache (no float32 copy of it, no attention over positions not yet written)."""

    def __init__(self, attention: CausalSelfAttention) -> None:
        nn.Module.__init__(self)
        self.n_head, self.dropout = attention.n_head, attention.dropout
        self.c_attn, self.c_proj = attention.c_attn, attention.c_proj
        self.resid_dropout = attention.resid_dropout
        self.train(attention.training)

    def attend(
        self, qkv: Tensor, mask: Tensor | None, cache: KVCache | None, layer: int, step: bool = False
    ) -> Tensor:
        if cache is None:  # no cache to read (scoring)
            return super().attend(qkv, mask, cache, layer, step)
        return torch.ops.gpt2.attend(qkv.contiguous(), cache.keys[layer], cache.values[layer], cache.key_mask,
                                     cache.slot)


def hand_attention(model: Transformer) -> None:
    """Replace each block's attention of ``model`` with ``HandAttention`` where the kernel takes it: on
    the CPU, for heads of 64 (every GPT-2 size's), float32 activations over a float32 or bfloat16
    cache, or bfloat16 ones over a bfloat16 cache."""
    config = model.config
    f32, bf16 = torch.float32, torch.bfloat16
    pairs = {(f32, f32), (f32, bf16), (bf16, bf16)}
    # (on the CPU attention runs in float32: ``Transformer.attention_dtype``)
    if model.device.type != "cpu" or config.head_dim != 64 or (model.dtype, model.cache_dtype) not in pairs \
            or not ops.available("attention", 64):
        return
    for i in range(config.n_layer):
        model.set_submodule(f"transformer.h.{i}.attn", HandAttention(model.transformer.h[i].attn))
