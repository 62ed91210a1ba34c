"""Hook points on GPT-2's network, named and shaped as TransformerLens names and shapes them for GPT-2.

``run_with_cache`` and ``run_with_hooks`` run a forward pass over the same parameters as
``gpt2.model.Transformer``'s, written out step by step as TransformerLens computes it: the residual
stream, each LayerNorm's scale and normalized output, queries, keys and values per head, attention
scores and pattern, ``z``, attention and MLP outputs, the MLP's activations. At each named point the
activation passes through the run's forward hooks (a hook may return a replacement: patching,
ablation), is cached if asked for, and gets the run's backward hooks, which receive its gradient.

The network's own forward pass and decode step are untouched: no hook module exists in the model, and
generating never imports this package. Dropout is not applied (TransformerLens has none).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpt2.interpretability.cache import ActivationCache
from gpt2.model import Transformer
from gpt2.util.errors import UserError
from gpt2.util.memory import release_freed_memory

# The points of each block, in the order the forward pass reaches them (TransformerLens's names).
BLOCK_POINTS = ("hook_resid_pre", "ln1.hook_scale", "ln1.hook_normalized", "attn.hook_q", "attn.hook_k",
                "attn.hook_v", "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z", "hook_attn_out",
                "hook_resid_mid", "ln2.hook_scale", "ln2.hook_normalized", "mlp.hook_pre", "mlp.hook_post",
                "hook_mlp_out", "hook_resid_post")
# Computed only when named: each head's output written into the residual stream (batch, pos, head,
# d_model), which TransformerLens has with ``use_attn_result``.
RESULT = "attn.hook_result"


class HookPoint:
    """What a hook function receives beside the activation, as TransformerLens's ``HookPoint``: the
    point's ``name``, ``layer()``, and ``ctx``, a dict a hook may keep things in for the run."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.ctx: dict = {}

    def layer(self) -> int:
        """The block this point is in (``blocks.{layer}.…``)."""
        if not self.name.startswith("blocks."):
            raise UserError(f"{self.name} is not in a block, so it has no layer")
        return int(self.name.split(".")[1])

    def __repr__(self) -> str:
        return f"HookPoint({self.name!r})"


HookFn = Callable[[Tensor, HookPoint], Tensor | None]
NameFilter = str | Sequence[str] | Callable[[str], bool] | None
Hooks = Iterable[tuple[str | Callable[[str], bool], HookFn]]


def hook_names(n_layer: int, *, result: bool = False) -> list[str]:
    """Every hook point of a network of ``n_layer`` blocks in forward order: the names of
    TransformerLens's cache for GPT-2, plus each block's ``attn.hook_result`` with ``result``."""
    names = ["hook_embed", "hook_pos_embed"]
    for layer in range(n_layer):
        for point in BLOCK_POINTS:
            names.append(f"blocks.{layer}.{point}")
            if result and point == "attn.hook_z":
                names.append(f"blocks.{layer}.{RESULT}")
    return [*names, "ln_final.hook_scale", "ln_final.hook_normalized", "unembed.hook_in", "unembed.hook_out"]


def run_with_cache(model: Transformer, input_ids: Tensor, *, names_filter: NameFilter = None,
                   fwd_hooks: Hooks = ()) -> tuple[Tensor, ActivationCache]:
    """Logits (B, T, vocab) for ``input_ids`` (B, T) or (T,), and the activations at the points that
    ``names_filter`` selects (all of TransformerLens's by default; a name, a list of names, or a
    function of a name), after ``fwd_hooks`` (as ``run_with_hooks``'s) have run on them."""
    what = "run_with_cache"
    idx = _input_ids(model, input_ids, what)
    check_plain_layers(model, what)
    n_layer = model.config.n_layer
    cached = _selected(names_filter, n_layer, "names_filter")
    points = Points(_by_name(fwd_hooks, n_layer, "fwd_hooks"), {}, cached)
    logits = hooked_forward(model, idx, points)
    return logits, ActivationCache(points.cache, n_layer)


