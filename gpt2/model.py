"""The GPT-2 network (Radford et al. 2019), read top to bottom: attention, MLP, block, model; then
the oneDNN products that make fp32 inference on the CPU faster (``onednn_linears``).

Module and parameter names follow the published checkpoints (``transformer.h.0.attn.c_attn``...),
but every projection is a plain ``nn.Linear`` (the published Conv1D weights are the transpose;
``gpt2.checkpoints`` converts).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpt2.config import GPT2Config
from gpt2.errors import UserError


class KVCache:
    """Keys and values of every layer, preallocated for ``max_len`` positions.

    ``length`` counts the positions written so far. ``key_mask`` (B, max_len) marks which of those
    positions hold real tokens (False for padding) and ``next_position`` (B,) is the position id the
    next real token of each row gets, so rows of different lengths can be decoded together.
    """

    def __init__(
        self,
        config: GPT2Config,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.max_len = max_len or config.n_positions
        if self.max_len > config.n_positions:
            raise UserError(
                f"KV cache of {self.max_len} positions exceeds the context window "
                f"({config.n_positions}); ask for at most {config.n_positions}"
            )
        shape = (batch_size, config.n_head, self.max_len, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.key_mask = torch.ones(batch_size, self.max_len, device=device, dtype=torch.bool)
        self.next_position = torch.zeros(batch_size, device=device, dtype=torch.long)
        self.length = 0
        self.padded = False  # True once any padding was written: attention then needs a mask


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # query, key, value together
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: Tensor, mask: Tensor | None, cache: KVCache | None, layer: int, slot: Tensor | None = None
    ) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if slot is not None:  # one token into cache position ``slot``; attend over the whole cache
            # (under autocast k and v may be in a lower precision than the cache)
            cache.keys[layer].index_copy_(2, slot, k.to(cache.keys[layer].dtype))
            cache.values[layer].index_copy_(2, slot, v.to(cache.values[layer].dtype))
            k, v = cache.keys[layer], cache.values[layer]
        elif cache is not None:
            start = cache.length
            cache.keys[layer][:, :, start : start + T] = k
            cache.values[layer][:, :, start : start + T] = v
            k = cache.keys[layer][:, :, : start + T]
            v = cache.values[layer][:, :, : start + T]
        dropout = self.dropout if self.training else 0.0
        if mask is None:  # plain causal attention over a cache that starts at this chunk
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=T > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.act = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(
        self, x: Tensor, mask: Tensor | None, cache: KVCache | None, layer: int, slot: Tensor | None = None
    ) -> Tensor:
        x = x + self.attn(self.ln_1(x), mask, cache, layer, slot)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """GPT-2's network: token + learned position embeddings, n_layer blocks, final LayerNorm, and an
    LM head tied to the token embedding. ``gpt2.GPT2`` adds loading, saving and generation."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.n_positions, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied
        self.apply(self._init_weights)
        # GPT-2 scales the weights of the layers that write into the residual stream by
        # 1/sqrt(number of residual layers) = 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters, the tied embedding counted once."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return n

    def forward(
        self,
        idx: Tensor,
        *,
        cache: KVCache | None = None,
        attention_mask: Tensor | None = None,
        last_only: bool = False,
    ) -> Tensor:
        """Logits (B, T, vocab) for the token ids ``idx`` (B, T).

        ``cache``: keys and values of earlier positions are read from it and this chunk's are
        appended. ``attention_mask`` (B, T): 1 for real tokens, 0 for padding (left padding for
        batches of prompts of different lengths). ``last_only``: return logits for the last
        position only, (B, 1, vocab), which is all that sampling needs.
        """
        T = idx.shape[1]
        start = cache.length if cache is not None else 0
        if start + T > self.config.n_positions:
            raise UserError(
                f"sequence of {start + T} tokens exceeds the context window "
                f"({self.config.n_positions}); shorten the input"
            )
        if cache is not None and start + T > cache.max_len:
            raise UserError(f"KV cache holds {cache.max_len} positions, {start + T} needed")
        positions, mask = self._positions_and_mask(idx, start, cache, attention_mask)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))
        for layer, block in enumerate(self.transformer.h):
            x = block(x, mask, cache, layer)
        if cache is not None:
            cache.length += T
        if last_only:
            x = x[:, -1:, :]
        return self.lm_head(self.transformer.ln_f(x))

    def decode_step(self, idx: Tensor, cache: KVCache, slot: Tensor) -> Tensor:
        """Logits (B, vocab) for one new token per row, ``idx`` (B, 1), written into the cache at
        position ``slot`` (a LongTensor holding ``cache.length``), which the caller then advances.

        The same network as ``forward``, but every shape is fixed for the whole generation (attention
        runs over all ``max_len`` cache positions, those not yet written masked out), so
        ``torch.compile`` compiles it once and CUDA graphs can replay it.
        """
        positions = cache.next_position[:, None]
        written = torch.arange(cache.max_len, device=idx.device) <= slot
        mask = (cache.key_mask & written)[:, None, None, :]  # (B, 1, 1, max_len)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))
        for layer, block in enumerate(self.transformer.h):
            x = block(x, mask, cache, layer, slot)
        cache.next_position += 1
        return self.lm_head(self.transformer.ln_f(x))[:, -1]

    def _positions_and_mask(
        self, idx: Tensor, start: int, cache: KVCache | None, attention_mask: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """Position ids (B, T) and, where padding is involved, a boolean attention mask
        (B, 1, T, start + T); None means plain causal attention."""
        B, T = idx.shape
        device = idx.device
        if attention_mask is None and (cache is None or not cache.padded):
            positions = torch.arange(start, start + T, device=device).expand(B, T)
            if cache is not None:
                cache.next_position += T
            mask = None
            if cache is not None and start > 0 and T > 1:  # a chunk after cached positions
                mask = torch.ones(T, start + T, device=device, dtype=torch.bool).tril(start)
                mask = mask.expand(B, 1, T, start + T)
            return positions, mask
        real = torch.ones(B, T, dtype=torch.bool, device=device)
        if attention_mask is not None:
            real = attention_mask.to(device=device, dtype=torch.bool)
        offset = cache.next_position[:, None] if cache is not None else 0
        positions = (offset + real.long().cumsum(dim=1) - 1).clamp(min=0)
        if cache is not None:
            cache.next_position += real.long().sum(dim=1)
            cache.key_mask[:, start : start + T] = real
            cache.padded = cache.padded or not bool(real.all())
            keys_real = cache.key_mask[:, : start + T]
        else:
            keys_real = real
        causal = torch.ones(T, start + T, device=device, dtype=torch.bool).tril(start)
        mask = causal[None] & keys_real[:, None, :]
        # A padding query would see no key at all (a NaN row); let every query see itself.
        mask[:, torch.arange(T, device=device), torch.arange(start, start + T, device=device)] = True
        return positions, mask[:, None]


# ----------------------------------------------------------------------------------------------------
# Faster fp32 inference on the CPU


@torch.library.custom_op("gpt2::onednn_linear", mutates_args=())
def _onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear`` computed by oneDNN on the plain (out, in) weight. As a custom op, a compiled
    graph calls it as it is rather than lowering it to the kernel PyTorch would pick."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@_onednn_linear.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


class _OneDNNLinear(nn.Linear):
    """``nn.Linear`` whose gradient-free fp32 forward runs on oneDNN. PyTorch hands fp32 CPU products
    to MKL, whose products with few rows (one per sequence when decoding) run far below memory
    bandwidth. Measured here on the 124M shape: decoding 1.4x faster at batch 1 and 1.8x at batch 8,
    perplexity evaluation 1.2x."""

    def forward(self, x: Tensor) -> Tensor:
        if x.is_cpu and x.dtype == torch.float32 and not (
            torch.is_grad_enabled() or torch.is_autocast_enabled("cpu")
        ):
            return _onednn_linear(x, self.weight, self.bias)
        return super().forward(x)


def onednn_linears(model: nn.Module) -> None:
    """Compute the fp32 ``nn.Linear`` layers of ``model`` with oneDNN when no gradient is wanted
    (weights, shapes and state dict unchanged; training is unaffected). Only weights of 2**18 values
    or more: below that, oneDNN's fixed cost per call (about 25 us here) outweighs its faster product."""
    if not torch.backends.mkldnn.is_available():
        return
    for module in model.modules():
        weight = module.weight if type(module) is nn.Linear else None
        if weight is not None and weight.dtype == torch.float32 and weight.numel() >= 2**18:
            module.__class__ = _OneDNNLinear


def plain_linears(model: nn.Module) -> None:
    """Undo ``onednn_linears``: int8 quantisation, for one, converts only plain ``nn.Linear`` layers."""
    for module in model.modules():
        if type(module) is _OneDNNLinear:
            module.__class__ = nn.Linear
