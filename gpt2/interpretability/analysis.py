"""The standard analyses of mechanistic interpretability, as TransformerLens's tutorials compute them,
on the hook points of ``gpt2.interpretability.hooks`` (every number here comes from a hooked run of
the network itself: there is no second forward pass).

- ``logit_lens``: each block's residual stream through the final LayerNorm and the unembedding.
- ``direct_logit_attribution``: what each head, each MLP, the embeddings and the biases add to a token's
  logit (or to a difference of two logits) at one position, through the final LayerNorm's cached scale.
- ``patch_residual``, ``patch_heads``: activation patching from a clean prompt into a corrupted one (the
  residual stream by block and position, each head's output), measured by a metric of the logits
  (``logit_difference``) normalized as the tutorials do: 0 is the corrupted run, 1 the clean one.
- ``ablate_heads``: the logits and loss with heads zeroed or replaced by their mean output.
- ``head_scores``: previous-token, duplicate-token and induction scores per head; ``repeated_tokens``
  makes the sequence that induction is measured on.
- ``attention_patterns``: a block's attention patterns.

Token ids are a LongTensor (T,) or (1, T), one prompt without padding, unless a function says it takes
a batch. Layers and heads count from 0; a negative layer counts from the last. Results are float32 on
the CPU.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from gpt2.interpretability.hooks import HookPoint, Hooks, run_with_cache, run_with_hooks
from gpt2.model import Transformer
from gpt2.util.errors import UserError

Metric = Callable[[Tensor], Tensor | float]  # logits (1, T, vocab) -> one number
PATCH_ROWS = 8  # patched runs per forward pass (a batch of copies of the corrupted prompt)


# ----------------------------------------------------------------------------------------------------
# Logit lens and direct logit attribution


def logit_lens(model: Transformer, ids: Tensor) -> Tensor:
    """The logit lens: log-probabilities (n_layer + 1, T, vocab) of the next token read from each
    block's residual stream. Row ``l < n_layer`` is ``blocks.{l}.hook_resid_pre`` (what block ``l``
    reads; row 0 is the embeddings), row ``n_layer`` the last block's ``hook_resid_post`` (the model's
    own prediction), each through the whole final LayerNorm (its statistics recomputed from that
    residual, its weight and bias) and the unembedding, as TransformerLens's
    ``cache.accumulated_resid(apply_ln=True)`` times ``W_U`` plus ``b_U``."""
    idx = _one_prompt(model, ids, "logit_lens")
    n_layer = model.config.n_layer
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(n_layer)]
    names.append(f"blocks.{n_layer - 1}.hook_resid_post")
    with torch.no_grad():
        _, cache = run_with_cache(model, idx, names_filter=names)
        stack = torch.stack([cache[name][0] for name in names]).float()
        ln, head = model.transformer.ln_f, model.lm_head
        normed = F.layer_norm(stack, stack.shape[-1:], ln.weight.float(), ln.bias.float(), ln.eps)
        logits = F.linear(normed, head.weight.float(), None if head.bias is None else head.bias.float())
    return logits.log_softmax(-1).cpu()


@dataclass
class Attribution:
    """Direct logit attribution at one position: what each part of the residual stream adds to the
    logit (or logit difference) through the final LayerNorm. The parts sum to ``logit``."""

    heads: Tensor  # (n_layer, n_head): each head's output (its hook_result)
    mlps: Tensor  # (n_layer,): each MLP's output
    embed: float  # the token embedding
    pos_embed: float  # the position embedding
    biases: float  # the attention output biases, the final LayerNorm's bias and the unembedding's bias
    logit: float  # the model's logit of the token (minus the wrong token's)


def direct_logit_attribution(model: Transformer, ids: Tensor, token: int, position: int = -1, *,
                             wrong: int | None = None) -> Attribution:
    """Direct logit attribution of ``token``'s logit at ``position`` (minus ``wrong``'s, if given) to each
    head and MLP. A part ``x`` of the final residual stream adds ``(x - mean(x)) / s * (g * W_U[token])``,
    ``s`` the final LayerNorm's cached scale at that position (``ln_final.hook_scale``, the whole
    stream's), ``g`` its weight: TransformerLens's ``cache.apply_ln_to_stack(parts, layer=-1)`` (centre,
    divide by the cached scale) times ``W_U`` of a model whose LayerNorm is folded (``processed``,
    where ``g`` is 1 and ``W_U`` holds it). Heads are their ``hook_result`` (``z @ W_O`` per head);
    the LayerNorm's and the unembedding's biases add a constant, counted in ``biases``."""
    idx = _one_prompt(model, ids, "direct_logit_attribution")
    n_layer = model.config.n_layer
    position = _position(position, idx.shape[1])
    tokens, signs = [_token(model, token, "token")], [1.0]
    if wrong is not None:
        tokens, signs = [*tokens, _token(model, wrong, "wrong")], [1.0, -1.0]
    names = [f"blocks.{layer}.{point}" for layer in range(n_layer) for point in ("attn.hook_result",
                                                                                "hook_mlp_out")]
    with torch.no_grad():
        logits, cache = run_with_cache(model, idx, names_filter=[*names, "hook_embed", "hook_pos_embed",
                                                                "ln_final.hook_scale"])
        ln, head = model.transformer.ln_f, model.lm_head
        sign = torch.tensor(signs, device=idx.device)
        unembed = sign @ head.weight[tokens].float()  # W_U[token] (- W_U[wrong]), (C,)
        direction, scale = unembed * ln.weight.float(), cache["ln_final.hook_scale"][0, position].float()

        def through(x: Tensor) -> Tensor:
            x = x.float()
            return ((x - x.mean(-1, keepdim=True)) / scale) @ direction

        def per_layer(name: str) -> Tensor:
            return torch.stack([cache[name, layer][0, position] for layer in range(n_layer)])

        constant = ln.bias.float() @ unembed
        if head.bias is not None:
            constant = constant + sign @ head.bias[tokens].float()
        out_biases = torch.stack([block.attn.c_proj.bias for block in model.transformer.h])
        return Attribution(heads=through(per_layer("result")).cpu(), mlps=through(per_layer("mlp_out")).cpu(),
                           embed=through(cache["embed"][0, position]).item(),
                           pos_embed=through(cache["pos_embed"][0, position]).item(),
                           biases=float(through(out_biases).sum() + constant),
                           logit=float(sign @ logits[0, position, tokens].float()))


# ----------------------------------------------------------------------------------------------------
# Activation patching


def logit_difference(answer: int, wrong: int, position: int = -1) -> Metric:
    """The metric of TransformerLens's indirect-object tutorial: the logit of ``answer`` minus that of
    ``wrong`` at ``position`` (the last by default)."""

    def metric(logits: Tensor) -> Tensor:
        return (logits[:, position, answer] - logits[:, position, wrong]).mean()

    return metric


def patch_residual(model: Transformer, clean_ids: Tensor, corrupted_ids: Tensor, metric: Metric, *,
                   normalize: bool = True) -> Tensor:
    """Residual-stream patching, (n_layer, T): entry ``[l, p]`` is ``metric`` of the corrupted prompt's
    logits with ``blocks.{l}.hook_resid_pre`` at position ``p`` replaced by the clean prompt's, as in
    TransformerLens's tutorials. ``normalize``: (patched - corrupted) / (clean - corrupted), the share of
    the metric that the patch recovers (0: the corrupted run's value, 1: the clean run's). The prompts
    have the same number of tokens."""
    clean, corrupted = _prompt_pair(model, clean_ids, corrupted_ids)
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(model.config.n_layer)]
    with torch.no_grad():
        _, cache = run_with_cache(model, clean, names_filter=names)
    patches = [(name, (position,), cache[name][0, position]) for name in names
               for position in range(clean.shape[1])]
    values = _patched(model, clean, corrupted, patches, metric, normalize)
    return values.view(len(names), clean.shape[1])


def patch_heads(model: Transformer, clean_ids: Tensor, corrupted_ids: Tensor, metric: Metric, *,
                normalize: bool = True) -> Tensor:
    """Head patching, (n_layer, n_head): entry ``[l, h]`` is ``metric`` of the corrupted prompt's
    logits with head ``h`` of block ``l``'s output (``attn.hook_z``) at every position replaced by the
    clean prompt's, normalized as ``patch_residual``'s."""
    clean, corrupted = _prompt_pair(model, clean_ids, corrupted_ids)
    config = model.config
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(config.n_layer)]
    with torch.no_grad():
        _, cache = run_with_cache(model, clean, names_filter=names)
    patches = [(name, (slice(None), head), cache[name][0, :, head]) for name in names
               for head in range(config.n_head)]
    values = _patched(model, clean, corrupted, patches, metric, normalize)
    return values.view(config.n_layer, config.n_head)


Patch = tuple[str, tuple, Tensor]  # hook point, index into one row's activation, the value put there


def _patched(model: Transformer, clean: Tensor, corrupted: Tensor, patches: list[Patch], metric: Metric,
             normalize: bool) -> Tensor:
    """``metric`` of the corrupted prompt's run under each patch (one row of a batch each), normalized
    between the corrupted run's value (0) and the clean run's (1) when ``normalize``."""
    values = []
    with torch.no_grad():
        for start in range(0, len(patches), PATCH_ROWS):
            chunk = patches[start : start + PATCH_ROWS]
            rows = corrupted.expand(len(chunk), -1)
            hooks = [(name, _patch_rows(chunk)) for name in dict.fromkeys(name for name, _, _ in chunk)]
            logits = run_with_hooks(model, rows, fwd_hooks=hooks)
            values += [_number(metric(logits[row : row + 1])) for row in range(len(chunk))]
        values = torch.tensor(values)
        if not normalize:
            return values
        low = _number(metric(run_with_hooks(model, corrupted)))
        high = _number(metric(run_with_hooks(model, clean)))
    if abs(high - low) <= 1e-6 * max(abs(high), abs(low), 1.0):
        raise UserError(f"the metric is {high:.6g} on the clean prompt and on the corrupted one, so there is "
                        "no difference for patching to recover; choose prompts (or answers) it tells apart")
    return (values - low) / (high - low) + 0.0  # + 0.0: no -0.0


def _patch_rows(chunk: list[Patch]) -> Callable[[Tensor, HookPoint], Tensor]:
    """A forward hook putting row ``i``'s patch (if it is at this hook point) into row ``i``."""

    def hook(activation: Tensor, hook: HookPoint) -> Tensor:
        activation = activation.clone()
        for row, (name, index, value) in enumerate(chunk):
            if name == hook.name:
                activation[(row, *index)] = value
        return activation

    return hook