def run_with_hooks(model: Transformer, input_ids: Tensor, *, fwd_hooks: Hooks = (),
                   bwd_hooks: Hooks = ()) -> Tensor:
    """Logits (B, T, vocab) for ``input_ids`` (B, T) or (T,), with ``fwd_hooks`` and ``bwd_hooks``:
    pairs ``(name, fn)``, ``name`` a hook point's (or a function choosing among them). A forward hook
    ``fn(activation, hook)`` (called with ``hook=`` by keyword, as TransformerLens calls it) runs as
    the pass reaches the point; what it returns (a tensor of the same shape) replaces the
    activation, None keeps it. A backward hook ``fn(grad, hook)`` runs when the logits' graph is
    differentiated (``loss.backward()`` after this returns) and receives the gradient with respect
    to that activation; what it returns replaces the gradient."""
    what = "run_with_hooks"
    idx = _input_ids(model, input_ids, what)
    check_plain_layers(model, what)
    n_layer = model.config.n_layer
    backward = _by_name(bwd_hooks, n_layer, "bwd_hooks")
    if backward and not torch.is_grad_enabled():
        raise UserError("bwd_hooks need gradients, and this runs under torch.no_grad or inference_mode; "
                        "call run_with_hooks outside them")
    return hooked_forward(model, idx, Points(_by_name(fwd_hooks, n_layer, "fwd_hooks"), backward, []))


class Points:
    """The hook points of one run: each point's forward hooks (in order), the names cached (``cache``
    fills as the pass goes), each point's backward hooks."""

    def __init__(self, forward: dict[str, list[HookFn]], backward: dict[str, list[HookFn]],
                 cached: Iterable[str]) -> None:
        self.forward, self.backward, self.cached = forward, backward, set(cached)
        self.cache: dict[str, Tensor] = {}
        self._hooks: dict[str, HookPoint] = {}

    def wants(self, name: str) -> bool:
        return name in self.forward or name in self.backward or name in self.cached

    def __call__(self, name: str, x: Tensor) -> Tensor:
        for fn in self.forward.get(name, ()):
            x = _replacement(name, x, fn(x, hook=self._hook(name)), "forward hook")
        if name in self.cached:
            self.cache[name] = x.detach()
        if name in self.backward:
            if not x.requires_grad:  # a frozen model: the gradient starts at this activation
                x = x.detach().requires_grad_()
            for fn in self.backward[name]:
                x.register_hook(_gradient_hook(name, fn, self._hook(name)))
        return x

    def _hook(self, name: str) -> HookPoint:
        return self._hooks.setdefault(name, HookPoint(name))


def _gradient_hook(name: str, fn: HookFn, hook: HookPoint) -> Callable[[Tensor], Tensor | None]:
    def on_gradient(grad: Tensor) -> Tensor | None:
        replaced = fn(grad, hook=hook)
        return None if replaced is None else _replacement(name, grad, replaced, "backward hook")

    return on_gradient


def _replacement(name: str, x: Tensor, returned: object, kind: str) -> Tensor:
    """What a hook returned, checked: a tensor of the activation's shape (None keeps the activation)."""
    if returned is None:
        return x
    if not isinstance(returned, Tensor):
        raise UserError(f"the {kind} on {name} returned an object of type {type(returned).__name__}; "
                        "return a tensor of "
                        f"shape {tuple(x.shape)}, or None to keep the activation")
    if returned.shape != x.shape:
        raise UserError(f"the {kind} on {name} returned shape {tuple(returned.shape)}, but {name} has shape "
                        f"{tuple(x.shape)}; return a tensor of that shape, or None to keep it")
    return returned.to(x.dtype)


