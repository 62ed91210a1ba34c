"""The GPT-2 network (Radford et al. 2019), read top to bottom: the KV cache and its operations,
attention, MLP, block, model (its forward pass and its fixed-shape decode step); then the oneDNN
products that make fp32 and bf16 inference on the CPU faster (``onednn_linears`` and
``blocked_linears``, applied by ``gpt2.inference.load.load_for_inference``).

Module and parameter names follow the published checkpoints (``transformer.h.0.attn.c_attn``...),
but every projection is a plain ``nn.Linear`` (the published Conv1D weights are the transpose;
``gpt2.checkpoints`` converts).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import types
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpt2.config import GPT2Config
from gpt2.inference import kernels
from gpt2.loss import lm_loss
from gpt2.util.errors import UserError
from gpt2.util.memory import check_fits


class KVCache:
    """Keys and values of every layer, preallocated for ``max_len`` positions, with the operations its
    users need: the network writes a layer's keys and values and advances it; the batching engine
    moves, shifts and fills rows.

    A batch of B sequences uses the cache's first B rows (the batching engine keeps its live sequences
    first). ``length`` counts the positions written so far, ``slot`` holds it as a tensor (so that a
    decode step has the same shapes at every position, for ``torch.compile`` and CUDA graphs).
    ``key_mask`` (rows, max_len) marks which positions hold real tokens (False for padding) and
    ``next_position`` (rows,) is the position id the next real token of each row gets, so rows of
    different lengths can be decoded together. ``padded``: some padding was written, so attention
    needs the mask (a cache made with ``padded=True`` always uses it). ``attention_dtype``: the
    dtype attention runs in when the cache is held in a lower one (on the CPU: float32 over a
    bfloat16 cache, ``Transformer.attention_dtype``).
    """

    def __init__(
        self,
        config: GPT2Config,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        *,
        padded: bool = False,
        attention_dtype: torch.dtype | None = None,
    ) -> None:
        self.max_len = max_len or config.n_positions
        if self.max_len > config.n_positions:
            raise UserError(
                f"KV cache of {self.max_len} positions exceeds the context window "
                f"({config.n_positions}); ask for at most {config.n_positions}"
            )
        self.check_fits(config, batch_size, self.max_len, dtype, attention_dtype)
        shape = (batch_size, config.n_head, self.max_len, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        # A cache in a lower precision than the activations is read into one layer's room of theirs.
        self.attention_dtype = attention_dtype or dtype
        self._scratch = None if self.attention_dtype == dtype else \
            torch.empty(2, *shape, device=device, dtype=self.attention_dtype).unbind()
        self.key_mask = torch.ones(batch_size, self.max_len, device=device, dtype=torch.bool)
        self.next_position = torch.zeros(batch_size, device=device, dtype=torch.long)
        self.slot = torch.zeros(1, device=device, dtype=torch.long)
        self.length = 0
        self.always_padded = padded
        self.padded = padded
        # Attention by hand (``attend``: decoding's and prompts'): on the CPU, in float32, over a float32
        # or bfloat16 cache, for heads of 64 (every GPT-2 size's): the (activations, cache) dtypes it takes
        by_hand = self.keys[0].is_cpu and self.attention_dtype == torch.float32 and config.head_dim == 64
        f32, bf16 = torch.float32, torch.bfloat16
        pairs = {(f32, f32), (f32, bf16), (bf16, bf16)}
        self._attends = pairs if by_hand and kernels.kernel("attention", 64) else set()

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    @staticmethod
    def check_fits(config: GPT2Config, batch_size: int, max_len: int, dtype: torch.dtype,
                   attention_dtype: torch.dtype | None = None) -> None:
        """Refuse, with the estimate, a cache that would not fit in this machine's memory (its layers,
        and one layer's room in ``attention_dtype`` when that differs)."""
        layers = config.n_layer + (attention_dtype.itemsize / dtype.itemsize
                                   if attention_dtype not in (None, dtype) else 0)
        per_position = 2 * layers * config.n_embd * dtype.itemsize
        check_fits(int(batch_size * max_len * per_position),
                   f"a KV cache for {batch_size:,} sequences of {max_len:,} positions",
                   "ask for fewer sequences at once (samples, prompts or batch size)")

    # -- the network's operations ---------------------------------------------------------------------

    def record(self, batch: int, length: int, real: Tensor | None) -> Tensor | None:
        """Note a chunk of ``length`` positions for the first ``batch`` rows before it is written:
        ``real`` (batch, length) marks its real tokens (None: all real). Returns which of the
        positions up to the chunk's end hold real tokens, or None while none is padding."""
        rows = slice(0, batch)
        if real is None and not self.padded:
            self.next_position[rows] += length
            return None
        if real is None:
            real = torch.ones(batch, length, dtype=torch.bool, device=self.key_mask.device)
        self.next_position[rows] += real.long().sum(dim=1)
        self.key_mask[rows, self.length : self.length + length] = real
        self.padded = self.padded or not bool(real.all())
        return self.key_mask[rows, : self.length + length]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write a chunk's keys and values (B, heads, T, head_dim) of ``layer`` at positions
        ``length`` to ``length + T``; returns the keys and values of every position up to there."""
        B, T, end = k.shape[0], k.shape[2], self.length + k.shape[2]
        keys, values = _first_rows(self.keys[layer], B), _first_rows(self.values[layer], B)
        keys.narrow(2, self.length, T).copy_(k)
        values.narrow(2, self.length, T).copy_(v)
        return self._for_attention(keys.narrow(2, 0, end), values.narrow(2, 0, end))

    def _for_attention(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """``keys`` and ``values`` (views of the cache) in the activations' dtype: themselves, or
        copied into the scratch room (a float32 copy per layer, rather than attention in bfloat16,
        which runs several times slower on CPUs without bfloat16 instructions)."""
        if self._scratch is None:
            return keys, values
        room = [_first_rows(t, keys.shape[0]).narrow(2, 0, keys.shape[2]) for t in self._scratch]
        return room[0].copy_(keys), room[1].copy_(values)

    def update_at_slot(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write one position's keys and values (B, heads, 1, head_dim) of ``layer`` at ``slot``;
        returns the keys and values of all ``max_len`` positions (fixed shapes)."""
        B = k.shape[0]
        keys, values = _first_rows(self.keys[layer], B), _first_rows(self.values[layer], B)
        # (under autocast k and v may be in a lower precision than the cache)
        keys.index_copy_(2, self.slot, k.to(keys.dtype))
        values.index_copy_(2, self.slot, v.to(values.dtype))
        return self._for_attention(keys, values)

    def attends(self, qkv: Tensor) -> bool:
        """Whether ``attend`` takes these queries, keys and values (eager, not compiled: a compiled
        step keeps attention in its graph)."""
        return (qkv.dtype, self.dtype) in self._attends and self.length + qkv.shape[1] <= self.max_len \
            and not torch.compiler.is_compiling()

    def attend(self, layer: int, qkv: Tensor) -> Tensor:
        """A chunk's attention for ``layer`` by ``gpt2.inference.kernels``'s kernel (a decode step's, or a
        prompt's): its keys and values (in ``qkv`` (B, T, 3 C), after the queries) written from
        ``length``, each query attending over the real positions before it and its own, in float32
        straight from the cache (no float32 copy of it, no attention over the positions not yet
        written); returns (B, T, C)."""
        return kernels.attend(qkv, self.keys[layer], self.values[layer], self.key_mask, self.length)

    def step_mask(self, batch: int) -> Tensor:
        """The attention mask (batch, 1, 1, max_len) of a decode step at ``slot``: the real positions
        written so far and the step's own."""
        written = torch.arange(self.max_len, device=self.slot.device) <= self.slot
        return (_first_rows(self.key_mask, batch) & written)[:, None, None, :]

    def step_positions(self, batch: int) -> Tensor:
        """The position ids (batch, 1) of a decode step's tokens; each row's next position moves on."""
        positions = _first_rows(self.next_position, batch)
        positions += 1
        return positions[:, None] - 1

    def advance(self, n: int) -> None:
        """Count ``n`` more positions as written (both forward paths call this after a chunk)."""
        self.length += n
        self.slot.fill_(self.length)

    # -- the batching engine's operations -------------------------------------------------------------

    def reset(self) -> None:
        """Empty the cache, as new."""
        self.key_mask.fill_(True)
        self.next_position.zero_()
        self.padded = self.always_padded
        self.length = 0
        self.slot.zero_()

    def insert(self, other: KVCache, source: Tensor, first_row: int) -> None:
        """Copy rows ``source`` of ``other`` (prompts read together) into the rows from ``first_row``
        on, so that they end at this cache's ``length`` (at least ``other.length``); the positions
        before them become padding."""
        rows = slice(first_row, first_row + len(source))
        start, end = self.length - other.length, self.length
        for mine, theirs in zip((*self.keys, *self.values), (*other.keys, *other.values), strict=True):
            mine[rows, :, start:end] = theirs[source, :, : other.length]
        self.key_mask[rows, :start] = False
        self.key_mask[rows, start:end] = other.key_mask[source, : other.length]
        self.next_position[rows] = other.next_position[source]

    def read(self, row: int, start: int, end: int) -> Tensor:
        """A copy of row ``row``'s keys and values at positions ``start`` to ``end``, every layer's:
        (layers, 2, heads, end - start, head_dim), as ``restore`` takes them."""
        k0 = self.keys[0]
        out = k0.new_empty(len(self.keys), 2, k0.shape[1], end - start, k0.shape[3])
        for layer, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            out[layer, 0] = k[row, :, start:end]
            out[layer, 1] = v[row, :, start:end]
        return out

    def restore(self, length: int, real: Tensor | None, rows: Sequence[tuple[int, int, Tensor]]) -> None:
        """Make an empty cache as if its first ``length`` positions had been read: ``real`` (rows,
        length) marks their real tokens (None: all are), and each (row, start, kv) writes ``kv``
        (as ``read`` gives it) at row ``row`` from position ``start``; every real position must be
        written so."""
        for row, start, kv in rows:
            end = start + kv.shape[3]
            for layer, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
                k[row, :, start:end] = kv[layer, 0]
                v[row, :, start:end] = kv[layer, 1]
        if real is None:
            self.next_position += length
        else:
            self.key_mask[: len(real), :length] = real
            self.next_position[: len(real)] = real.long().sum(dim=1)
            self.padded = self.padded or not bool(real.all())
        self.advance(length)

    def move_rows(self, dst: list[int], src: list[int]) -> None:
        """Copy rows ``src`` into rows ``dst`` (the engine fills freed rows with live ones)."""
        to, of = torch.tensor(dst, device=self.slot.device), torch.tensor(src, device=self.slot.device)
        for t in (*self.keys, *self.values, self.key_mask, self.next_position):
            t[to] = t[of]

    def shift(self, by: int, rows: int) -> None:
        """Move the first ``rows`` rows ``by`` positions along the time axis (left when negative),
        keeping them aligned at the end; positions that open up at the start become padding."""
        old, new = self.length, self.length + by
        keep = min(old, new)
        for t in (*self.keys, *self.values):
            t[:rows, :, new - keep : new] = t[:rows, :, old - keep : old].clone()
        self.key_mask[:rows, new - keep : new] = self.key_mask[:rows, old - keep : old].clone()
        self.key_mask[:rows, : new - keep] = False
        self.length = new
        self.slot.fill_(new)


