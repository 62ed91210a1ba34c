"""The GPT-2 network (Radford et al. 2019), read top to bottom: attention, MLP, block, model (its
forward pass and its fixed-shape decode step). Nothing here depends on the device or the precision:
an inference model is built from this one by ``gpt2.inference.load``, which replaces layers with
faster ones for its precision and device.

Module and parameter names follow the published checkpoints (``transformer.h.0.attn.c_attn``...),
but every projection is a plain ``nn.Linear`` (the published Conv1D weights are the transpose;
``gpt2.checkpoints`` converts).
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpt2.config import GPT2Config
from gpt2.kv_cache import KVCache
from gpt2.loss import lm_loss
from gpt2.util.errors import UserError


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # query, key, value together
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: Tensor, mask: Tensor | None, cache: KVCache | None, layer: int, step: bool = False
    ) -> Tensor:
        return self.resid_dropout(self.c_proj(self.attend(self.c_attn(x), mask, cache, layer, step)))

    def attend(
        self, qkv: Tensor, mask: Tensor | None, cache: KVCache | None, layer: int, step: bool = False
    ) -> Tensor:
        """Attention of the queries in ``qkv`` (B, T, 3 C) over their keys and values and the cache's:
        (B, T, C). ``step``: one token at the cache's slot, attending over all its positions."""
        B, T, C3 = qkv.shape
        C = C3 // 3
        # (B, T, 3 * C) -> query, key and value, each (B, heads, T, head_dim): views, no copy
        shape = (B, T, 3, self.n_head, C // self.n_head)
        q, k, v = qkv.view(shape).permute(2, 0, 3, 1, 4).unbind()
        dtype = q.dtype
        if cache is not None:
            k, v = cache.update_at_slot(layer, k, v) if step else cache.update(layer, k, v)
            q = q.to(k.dtype)  # the cache's attention dtype (KVCache.attention_dtype)
        dropout = self.dropout if self.training else 0.0
        if mask is None:  # plain causal attention over a cache that starts at this chunk
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=T > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return y.transpose(1, 2).contiguous().view(B, T, C).to(dtype)


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
        self, x: Tensor, mask: Tensor | None, cache: KVCache | None, layer: int, step: bool = False
    ) -> Tensor:
        x = x + self.attn(self.ln_1(x), mask, cache, layer, step)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """GPT-2's network: token + learned position embeddings, n_layer blocks, final LayerNorm, and an
    LM head tied to the token embedding. ``gpt2.GPT2`` adds loading, saving and generation.

    ``cache_dtype``: the dtype that generation and serving keep its KV cache in, when not the
    activations' (an inference model with quantised weights keeps a bfloat16 cache)."""

    def __init__(self, config: GPT2Config, *, cache_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.config = config
        self._cache_dtype = cache_dtype
        loading = torch.get_default_device().type == "meta"  # a checkpoint's weights will replace these
        self.transformer = nn.ModuleDict(
            dict(
                wte=_embedding(config.vocab_size, config.n_embd, loading),
                wpe=_embedding(config.n_positions, config.n_embd, loading),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied
        if loading:
            return
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

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype: the weights' too, unless they are quantised
        (``gpt2.inference.quantization``)."""
        return self.transformer.ln_f.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.transformer.ln_f.weight.device

    @property
    def cache_dtype(self) -> torch.dtype:
        """The dtype generation and serving keep the KV cache in."""
        return self._cache_dtype or self.dtype

    @property
    def attention_dtype(self) -> torch.dtype:
        """The dtype cached attention runs in: float32 on the CPU, where bfloat16 attention runs several
        times slower (a bfloat16 cache is read into float32 room a layer at a time), else the
        activations'."""
        return torch.float32 if self.device.type == "cpu" else self.dtype

    def set_dropout(self, rate: float) -> None:
        """Use dropout ``rate`` from now on (its config says so too); the weights are untouched."""
        self.config = dataclasses.replace(self.config, dropout=rate)
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = rate
            elif isinstance(module, CausalSelfAttention):
                module.dropout = rate

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
        segments: Tensor | None = None,
        last_only: bool = False,
        targets: Tensor | None = None,
    ) -> Tensor:
        """Logits (B, T, vocab) for the token ids ``idx`` (B, T); given ``targets`` (B, T), instead
        the summed cross-entropy of those not ``IGNORE``d (a float32 scalar), computed without the
        whole batch's logits (``gpt2.loss.lm_loss``).

        ``cache``: keys and values of earlier positions are read from it and this chunk's are
        appended. ``attention_mask`` (B, T): 1 for real tokens, 0 for padding (left padding for
        batches of prompts of different lengths). ``segments`` (B, T): non-decreasing numbers of the
        examples packed into each row (training on chat data): a token attends only within its own
        example and positions restart at each, so every example is computed as if it were alone.
        ``last_only``: return logits for the last position only, (B, 1, vocab), which is all that
        sampling needs.
        """
        x = self._hidden_packed(idx, segments) if segments is not None else \
            self._hidden(idx, cache, attention_mask, last_only)
        if targets is not None:
            return lm_loss(x, self.lm_head.weight, targets)
        return self.lm_head(x)

    def _hidden(self, idx: Tensor, cache: KVCache | None, attention_mask: Tensor | None,
                last_only: bool) -> Tensor:
        """The final LayerNorm's output (B, T, C), or (B, 1, C) for ``last_only``."""
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.n_positions:
            raise UserError(
                f"sequence of {start + T} tokens exceeds the context window "
                f"({self.config.n_positions}); shorten the input"
            )
        if cache is not None and start + T > cache.max_len:
            raise UserError(f"KV cache holds {cache.max_len} positions, {start + T} needed")
        real = None if attention_mask is None else attention_mask.to(device=idx.device, dtype=torch.bool)
        positions = _positions(real, B, T, cache, idx.device)
        keys_real = real if cache is None else cache.record(B, T, real)
        mask = _attention_mask(keys_real, B, T, start, idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))
        for layer, block in enumerate(self.transformer.h):
            x = block(x, mask, cache, layer)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:, :]
        return self.transformer.ln_f(x)

    def _hidden_packed(self, idx: Tensor, segments: Tensor) -> Tensor:
        if idx.shape[1] > self.config.n_positions:
            raise UserError(f"sequence of {idx.shape[1]} tokens exceeds the context window "
                            f"({self.config.n_positions}); shorten the input")
        B, T = idx.shape
        index = torch.arange(T, device=idx.device).expand(B, T)
        first = torch.ones_like(segments, dtype=torch.bool)
        first[:, 1:] = segments[:, 1:] != segments[:, :-1]
        positions = index - torch.where(first, index, 0).cummax(dim=1).values
        same = segments[:, :, None] == segments[:, None, :]
        mask = (same & torch.ones(T, T, dtype=torch.bool, device=idx.device).tril())[:, None]
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))
        for layer, block in enumerate(self.transformer.h):
            x = block(x, mask, None, layer)
        return self.transformer.ln_f(x)

    def decode_step(self, idx: Tensor, cache: KVCache) -> Tensor:
        """Logits (B, vocab) for one new token per row, ``idx`` (B, 1), written into the cache at
        its ``slot``; the cache then advances by one, as after ``forward``.

        Eager, this is ``forward`` of one position: attention reads the positions written so far.
        Compiled (``compile_decode_step``), every shape is fixed for the whole generation instead
        (attention runs over all ``max_len`` cache positions, those not yet written masked out), so
        that ``torch.compile`` compiles it once and CUDA graphs can replay it.
        """
        if self._compiled_step is None:
            return self(idx, cache=cache, last_only=True)[:, -1]
        logits = self._compiled_step(idx, cache)
        cache.advance(1)
        return logits

    _compiled_step: Callable[[Tensor, KVCache], Tensor] | None = None

    def _decode_step(self, idx: Tensor, cache: KVCache) -> Tensor:
        B = idx.shape[0]
        positions = cache.step_positions(B)
        mask = cache.step_mask(B)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))
        for layer, block in enumerate(self.transformer.h):
            x = block(x, mask, cache, layer, step=True)
        return self.lm_head(self.transformer.ln_f(x))[:, -1]

    def compile_decode_step(self, autotune: bool = False) -> None:
        """Compile the decode step with ``torch.compile`` (the prompt's forward pass stays eager). Its
        shapes are symbolic (``dynamic=True``) in batch size and cache length, so one compilation
        serves every generation. On CUDA it is replayed as a CUDA graph ("reduce-overhead"); on the
        CPU the weights become constants prepacked for its matrix kernels (freezing), so changing
        them afterwards has no effect. ``autotune``: the CPU's float products are also timed against
        Inductor's generated C++ kernels, per shape, and the fastest kept ("max-autotune": a longer
        first call)."""
        step = self._own_decode_step()
        if self.device.type == "cuda":
            self._compiled_step = torch.compile(step, mode="reduce-overhead", dynamic=True)
            return
        # A C++ wrapper calls the kernels (no Python between them), and the step's guards skip the
        # modules: 1.24x faster int4 steps at batch 1.
        options = {"freezing": True, "cpp_wrapper": True, "guard_filter_fn": _step_guards}
        if autotune:
            options |= {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
        self._compiled_step = torch.compile(step, dynamic=True, options=options)

    def _own_decode_step(self) -> Callable[[Tensor, KVCache], Tensor]:
        """``_decode_step`` bound to this model, on a code object of its own: torch.compile keeps its
        graphs per code object, at most ``recompile_limit`` (8) of them, so with a shared one the fifth
        model compiled in a process (two graphs each: one row, several) would silently run eager."""
        code = Transformer._decode_step.__code__.replace()
        return types.MethodType(types.FunctionType(code, globals(), code.co_name), self)


def _step_guards(entries: list) -> list[bool]:
    """Which guards a compiled CPU decode step keeps: none on the modules (their tensors are the step's
    inputs; each model's step has a code object of its own, so another model's never passes for it)."""
    return torch.compiler.skip_guard_on_all_nn_modules_unsafe(entries)


def _embedding(rows: int, width: int, loading: bool) -> nn.Embedding:
    """An embedding table; made empty when the model is built to be loaded (torch's own initialisation
    on the meta device imports torch._dynamo, a second and more of start-up)."""
    if loading:
        return nn.Embedding(rows, width, _weight=torch.empty(rows, width))
    return nn.Embedding(rows, width)


def _positions(real: Tensor | None, B: int, T: int, cache: KVCache | None, device: torch.device) -> Tensor:
    """Position ids (B, T) of a chunk: consecutive after the cache's, or, where ``real`` (B, T) marks
    padding, counting real tokens only (each row's from its ``next_position``)."""
    start = cache.length if cache is not None else 0
    if real is None and (cache is None or not cache.padded):
        return torch.arange(start, start + T, device=device).expand(B, T)
    if real is None:
        real = torch.ones(B, T, dtype=torch.bool, device=device)
    offset = cache.next_position[:B, None] if cache is not None else 0
    return (offset + real.long().cumsum(dim=1) - 1).clamp(min=0)


def _attention_mask(
    keys_real: Tensor | None, B: int, T: int, start: int, device: torch.device
) -> Tensor | None:
    """The boolean attention mask (B, 1, T, start + T) of a chunk of T queries after ``start`` cached
    positions; ``keys_real`` (B, start + T) marks the keys that are real tokens (None: all are).
    None means plain causal attention (a chunk that starts the cache, or a single query)."""
    if keys_real is None and (start == 0 or T == 1):
        return None
    causal = torch.ones(T, start + T, device=device, dtype=torch.bool).tril(start)
    if keys_real is None:
        return causal.expand(B, 1, T, start + T)
    mask = causal[None] & keys_real[:, None, :]
    # A padding query would see no key at all (a NaN row); let every query see itself.
    mask[:, torch.arange(T, device=device), torch.arange(start, start + T, device=device)] = True
    return mask[:, None]