def _number(value: Tensor | float) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise UserError(f"the metric returned a tensor of shape {tuple(value.shape)}; it takes the "
                            "logits (1, T, vocab) and returns one number")
        return value.item()
    if not isinstance(value, (int, float)):
        raise UserError(f"the metric returned a {type(value).__name__}; it takes the logits (1, T, vocab) "
                        "and returns one number")
    return float(value)


# ----------------------------------------------------------------------------------------------------
# Ablation


@dataclass
class Ablation:
    """A run with heads ablated: its logits (B, T, vocab) and next-token loss (mean cross-entropy over
    the positions that have a next token; None for one-token prompts)."""

    logits: Tensor
    loss: float | None


def ablate_heads(model: Transformer, ids: Tensor, heads: Iterable[tuple[int, int]], kind: str = "zero", *,
                 reference: Tensor | None = None) -> Ablation:
    """The run of ``ids`` (B, T) with each head ``(layer, head)`` of ``heads`` ablated at its output
    (``attn.hook_z``, as TransformerLens's tutorials): ``kind="zero"`` sets it to 0 (the head then adds
    nothing but its block's output bias), ``"mean"`` to its mean over every row and position of
    ``reference`` (a batch of token ids; ``ids`` by default)."""
    idx = _rows(model, ids, "ablate_heads")
    if kind not in ("zero", "mean"):
        raise UserError(f"unknown ablation {kind!r}; choose zero or mean")
    chosen: dict[int, list[int]] = {}
    for pair in heads:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise UserError(f"heads are pairs (layer, head); got {pair!r:.40}")
        layer, head = check_layer(model, pair[0]), check_head(model, pair[1])
        chosen.setdefault(layer, []).append(head)
    names = {layer: f"blocks.{layer}.attn.hook_z" for layer in chosen}
    with torch.no_grad():
        means = {}
        if kind == "mean":
            ref = idx if reference is None else _rows(model, reference, "ablate_heads's reference")
            _, cache = run_with_cache(model, ref, names_filter=list(names.values()))
            means = {layer: cache[names[layer]].mean((0, 1)) for layer in chosen}  # (n_head, d_head)

        def ablate(z: Tensor, hook: HookPoint) -> Tensor:
            z, layer = z.clone(), hook.layer()
            for head in chosen[layer]:
                z[:, :, head] = means[layer][head] if kind == "mean" else 0.0
            return z

        logits = run_with_hooks(model, idx, fwd_hooks=[(name, ablate) for name in names.values()])
    loss = None
    if idx.shape[1] > 1:
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), idx[:, 1:].flatten()).item()
    return Ablation(logits=logits, loss=loss)