def _first_rows(t: Tensor, n: int) -> Tensor:
    """The first ``n`` rows of ``t``: ``t`` itself when it has no more (so that a compiled decode step
    writes into the cache's own tensors, not into views of them, which cost a copy per step)."""
    return t if n == t.shape[0] else t[:n]


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
        B, T, C = x.shape
        qkv = self.c_attn(x)
        if cache is not None and not self.training and cache.attends(qkv):
            return self.resid_dropout(self.c_proj(cache.attend(layer, qkv)))
        # (B, T, 3 * C) -> query, key and value, each (B, heads, T, head_dim): views, no copy
        shape = (B, T, 3, self.n_head, C // self.n_head)
        q, k, v = qkv.view(shape).permute(2, 0, 3, 1, 4).unbind()
        dtype = q.dtype
        if cache is not None:  # ``step``: one token at the cache's slot, attending over all its positions
            k, v = cache.update_at_slot(layer, k, v) if step else cache.update(layer, k, v)
            q = q.to(k.dtype)  # the cache's attention dtype (KVCache.attention_dtype)
        dropout = self.dropout if self.training else 0.0
        if mask is None:  # plain causal attention over a cache that starts at this chunk
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=T > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C).to(dtype)
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
        self, x: Tensor, mask: Tensor | None, cache: KVCache | None, layer: int, step: bool = False
    ) -> Tensor:
        x = x + self.attn(self.ln_1(x), mask, cache, layer, step)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """GPT-2's network: token + learned position embeddings, n_layer blocks, final LayerNorm, and an
    LM head tied to the token embedding. ``gpt2.GPT2`` adds loading, saving and generation."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
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
        """The activations' dtype: the weights' too, unless they are quantised (``gpt2.inference.quantization``)."""
        return self.transformer.ln_f.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.transformer.ln_f.weight.device

    # The KV cache's dtype when it is not the activations' (quantised models keep theirs in bfloat16).
    kv_cache_dtype: torch.dtype | None = None

    @property
    def cache_dtype(self) -> torch.dtype:
        """The dtype generation and serving keep the KV cache in."""
        return self.kv_cache_dtype or self.dtype

    @property
    def attention_dtype(self) -> torch.dtype:
        """The dtype cached attention runs in: float32 on the CPU, where bfloat16 attention runs 4x
        (1 row) to 8x (8 rows) slower over the 124M shape's cache (measured; a bfloat16 cache is read
        into float32 room a layer at a time), else the activations'."""
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
    """Which guards a compiled CPU decode step keeps: none on the modules (their tensors are the
    step's inputs), but for the keys that int8 layers (``gpt2.inference.quantization.Int8Linear``) find their
    weights by, which the step holds as constants: another model's step must not pass for this one's."""
    keep = torch.compiler.skip_guard_on_all_nn_modules_unsafe(entries)
    return [kept or entry.name.endswith(".key") for kept, entry in zip(keep, entries, strict=True)]