def hooked_forward(model: Transformer, idx: Tensor, points: Points) -> Tensor:
    """GPT-2's forward pass over ``model``'s parameters, firing ``points`` at each hook point: the
    logits (B, T, vocab) of token ids ``idx`` (B, T)."""
    t = model.transformer
    B, T = idx.shape
    embed = points("hook_embed", F.embedding(idx, t.wte.weight))
    pos = F.embedding(torch.arange(T, device=idx.device), t.wpe.weight)
    x = embed + points("hook_pos_embed", pos.expand(B, T, -1).clone())
    for layer, block in enumerate(t.h):
        x = _block(block, x, f"blocks.{layer}.", model.config.n_head, points)
    if points.cache and idx.device.type == "cpu":
        # The blocks' freed scratch lies in holes between the cached tensors, where glibc keeps it
        # resident; hand it back before the logits (the run's largest tensor) so that the peak is
        # the cache and the logits alone (one trim a run: a trim per block would fault it back in).
        release_freed_memory()
    x = points("unembed.hook_in", _layer_norm(t.ln_f, x, "ln_final.", points))
    return points("unembed.hook_out", F.linear(x, model.lm_head.weight, model.lm_head.bias))


def _block(block: nn.Module, resid: Tensor, at: str, n_head: int, points: Points) -> Tensor:
    resid_pre = points(at + "hook_resid_pre", resid)
    attn_in = _layer_norm(block.ln_1, resid_pre, at + "ln1.", points)
    attn_out = points(at + "hook_attn_out", _attention(block.attn, attn_in, at + "attn.", n_head, points))
    resid_mid = points(at + "hook_resid_mid", resid_pre + attn_out)
    mlp, mlp_in = block.mlp, _layer_norm(block.ln_2, resid_mid, at + "ln2.", points)
    pre = points(at + "mlp.hook_pre", F.linear(mlp_in, mlp.c_fc.weight, mlp.c_fc.bias))
    post = points(at + "mlp.hook_post", F.gelu(pre, approximate="tanh"))
    mlp_out = points(at + "hook_mlp_out", F.linear(post, mlp.c_proj.weight, mlp.c_proj.bias))
    return points(at + "hook_resid_post", resid_mid + mlp_out)


def _layer_norm(ln: nn.LayerNorm, x: Tensor, at: str, points: Points) -> Tensor:
    """TransformerLens's LayerNorm: ``hook_scale`` (batch, pos, 1) and ``hook_normalized``, the centred
    input over its scale (before the LayerNorm's weight and bias)."""
    x = x - x.mean(-1, keepdim=True)
    scale = points(at + "hook_scale", (x.pow(2).mean(-1, keepdim=True) + ln.eps).sqrt())
    return points(at + "hook_normalized", x / scale) * ln.weight + ln.bias