# ----------------------------------------------------------------------------------------------------
# Attention: patterns and the standard head scores


def attention_patterns(model: Transformer, ids: Tensor, layer: int) -> Tensor:
    """Block ``layer``'s attention patterns (n_head, T, T): query by key, each row summing to 1."""
    idx = _one_prompt(model, ids, "attention_patterns")
    name = f"blocks.{check_layer(model, layer)}.attn.hook_pattern"
    with torch.no_grad():
        _, cache = run_with_cache(model, idx, names_filter=name)
    return cache[name][0].float().cpu()


@dataclass
class HeadScores:
    """Per head (n_layer, n_head), each the mean attention of its queries on the keys that define it:

    - ``previous_token``: each query (but the first) on the token before it;
    - ``duplicate_token``: each query whose token occurred earlier, on those earlier occurrences;
    - ``induction``: each query whose token occurred earlier, on the tokens that followed those
      occurrences (on a random segment repeated: each token of the second copy on the token after its
      occurrence in the first).

    A score is NaN where no query qualifies (no token repeats)."""

    previous_token: Tensor
    duplicate_token: Tensor
    induction: Tensor


def head_scores(model: Transformer, ids: Tensor, *, fwd_hooks: Hooks = ()) -> HeadScores:
    """The previous-token, duplicate-token and induction score of every head on ``ids`` (B, T),
    averaged over the batch's queries: TransformerLens's detection patterns
    (``head_detector.get_{previous_token,duplicate_token,induction}_head_detection_pattern``), each
    head's attention on them averaged over the queries that have such a key (its ``detect_head``
    divides by every query instead), as the tutorials score heads on a repeated random sequence.
    ``fwd_hooks`` (as ``run_with_hooks``') run first: the scores are of the patterns they leave."""
    idx = _rows(model, ids, "head_scores")
    if idx.shape[1] < 2:
        raise UserError("head scores need at least 2 tokens")
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.config.n_layer)]
    with torch.no_grad():
        _, cache = run_with_cache(model, idx, names_filter=names, fwd_hooks=fwd_hooks)
    patterns = torch.stack([cache[name] for name in names]).float().cpu()  # (L, B, H, T, T)
    T = idx.shape[1]
    earlier = torch.ones(T, T, dtype=torch.bool).tril(-1)
    tokens = idx.cpu()
    duplicate = (tokens[:, :, None] == tokens[:, None, :]) & earlier  # (B, query, key)
    induction = F.pad(duplicate[..., :-1], (1, 0))  # the key after each earlier occurrence
    previous = torch.ones(T - 1, dtype=torch.bool).diag(-1)  # the key before each query
    return HeadScores(previous_token=_score(patterns, previous.expand_as(duplicate)),
                      duplicate_token=_score(patterns, duplicate), induction=_score(patterns, induction))