def _embedding(rows: int, width: int, loading: bool) -> nn.Embedding:
    """An embedding table; made empty when the model is built to be loaded (torch's own initialisation
    on the meta device imports torch._dynamo: 1.3 s and 70 MB)."""
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


# ----------------------------------------------------------------------------------------------------
# Faster fp32 and bf16 inference on the CPU


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


class _OneDNNLinear(nn.Linear):
    """``nn.Linear`` whose gradient-free fp32 forward runs on the faster of PyTorch's two CPU matrix
    libraries for its number of rows. PyTorch hands every fp32 CPU product to MKL, whose products with
    a few rows (one per sequence when decoding) run far below memory bandwidth except on Intel CPUs,
    and below oneDNN's on every CPU from 4 rows on. Measured on the 124M shape's weights: oneDNN 1.4x
    faster than MKL at batch 1 and 1.8x at batch 8 on an AMD EPYC; on an Intel Xeon, MKL 1.3x faster
    at 1 and 2 rows, oneDNN 1.3x at 4 and 1.6x at 8. ``mkl_rows``: products of at most this many rows
    stay on MKL (``onednn_linears`` sets it). ``gelu``: the layer is an MLP's input, whose tanh-GELU
    it computes too (oneDNN as the product's post-op: 2 ms less per layer for a 512-token prompt of
    the 124M shape), in place of the MLP's own."""

    mkl_rows = 0
    gelu = False

    def forward(self, x: Tensor) -> Tensor:
        if not x.is_cpu or x.dtype != torch.float32 or torch.is_grad_enabled() \
                or torch.is_autocast_enabled("cpu") or x.numel() <= self.mkl_rows * x.shape[-1]:
            y = super().forward(x)
            return F.gelu(y, approximate="tanh") if self.gelu else y
        if torch.compiler.is_compiling():
            return _onednn_linear(x, self.weight, self.bias, self.gelu)
        # eager: the product itself (a custom op's first call imports torch._dynamo: 1.3 s, 70 MB)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, *_post_op(self.gelu))