def _attention(attn: nn.Module, x: Tensor, at: str, n_head: int, points: Points) -> Tensor:
    """Causal self-attention head by head: q, k, v and z (batch, pos, head, d_head), scores and pattern
    (batch, head, query, key), the scores of future keys -inf as TransformerLens has them."""
    B, T, C = x.shape
    qkv = F.linear(x, attn.c_attn.weight, attn.c_attn.bias).view(B, T, 3, n_head, C // n_head)
    q, k, v = (points(at + f"hook_{n}", qkv[:, :, i]) for i, n in enumerate("qkv"))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(C // n_head)
    future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
    scores = points(at + "hook_attn_scores", scores.masked_fill(future, float("-inf")))
    pattern = torch.softmax(scores, dim=-1)
    pattern = points(at + "hook_pattern", torch.where(pattern.isnan(), 0.0, pattern))
    z = points(at + "hook_z", torch.einsum("bhqk,bkhd->bqhd", pattern, v))
    if not points.wants(at + "hook_result"):
        return F.linear(z.reshape(B, T, C), attn.c_proj.weight, attn.c_proj.bias)
    w_o = attn.c_proj.weight.view(C, n_head, C // n_head)
    result = points(at + "hook_result", torch.einsum("bqhd,chd->bqhc", z, w_o))
    return result.sum(2) + attn.c_proj.bias


# ----------------------------------------------------------------------------------------------------
# What a run is given, checked


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _input_ids(model: Transformer, input_ids: Tensor, what: str) -> Tensor:
    """``input_ids`` as (B, T) on the model's device, checked against its vocabulary and window."""
    if not isinstance(input_ids, Tensor) or input_ids.dtype in (torch.bool, *_FLOATS):
        raise UserError(f"{what} takes token ids, a LongTensor (B, T) or (T,); got {_described(input_ids)}")
    idx = input_ids[None] if input_ids.ndim == 1 else input_ids
    if idx.ndim != 2 or idx.numel() == 0:
        raise UserError(f"{what} takes token ids of shape (B, T) or (T,), got shape {tuple(input_ids.shape)}")
    config = model.config
    if idx.shape[1] > config.n_positions:
        raise UserError(f"sequence of {idx.shape[1]} tokens exceeds the context window "
                        f"({config.n_positions}); shorten the input")
    if int(idx.min()) < 0 or int(idx.max()) >= config.vocab_size:
        raise UserError(f"token id {int(idx.max()) if int(idx.min()) >= 0 else int(idx.min())} is outside "
                        f"the model's vocabulary of {config.vocab_size}")
    return idx.to(model.device)


def _described(value: object) -> str:
    return f"a {value.dtype} tensor" if isinstance(value, Tensor) else f"a {type(value).__name__}"


def check_plain_layers(model: Transformer, what: str) -> None:
    """Refuse a model whose layers are not the network's own (an inference model's quantised or
    blocked layers, LoRA layers): their activations are not computed from plain weights."""
    kinds = {"transformer.wte": nn.Embedding, "transformer.wpe": nn.Embedding,
             "transformer.ln_f": nn.LayerNorm, "lm_head": nn.Linear}
    for i in range(model.config.n_layer):
        kinds |= {f"transformer.h.{i}.{name}": kind for name, kind in (
            ("ln_1", nn.LayerNorm), ("ln_2", nn.LayerNorm), ("attn.c_attn", nn.Linear),
            ("attn.c_proj", nn.Linear), ("mlp.c_fc", nn.Linear), ("mlp.c_proj", nn.Linear))}
    for name, kind in kinds.items():
        module = model.get_submodule(name)
        if type(module) is not kind or not module.weight.is_floating_point():
            raise UserError(
                f"{what} reads the network's own float layers, and this model's {name} is a "
                f"{type(module).__name__} (a layer built for inference by gpt2.inference.load, quantised "
                "or reordered, or an adapter's), whose activations are not available; load the model with "
                "GPT2.from_pretrained (float32 or bfloat16), merging any adapter, to hook it")


def _by_name(hooks: Hooks, n_layer: int, what: str) -> dict[str, list[HookFn]]:
    """``hooks`` (pairs of a name or a function of names, and a hook function) by hook-point name."""
    by_name: dict[str, list[HookFn]] = {}
    for pair in hooks:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and callable(pair[1])):
            raise UserError(f"{what} takes pairs (name, fn), fn(activation, hook); got {pair!r:.80}")
        for name in _selected(pair[0], n_layer, what):
            by_name.setdefault(name, []).append(pair[1])
    return by_name


def _selected(names: NameFilter, n_layer: int, what: str) -> list[str]:
    """The hook points that ``names`` selects: all (None), one name, a list of names, or those of
    TransformerLens's cache for which a function is true. ``attn.hook_result`` only by its name."""
    every = hook_names(n_layer)
    if names is None:
        return every
    if callable(names):
        return [name for name in every if names(name)]
    names = [names] if isinstance(names, str) else list(names)
    known = set(hook_names(n_layer, result=True))
    for name in names:
        if not isinstance(name, str) or name not in known:
            raise UserError(_unknown(name, known, what))
    return names


def _unknown(name: object, known: set[str], what: str) -> str:
    near = difflib.get_close_matches(str(name), sorted(known), n=3, cutoff=0.5)
    hint = f"; nearest: {', '.join(near)}" if near else "; names look like blocks.0.attn.hook_pattern"
    return f"{what}: no hook point is named {name!r}{hint}"