def _score(patterns: Tensor, keys: Tensor) -> Tensor:
    """Mean over the queries with at least one key in ``keys`` (B, T, T) of the attention on those keys."""
    queries = keys.any(-1)  # (B, T)
    mass = (patterns * keys[None, :, None]).sum(-1)  # (L, B, H, T)
    return (mass * queries[None, :, None]).sum((1, 3)) / queries.sum()


def repeated_tokens(length: int, vocab: int, *, bos: int | None = None, seed: int = 0,
                    batch: int = 1) -> Tensor:
    """The sequence that induction heads are found on (TransformerLens's tutorials): ``bos`` (if given),
    then ``length`` distinct random tokens of ``range(vocab)`` (``bos`` left out), then the same tokens
    again; (batch, 2 * length + 1), each row its own draw from ``seed``."""
    pool = vocab - (bos is not None and 0 <= bos < vocab)
    if not 1 <= length <= pool:
        raise UserError(f"the repeated segment takes 1 to {pool} distinct tokens of the vocabulary; "
                        f"got {length}")
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        segment = torch.randperm(pool, generator=generator)[:length]
        if bos is not None:
            segment = segment + (segment >= bos).long()  # skip bos
        rows.append(torch.cat([torch.tensor([bos] if bos is not None else [], dtype=torch.long),
                               segment, segment]))
    return torch.stack(rows)