def intel_cpu() -> bool:
    """Whether this is an Intel CPU (whose MKL multiplies a row or two faster than oneDNN)."""
    try:
        with open("/proc/cpuinfo") as f:
            return "GenuineIntel" in f.read(4096)
    except OSError:
        return False


def onednn_linears(model: nn.Module) -> None:
    """Compute the fp32 ``nn.Linear`` layers of ``model`` with oneDNN when no gradient is wanted, and
    with MKL for up to 2 rows on an Intel CPU (weights, shapes and state dict unchanged; training is
    unaffected). Only weights of 2**18 values or more: below that, oneDNN's fixed cost per call (about
    25 us here) outweighs its faster product. Each MLP's GELU moves into its input layer's product."""
    if not torch.backends.mkldnn.is_available():
        return
    mkl_rows = 2 if torch.backends.mkl.is_available() and intel_cpu() else 0
    for module in model.modules():
        weight = module.weight if type(module) is nn.Linear else None
        if weight is not None and weight.dtype == torch.float32 and weight.numel() >= 2**18:
            module.__class__ = _OneDNNLinear
            module.mkl_rows = mkl_rows
    fuse_gelu(model, _OneDNNLinear)


def fuse_gelu(model: nn.Module, product: type[nn.Module] | tuple[type[nn.Module], ...]) -> None:
    """Move each MLP's tanh-GELU into its input layer, where that is a ``product`` (a layer with a
    ``gelu`` flag, computing it on the product's output as it is written)."""
    for mlp in model.modules():
        if isinstance(mlp, MLP) and isinstance(mlp.c_fc, product) and isinstance(mlp.act, nn.GELU) \
                and mlp.act.approximate == "tanh":
            mlp.c_fc.gelu, mlp.act = True, nn.Identity()


class _BlockedLinear(nn.Module):
    """A float32 or bfloat16 linear layer for inference only: its weight reordered once into oneDNN's
    blocked layout (what Inductor's freezing does to the weights it packs), the product computed by
    oneDNN on it. The same products (summed in another order at most), faster: measured on the 124M
    shape's weights (AMD EPYC with bfloat16 instructions), those of one token take 9.6 ms rather
    than 17.3 in bfloat16 at 1 row and 12.4 rather than 20.4 at 8 (on a plain bfloat16 weight they
    run at half the memory bandwidth); float32 decoding ran 1.07x faster at batch 1 and 1.2x at 8.
    Up to ``kernels.MAX_ROWS`` rows (decoding) are multiplied by ``gpt2.inference.kernels``'s hand-written kernel,
    which reads the same blocked weight at memory speed (1.3-1.9x oneDNN's product at 1 row, 1.15-1.3x
    at 8; ``address`` is None where it cannot run). The blocked weight is an opaque oneDNN tensor that
    cannot be trained; the state dict holds its plain copy, made when asked for. ``gelu``: as
    ``_OneDNNLinear``'s."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._block(linear.weight.detach())
        self.bias = linear.bias
        self.gelu = getattr(linear, "gelu", False)
        self.weight_bytes = linear.weight.nbytes

    def _block(self, weight: Tensor) -> None:
        self.blocked = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        self.address = kernels.blocked_weight(self.blocked, self.out_features, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        if self.address is None or x.numel() > kernels.MAX_ROWS * self.in_features \
                or torch.compiler.is_compiling():
            return torch.ops.mkldnn._linear_pointwise(x, self.blocked, self.bias, *_post_op(self.gelu))
        return kernels.product(x, self.address, self.bias, self.out_features, self.gelu)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.blocked.to_dense()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object) -> None:
        if prefix + "weight" in state_dict:
            self._block(state_dict.pop(prefix + "weight").to(self.blocked.dtype))
        super()._load_from_state_dict(state_dict, prefix, *args)


class _BlockedHead(nn.Module):
    """The tied LM head for CPU inference in float32 or bfloat16, in the hand kernel's blocked layout
    (oneDNN's: blocks of 64 rows, input-major, bfloat16's inputs in pairs), reordered block by block
    in the embedding's own memory: no second copy of the 154 MB (124M shape, fp32), nothing held while
    reordering but one block. The last rows, short of a whole block, go to a padded block of their
    own. Every product, of any number of rows, is ``gpt2.inference.kernels``'s; the tied embedding gathers its
    rows from the blocks (``_BlockedEmbedding``). Measured on the 124M shape (AMD EPYC, 2 threads): the
    fp32 head of a decoding step 1.2x faster than oneDNN's product on the plain rows (tokens 1.0-1.07x),
    and bf16 holds no second copy (77 MB). The state dict holds the plain weight, made when asked
    for."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.whole = self.out_features // 64 * 64  # the rows of whole blocks
        flat, pair = weight.detach().view(-1), self._pair(weight.dtype)
        width = self.in_features
        for start in range(0, self.whole * width, 64 * width):
            block = flat[start : start + 64 * width]
            block.copy_(block.view(64, width // pair, pair).transpose(0, 1).flatten())
        tail = weight.new_zeros(64, width)
        tail[: self.out_features - self.whole] = weight.detach()[self.whole :]
        self.register_buffer("blocks", flat[: self.whole * width])
        self.register_buffer("tail", tail.view(64, width // pair, pair).transpose(0, 1).contiguous())

    @staticmethod
    def _pair(dtype: torch.dtype) -> int:
        return 2 if dtype == torch.bfloat16 else 1

    def forward(self, x: Tensor) -> Tensor:
        parts = [(self.blocks.data_ptr(), self.whole), (self.tail.data_ptr(), self.out_features - self.whole)]
        return kernels.split_product(x.to(self.blocks.dtype), parts, self.out_features)

    def rows(self, idx: Tensor) -> Tensor:
        """Rows ``idx`` (any shape) of the weight, (*idx.shape, in)."""
        pair = self._pair(self.blocks.dtype)
        blocks = self.blocks.view(-1, self.in_features // pair, 64, pair)
        inside = idx.clamp(max=self.whole - 1)
        rows = blocks[inside // 64, :, inside % 64].flatten(-2)
        late = idx >= self.whole
        if bool(late.any()):
            rows[late] = self.tail.view(-1, 64, pair)[:, idx[late] - self.whole].transpose(0, 1).flatten(-2)
        return rows

    @property
    def weight(self) -> Tensor:
        """The plain weight (out, in): a copy."""
        return self.rows(torch.arange(self.out_features, device=self.blocks.device))

    def fill(self, weight: Tensor) -> None:
        """Take the values of a plain weight (out, in) into the blocks."""
        pair = self._pair(self.blocks.dtype)
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


class _BlockedEmbedding(TiedEmbedding):
    """The token embedding tied to a ``_BlockedHead``: its rows gathered from the head's blocks; the
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
    """Turn the tied LM head and embedding of ``model`` into a ``_BlockedHead``, for inference only,
    where ``gpt2.inference.kernels``'s kernel multiplies its dtype (and the vocabulary fills a block)."""
    weight = model.lm_head.weight
    precision = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(weight.dtype)
    if precision is None or not weight.is_cpu or len(weight) < 64 or not weight.is_contiguous() \
            or not kernels.kernel(precision, weight.shape[1]):
        return
    head = _BlockedHead(weight)
    model.lm_head, model.transformer.wte = head, _BlockedEmbedding(head)


def weight_memory(model: nn.Module) -> dict[int, int]:
    """Where the weights of ``model`` live on the CPU: address -> bytes of each parameter's and buffer's
    memory, and of each ``_BlockedLinear``'s oneDNN weight."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    regions = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t.is_cpu}
    return regions | {torch.ops.mkldnn.data_ptr(m.blocked): torch.ops.mkldnn._nbytes(m.blocked)
                      for m in model.modules() if isinstance(m, _BlockedLinear)}


def blocked_linears(model: Transformer) -> None:
    """Turn the blocks' linear layers of ``model`` into ``_BlockedLinear``s and its tied LM head into a
    ``_BlockedHead`` (``blocked_head``), for inference only."""
    if not torch.backends.mkldnn.is_available():
        return
    names = [name for name, module in model.named_modules()
             if type(module) is nn.Linear and name != "lm_head"]
    for name in names:  # by name: each plain weight is freed as soon as its blocked copy is made
        model.set_submodule(name, _BlockedLinear(model.get_submodule(name)))
    fuse_gelu(model, _BlockedLinear)
    blocked_head(model)