# ----------------------------------------------------------------------------------------------------
# What the functions are given, checked


def check_layer(model: Transformer, layer: int) -> int:
    """``layer`` as a block index 0 to n_layer - 1 (a negative one counts from the last)."""
    n_layer = model.config.n_layer
    index = _integer(layer)
    if index is None or not -n_layer <= index < n_layer:
        raise UserError(f"layer {layer} does not exist: the model has {n_layer} layers (0 to {n_layer - 1})")
    return index % n_layer


def check_head(model: Transformer, head: int) -> int:
    """``head`` as a head index 0 to n_head - 1."""
    n_head = model.config.n_head
    index = _integer(head)
    if index is None or not 0 <= index < n_head:
        raise UserError(f"head {head} does not exist: the model has {n_head} heads per layer "
                        f"(0 to {n_head - 1})")
    return index


def _token(model: Transformer, token: int, what: str) -> int:
    vocab = model.config.vocab_size
    index = _integer(token)
    if index is None or not 0 <= index < vocab:
        raise UserError(f"{what} {token!r} is not a token id of the model's vocabulary (0 to {vocab - 1})")
    return index


def _position(position: int, length: int) -> int:
    index = _integer(position)
    if index is None or not -length <= index < length:
        raise UserError(f"position {position} is outside the prompt's {length} tokens (0 to {length - 1}, "
                        "or -1 for the last)")
    return index % length


def _integer(value: object) -> int | None:
    """``value`` as an int if it is an integer (a Python or NumPy int, a 0-d integer tensor), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _rows(model: Transformer, ids: Tensor | Sequence[int], what: str) -> Tensor:
    """``ids`` as a LongTensor (B, T) on the model's device (the hooked run checks the ids themselves)."""
    if not isinstance(ids, Tensor):
        try:
            ids = torch.tensor(ids, dtype=torch.long)
        except (TypeError, ValueError, RuntimeError):
            raise UserError(f"{what} takes token ids, a LongTensor (T,) or (B, T)") from None
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise UserError(f"{what} takes token ids, a LongTensor (T,) or (B, T); got a {ids.dtype} tensor")
    idx = ids[None] if ids.ndim == 1 else ids
    if idx.ndim != 2 or idx.numel() == 0:
        raise UserError(f"{what} takes token ids of shape (T,) or (B, T), got shape {tuple(ids.shape)}")
    return idx.long().to(model.device)


def _one_prompt(model: Transformer, ids: Tensor | Sequence[int], what: str) -> Tensor:
    """``ids`` as one prompt (1, T)."""
    idx = _rows(model, ids, what)
    if idx.shape[0] != 1:
        raise UserError(f"{what} takes one prompt, (T,) or (1, T); got a batch of {idx.shape[0]}")
    return idx


def _prompt_pair(model: Transformer, clean_ids: Tensor, corrupted_ids: Tensor) -> tuple[Tensor, Tensor]:
    """The clean and corrupted prompts, one each, of one length (patching swaps position for position)."""
    clean = _one_prompt(model, clean_ids, "patching")
    corrupted = _one_prompt(model, corrupted_ids, "patching")
    if clean.shape != corrupted.shape:
        raise UserError(f"the clean prompt has {clean.shape[1]} tokens and the corrupted one "
                        f"{corrupted.shape[1]}; patching swaps activations position for position, so give "
                        "prompts of the same number of tokens")
    return clean, corrupted
