"""Induction heads: proof that ``gpt2.interpretability`` finds real structure, and what its
``run_with_cache`` costs beside TransformerLens's on the same weights.

A small GPT-2 (4 layers x 64, 4 heads each, MLPs included) is trained here, with AdamW on one CPU
thread, on rows of random ids that repeat a random segment: BOS, then a segment of 4 to 16 distinct
ids of a 64-id vocabulary (its length drawn per row, so that no head can copy from a fixed distance
back), repeated to the end of the 48-token window. Such rows are predicted by an induction circuit: a
previous-token head writes the token before each position into it, and an induction head attends from
the current token to the position after its earlier occurrence and copies that token. Training stops
when the loss on the repeated half of held-out rows (``analysis.repeated_tokens``: BOS + 16 distinct
random ids + the same 16) falls to ``--target-loss`` (0.1 nats; ln 64 = 4.16 is chance), or after
``--minutes`` (3). Printed: the loss on the first copy (which nothing predicts) and on the repeated
half, before and after. Then, on a fresh batch of such rows:

- every head's induction score (``analysis.head_scores``: each second-copy token's attention on the
  token after its first occurrence) and previous-token score; the heads with an induction score of at
  least 0.4 are *named* (the best one if none is), those with a previous-token score of at least 0.2
  (chance is about 1 / the position) are the previous-token heads;
- ablation (``analysis.ablate_heads``, zero and mean): the loss on the repeated half with the named
  heads ablated, with the previous-token heads ablated, and with every set of as many other heads (100
  drawn when there are more): their mean and the largest, among all the other heads and among those
  that neither score names;
- activation patching (``analysis.patch_heads``): clean rows BOS + A + A, corrupted rows BOS + B + A
  (another first copy, so the second cannot be predicted); the metric is the mean log-probability of
  the second copy's tokens (its first left out: nothing predicts it), normalized (0 corrupted, 1
  clean); per head, and the named heads patched together against all the others together.

Then ``run_with_cache`` on the 124M shape (``GPT2Config()``, random weights after
``torch.manual_seed(0)``, saved once): ours (``GPT2.run_with_cache``) against TransformerLens's
``HookedTransformer.run_with_cache`` loaded from the same saved weights through its own GPT-2
conversion (offline: its one look-up of the hub's "gpt2" config is answered with the checkpoint's;
no weight processing, the same computation as ours), each in its own fresh process on 2 threads,
under ``torch.no_grad``, a batch of 4 x 128 random ids, the full cache (every hook point). Time: the
median of ``--repeats`` (5) runs, each guarded against the machine's other jobs as in
``generate.py`` (redone while others used > 10% of a core). Memory: "run MB" is the peak resident
memory while ``run_with_cache`` runs (the warm-up and the timed runs; VmHWM reset through
/proc/self/clear_refs) above the resident memory just before its first run: the cache and the pass's
working memory; "peak MB" the worker's whole high-water mark (imports and loading included). Also
checked: both caches hold the same names and the same mean |activation| per name (summed a million
values at a time: the check adds a few MB to the run's peak).

Targets: the repeated-half loss reaches ``--target-loss``; induction heads are found; ablating them
raises it >= 10x as much as ablating as many heads that neither score names, on average (the mean over
any other heads is printed too: a quarter of this model's heads are previous-token heads, which the
circuit needs as much); the top heads by patching are the named ones, together recovering >= 50%;
ours <= 1.0x TransformerLens's time and run memory, with the same activations.

    python benchmarks/induction_heads.py [--minutes 3] [--target-loss 0.1] [--repeats 5] [--seed 0]
    python benchmarks/induction_heads.py --smoke   # a few training steps, a 2-layer 64-wide timing shape

``--only induction`` or ``--only run_with_cache`` runs one part. ``--smoke``: 30 training steps of a 2 x 32
model on small batches, the timing on a 2-layer 64-wide model with one run per engine, no guard: every
table in well under a minute; its figures only have to exist.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import itertools
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from generate import figure, ratio, resident_peak_mb  # (standard library only: light in workers)

LENS = "TransformerLens run_with_cache"
OURS = "ours run_with_cache"


@dataclass(frozen=True)
class Settings:
    """The toy model, its data and training; the analysis; the timing (its model's ``GPT2Config``
    fields, the batch, the guard)."""

    vocab: int = 64  # random ids 0 .. vocab - 1; BOS is id ``vocab``
    window: int = 48  # tokens per training row: the model's context
    periods: tuple[int, int] = (4, 16)  # the repeated segment's length, drawn per training row
    n_layer: int = 4
    n_embd: int = 64
    n_head: int = 4
    batch: int = 32
    lr: float = 1e-3
    minutes: float = 3.0
    max_steps: int | None = None
    target_loss: float = 0.1  # on the repeated half of the held-out rows
    check_every: int = 50  # steps between looks at the held-out loss
    segment: int = 16  # the analysis rows: BOS + segment + segment
    rows: int = 32  # held-out and analysis rows
    pairs: int = 4  # clean/corrupted pairs for patching
    threshold: float = 0.4  # induction score that names a head
    previous: float = 0.2  # previous-token score that names a head (chance: about 1 / the position)
    ratio: float = 10.0  # the named heads' loss increase over the mean of as many unnamed heads', at least
    shape: dict[str, int] = field(default_factory=dict)  # the timing model: GPT-2 124M
    tokens: tuple[int, int] = (4, 128)  # the timing batch
    repeats: int = 5
    tries: int = 10
    guard: float = 0.10  # others' CPU share beyond which a timed run is redone
    threads: int = 2  # per timing worker
    timeout_s: float = 1800


FULL = Settings()
SMOKE = Settings(vocab=32, window=24, periods=(3, 8), n_layer=2, n_embd=32, n_head=2, batch=8, max_steps=30,
                 check_every=10, segment=8, rows=4, pairs=1, shape={"n_layer": 2, "n_embd": 64, "n_head": 2},
                 tokens=(2, 16), repeats=1, tries=1, guard=math.inf, threads=1, timeout_s=300)


# ----------------------------------------------------------------------------------------------------
# The toy model and its data


def periodic_rows(s: Settings, generator: Any) -> Any:
    """A training batch (batch, window): BOS, then a segment of distinct random ids, of a length drawn
    from ``s.periods`` per row, repeated to the end of the window."""
    import torch

    low, high = s.periods
    rows = []
    for _ in range(s.batch):
        n = int(torch.randint(low, high + 1, (1,), generator=generator))
        segment = torch.randperm(s.vocab, generator=generator)[:n]
        rows.append(torch.cat([torch.tensor([s.vocab]), segment.repeat(s.window // n + 1)[: s.window - 1]]))
    return torch.stack(rows)


def half_losses(logits: Any, ids: Any, segment: int) -> tuple[float, float]:
    """Mean next-token loss of rows BOS + A + A (``segment`` ids each copy) on the first copy, and on the
    repeated half: the second copy's tokens but its first (which nothing predicts)."""
    import torch.nn.functional as F

    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), ids[:, 1:], reduction="none")
    return losses[:, :segment].mean().item(), losses[:, segment + 1 : 2 * segment].mean().item()


def held_out(model: Any, ids: Any, segment: int) -> tuple[float, float]:
    import torch

    model.eval()
    with torch.no_grad():
        losses = half_losses(model(ids), ids, segment)
    model.train()
    return losses


@dataclass
class Training:
    model: Any
    steps: int
    seconds: float
    before: tuple[float, float]  # held-out loss, first copy and repeated half
    after: tuple[float, float]
    reached: bool  # the repeated-half loss reached the target


def train(s: Settings, seed: int) -> Training:
    """AdamW (lr ``s.lr``, no weight decay) on fresh periodic batches, one thread, until the held-out
    repeated-half loss reaches ``s.target_loss`` or the time (or ``s.max_steps``) is up."""
    import torch

    from gpt2 import GPT2, GPT2Config
    from gpt2.interpretability.analysis import repeated_tokens

    torch.set_num_threads(1)  # a tiny model: more threads only wait for each other
    torch.manual_seed(seed)
    model = GPT2(GPT2Config(vocab_size=s.vocab + 1, n_positions=s.window, n_embd=s.n_embd, n_layer=s.n_layer,
                            n_head=s.n_head))
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.98), weight_decay=0.0)
    data = torch.Generator().manual_seed(seed + 1)
    held = repeated_tokens(s.segment, s.vocab + 1, bos=s.vocab, seed=seed + 2, batch=s.rows)
    before = after = held_out(model, held, s.segment)
    start, step = time.perf_counter(), 0
    while time.perf_counter() - start < 60 * s.minutes and (s.max_steps is None or step < s.max_steps):
        ids = periodic_rows(s, data)
        loss = model(ids[:, :-1], targets=ids[:, 1:]) / ids[:, 1:].numel()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % s.check_every == 0:
            after = held_out(model, held, s.segment)
            print(f"  step {step}: training loss {loss.item():.3f}, held-out first copy {after[0]:.3f}, "
                  f"repeated half {after[1]:.3f} ({time.perf_counter() - start:.0f} s)", file=sys.stderr,
                  flush=True)
            if after[1] <= s.target_loss:
                break
    if step % s.check_every:
        after = held_out(model, held, s.segment)
    model.eval()
    return Training(model, step, time.perf_counter() - start, before, after, after[1] <= s.target_loss)


# ----------------------------------------------------------------------------------------------------
# The analysis


Head = tuple[int, int]


def name(heads: list[Head] | tuple[Head, ...]) -> str:
    return " ".join(f"L{layer}.H{head}" for layer, head in heads) or "-"


def head_table(first: str, values: Any) -> list[str]:
    """A layer x head table of ``values`` (n_layer, n_head), its header starting with ``first``."""
    n_layer, n_head = values.shape
    width = len(first) + 2
    lines = [f"{first:<{width}}" + "".join(f"{f'H{h}':>8}" for h in range(n_head))]
    for layer in range(n_layer):
        lines.append(f"{f'L{layer}':<{width}}" + "".join(f"{values[layer, h].item():>8.3f}"
                                                        for h in range(n_head)))
    return lines


def named_heads(scores: Any, threshold: float) -> list[Head]:
    """The heads whose score is at least ``threshold``, best first."""
    return [head for score, head in ranked(scores) if score >= threshold]


def ranked(values: Any) -> list[tuple[float, Head]]:
    """(value, (layer, head)) of every head of a (n_layer, n_head) table, the largest first."""
    n_layer, n_head = values.shape
    return sorted(((values[l, h].item(), (l, h)) for l in range(n_layer) for h in range(n_head)),
                  reverse=True)


KINDS = ("zero", "mean")
Increases = dict[str, tuple[float, float, float]]  # kind -> loss increases: the named heads, the mean of
# as many other heads, the mean of as many heads named by neither score


def ablations(model: Any, ids: Any, segment: int, named: list[Head], previous: list[Head], seed: int,
              most: int = 100) -> tuple[list[str], Increases]:
    """The ablation table's lines, and the increases the target compares. Rows: the repeated-half loss
    with nothing ablated; with the named (induction) heads ablated, zero and mean; with the
    previous-token heads; with every set of as many other heads (``most`` drawn at random when there
    are more), their mean and the largest; the same for the sets of heads named by neither score."""
    from gpt2.interpretability.analysis import ablate_heads

    config = model.config
    others = [(l, h) for l in range(config.n_layer) for h in range(config.n_head) if (l, h) not in named]
    neither = [head for head in others if head not in previous]

    def loss(heads: Any, kind: str) -> float:
        return half_losses(ablate_heads(model, ids, list(heads), kind).logits, ids, segment)[1]

    base = loss([], "zero")
    rows = [("none", "-", dict.fromkeys(KINDS, base)),
            (f"induction heads ({len(named)}, named)", name(named), {k: loss(named, k) for k in KINDS})]
    if previous:
        rows.append((f"previous-token heads ({len(previous)})", name(previous),
                     {k: loss(previous, k) for k in KINDS}))
    means: dict[str, dict[str, float]] = {}
    for key, pool in (("other", others), ("neither", neither)):
        if key == "neither" and pool == others:  # no previous-token heads: the same sets
            means.update({key: means["other"]} if "other" in means else {})
            continue
        sets = list(itertools.combinations(pool, len(named)))
        if len(sets) > most:
            sets = random.Random(seed).sample(sets, most)
        if not sets:
            continue
        results = {k: [(loss(heads, k), heads) for heads in sets] for k in KINDS}
        means[key] = {k: statistics.mean(value for value, _ in results[k]) for k in KINDS}
        largest = {k: max(results[k]) for k in KINDS}
        label = f"other {len(named)}" + (", neither kind" if key == "neither" else "")
        rows.append((f"{label}: mean of {len(sets)}", "-", means[key]))
        rows.append((f"{label}: largest", " / ".join(dict.fromkeys(name(h) for _, h in largest.values())),
                     {k: value for k, (value, _) in largest.items()}))
    nan = dict.fromkeys(KINDS, math.nan)
    increases = {k: (rows[1][2][k] - base, means.get("other", nan)[k] - base,
                     means.get("neither", nan)[k] - base) for k in KINDS}
    columns = [("ablation", 38), ("heads", 26), ("zero: loss", 12), ("zero: +", 10), ("mean: loss", 12),
               ("mean: +", 10)]
    lines = [table_line([c for c, _ in columns], columns)]
    for label, heads, losses in rows:
        cells = [label, heads]
        for k in KINDS:
            cells += [f"{losses[k]:.3f}", "-" if label == "none" else f"{losses[k] - base:+.3f}"]
        lines.append(table_line(cells, columns))
    return lines, increases


def table_line(cells: list[str], columns: list[tuple[str, int]]) -> str:
    """Cells left-aligned in the first column, right-aligned after, at least two spaces apart."""
    first, *rest = zip(cells, columns, strict=True)
    return f"{first[0]:<{first[1][1]}}" + "".join(" " * max(2, w - len(c)) + c for c, (_, w) in rest)


def patching_pair(s: Settings, seed: int) -> tuple[Any, Any]:
    """Clean BOS + A + A and corrupted BOS + B + A, A and B distinct random ids (disjoint when the
    vocabulary allows)."""
    import torch

    ids = torch.randperm(s.vocab, generator=torch.Generator().manual_seed(seed))
    a = ids[: s.segment]
    b = ids[s.segment : 2 * s.segment] if 2 * s.segment <= s.vocab else ids.roll(1)[: s.segment]
    bos = torch.tensor([s.vocab])
    return torch.cat([bos, a, a])[None], torch.cat([bos, b, a])[None]


def repeated_log_prob(segment: int, ids: Any) -> Any:
    """The patching metric: the mean log-probability of the second copy of ``ids`` (BOS + A + A; its
    first token left out) under the logits (1, T, vocab)."""

    def metric(logits: Any) -> Any:
        logp = logits[0, segment + 1 : 2 * segment].float().log_softmax(-1)
        return logp.gather(-1, ids[0, segment + 2 : 2 * segment + 1, None]).mean()

    return metric


def patching(model: Any, s: Settings, named: list[Head], seed: int) -> tuple[Any, float, float]:
    """Head patching (n_layer, n_head), the mean over ``s.pairs`` pairs; and the share recovered by
    patching the named heads together, and all the other heads together."""
    import torch

    from gpt2.interpretability.analysis import patch_heads

    config = model.config
    others = [(l, h) for l in range(config.n_layer) for h in range(config.n_head) if (l, h) not in named]
    tables, shares = [], []
    for pair in range(s.pairs):
        clean, corrupted = patching_pair(s, seed + 100 + pair)
        metric = repeated_log_prob(s.segment, clean)
        tables.append(patch_heads(model, clean, corrupted, metric))
        shares.append([patched_together(model, clean, corrupted, heads, metric) for heads in (named, others)])
    named_share, others_share = (statistics.mean(column) for column in zip(*shares, strict=True))
    return torch.stack(tables).mean(0), named_share, others_share


def patched_together(model: Any, clean: Any, corrupted: Any, heads: list[Head], metric: Any) -> float:
    """The share of ``metric`` recovered by patching ``heads`` together (their hook_z at every position)
    from the clean run into the corrupted one."""
    import torch

    from gpt2.interpretability.hooks import run_with_cache, run_with_hooks

    names = [f"blocks.{layer}.attn.hook_z" for layer in range(model.config.n_layer)]
    with torch.no_grad():
        clean_logits, cache = run_with_cache(model, clean, names_filter=names)

        def patch(z: Any, hook: Any) -> Any:
            z = z.clone()
            for layer, head in heads:
                if layer == hook.layer():
                    z[:, :, head] = cache[hook.name][:, :, head]
            return z

        low, high = metric(run_with_hooks(model, corrupted)).item(), metric(clean_logits).item()
        patched = metric(run_with_hooks(model, corrupted, fwd_hooks=[(n, patch) for n in names])).item()
    return (patched - low) / (high - low)


def induction(s: Settings, seed: int) -> list[str]:
    """Train, score, ablate and patch; print the tables; return the target lines."""
    from gpt2.interpretability.analysis import head_scores, repeated_tokens

    t = train(s, seed)
    model = t.model
    print(f"\ninduction heads: GPT-2 of {s.n_layer} layers x {s.n_embd} ({s.n_head} heads each), vocabulary "
          f"{s.vocab} + BOS, trained on rows repeating a random segment of {s.periods[0]}-{s.periods[1]} ids "
          f"to fill {s.window} tokens; {t.steps} steps of {s.batch} rows in {t.seconds:.0f} s (1 thread)")
    print(f"held-out rows BOS + {s.segment} + the same {s.segment} ({s.rows} rows): loss on the first "
          f"copy {t.before[0]:.3f} -> {t.after[0]:.3f}, on the repeated half {t.before[1]:.3f} -> "
          f"{t.after[1]:.3f} (ln {s.vocab} = {math.log(s.vocab):.3f})\n")
    fresh = repeated_tokens(s.segment, s.vocab + 1, bos=s.vocab, seed=seed + 3, batch=s.rows)
    scores = head_scores(model, fresh)
    print("\n".join(head_table("induction score", scores.induction)) + "\n")
    print("\n".join(head_table("previous-token score", scores.previous_token)) + "\n")
    found = named_heads(scores.induction, s.threshold)
    named = found or [ranked(scores.induction)[0][1]]
    previous = [head for head in named_heads(scores.previous_token, s.previous) if head not in named]
    print(f"named: {', '.join(f'{name([h])} ({scores.induction[h].item():.3f})' for h in named)} "
          + (f"(induction score >= {s.threshold})" if found else f"(no head scores {s.threshold}: the best)")
          + f"; previous-token heads (score >= {s.previous}): {name(previous)}\n")
    lines, increases = ablations(model, fresh, s.segment, named, previous, seed)
    print("\n".join(lines))
    print(f"loss on the repeated half of {s.rows} fresh rows; zero: the heads' outputs (hook_z) set to 0, "
          "mean: to their mean over the rows and positions; +: the increase over nothing ablated; other: "
          "sets of as many heads that are not named, neither kind: not previous-token heads either\n")
    table, named_share, others_share = patching(model, s, named, seed)
    print("\n".join(head_table("patching share", table)))
    print(f"share of the clean run's repeated-half log-probability recovered by patching one head's output "
          f"(every position) from BOS + A + A into BOS + B + A, mean of {s.pairs} pair(s); the named heads "
          f"together: {named_share:.3f}, the {s.n_layer * s.n_head - len(named)} other heads together: "
          f"{others_share:.3f}")
    return induction_targets(s, t, found, increases, table, named_share)


def induction_targets(s: Settings, t: Training, found: list[Head], increases: Increases, table: Any,
                      named_share: float) -> list[str]:
    def verdict(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    lines = [f"  trained: repeated-half loss {t.after[1]:.3f} <= {s.target_loss} after {t.steps} steps "
             f"({t.seconds:.0f} s) {verdict(t.reached)}",
             f"  induction heads found (score >= {s.threshold}): {name(found)} {verdict(bool(found))}"]
    for kind, (mine, other, neither) in increases.items():
        times = mine / neither if neither > 0 else math.nan if math.isnan(neither) else math.inf
        against_any = mine / other if other > 0 else math.inf
        lines.append(f"  {kind} ablation: the named heads {mine:+.3f}, as many heads named by neither score "
                     f"{neither:+.3f} on average ({times:,.1f}x >= {s.ratio:g}x; any other heads "
                     f"{other:+.3f}, {against_any:.1f}x) {verdict(times >= s.ratio)}")
    k = max(len(found), 1)
    top = [head for _, head in ranked(table)[:k]]
    ok = bool(found) and set(top) == set(found) and named_share >= 0.5
    lines.append(f"  patching: the top {k} head(s) {name(top)}, the named {name(found)}; together they "
                 f"recover {named_share:.2f} >= 0.5 {verdict(ok)}")
    return lines


# ----------------------------------------------------------------------------------------------------
# run_with_cache beside TransformerLens's (each in a worker process)


def resident_mb() -> float:
    """This process's resident memory now (VmRSS), in MiB."""
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024


def reset_peak() -> bool:
    """Reset this process's resident high-water mark to its resident memory now (Linux's clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def load_lens(directory: str) -> Any:
    """TransformerLens's ``HookedTransformer`` of the checkpoint in ``directory``, unprocessed: transformers
    reads it, TransformerLens converts it with its own GPT-2 conversion. Offline: its look-up of the
    hub's "gpt2" config, the one thing it would fetch, is answered with the checkpoint's own."""
    import warnings
    from types import SimpleNamespace

    os.environ["HF_HUB_OFFLINE"] = "1"
    import huggingface_hub.constants
    import transformers
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading

    huggingface_hub.constants.HF_HUB_OFFLINE = True
    transformers.logging.set_verbosity_error()
    hf = transformers.GPT2LMHeadModel.from_pretrained(directory)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    loading.AutoConfig = SimpleNamespace(from_pretrained=lambda name, **_: hf.config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return HookedTransformer.from_pretrained("gpt2", hf_model=hf, tokenizer=tokenizer, device="cpu",
                                                 fold_ln=False, center_writing_weights=False,
                                                 center_unembed=False, fold_value_biases=False).eval()


def worker(args: argparse.Namespace) -> None:
    """Load one engine, time its ``run_with_cache`` and print the figures as one JSON line."""
    import torch

    spec = json.loads(Path(args.spec).read_text())
    torch.set_num_threads(spec["threads"])
    torch.set_grad_enabled(False)
    if args.worker == "ours":
        from gpt2 import GPT2

        model = GPT2.from_pretrained(args.weights)
    else:
        model = load_lens(args.weights)
    gc.collect()
    ids = torch.randint(0, model.cfg.d_vocab if args.worker == "lens" else model.config.vocab_size,
                        tuple(spec["tokens"]), generator=torch.Generator().manual_seed(0))
    load_peak, loaded, resettable = resident_peak_mb(), resident_mb(), reset_peak()
    logits, cache = model.run_with_cache(ids)  # the warm-up; its figures are the check
    check = {key: mean_abs(cache[key]) for key in cache.keys()}  # noqa: SIM118 (theirs)
    check["logits"] = mean_abs(logits)
    cache_mb = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in cache.values()}.values())
    del logits, cache

    def once() -> float:
        start = time.perf_counter()
        model.run_with_cache(ids)
        return 1e3 * (time.perf_counter() - start)

    f = figure(once, spec)
    run_peak = resident_peak_mb()
    print(json.dumps({"ms": f.value, "marked": f.marked, "redone": f.redone, "loaded_mb": loaded,
                      "run_mb": run_peak - loaded if resettable else None, "cache_mb": cache_mb / 2**20,
                      "peak_mb": max(load_peak, run_peak), "check": check}), flush=True)


def mean_abs(t: Any) -> float:
    """The mean |value| of tensor ``t``, summed in float64 a million values at a time: the check adds a
    few MB to the run's peak, not a float64 copy of the logits (as ``t.abs().double().mean()`` would,
    three times their size beside the cache that the run holds)."""
    import torch

    flat = t.reshape(-1)
    return sum(c.abs().sum(dtype=torch.float64).item() for c in flat.split(1 << 20)) / flat.numel()


def make_weights(work: Path, shape: dict[str, int]) -> Path:
    """The random model of ``shape`` (124M by default), saved with a byte-level tokenizer."""
    import torch

    from gpt2 import GPT2, GPT2Config, Tokenizer

    torch.manual_seed(0)
    model = GPT2(GPT2Config(**shape), tokenizer=Tokenizer({bytes([i]): i for i in range(256)}))
    model.save_pretrained(work / "model")
    return work / "model"


def run_worker(engine: str, weights: Path, spec: Path, s: Settings) -> dict[str, Any] | str:
    """``worker`` in a fresh process: its figures, or why there are none."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", engine, "--weights", str(weights),
               "--spec", str(spec)]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=s.timeout_s,
                              env=os.environ | {"OMP_NUM_THREADS": str(s.threads)})
    except subprocess.TimeoutExpired:
        return f"worker timed out after {s.timeout_s:.0f} s"
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        print(f"--- {engine}: worker failed:\n{done.stderr[-3000:]}", file=sys.stderr)
        return f"worker failed (exit {done.returncode}; its stderr is above)"
    result = json.loads(lines[-1])
    print(f"  {engine}: {result['ms']:.0f} ms, run {result['run_mb'] or 0:.0f} MB, peak "
          f"{result['peak_mb']:.0f} MB ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    return result


def timing(s: Settings, work: Path) -> list[str]:
    """Both workers on the same saved weights; print the table; return the target lines."""
    weights = make_weights(work, s.shape)
    spec = work / "spec.json"
    spec.write_text(json.dumps({"repeats": s.repeats, "tries": s.tries, "threshold": s.guard,
                                "threads": s.threads, "tokens": s.tokens}))
    results: dict[str, dict[str, Any] | str] = {OURS: run_worker("ours", weights, spec, s)}
    if importlib.util.find_spec("transformer_lens") is None:
        results[LENS] = "transformer_lens is not importable (pip install transformer-lens)"
    else:
        results[LENS] = run_worker("lens", weights, spec, s)
    shape = "GPT-2 124M shape" if not s.shape else f"smoke shape {s.shape}"
    batch, length = s.tokens
    print(f"\nrun_with_cache: {shape}, random weights; a batch of {batch} x {length} random ids, every "
          f"hook point cached, torch.no_grad; CPU, {s.threads} thread(s), each engine in its own process; "
          f"median of {s.repeats} run(s){versions()}\n")
    columns = [("engine", 34), ("ms", 10), ("run MB", 9), ("loaded MB", 11), ("peak MB", 9), ("cache MB", 10),
               ("entries", 9), ("time vs TL", 12), ("run MB vs TL", 14)]
    print(table_line([c for c, _ in columns], columns))
    theirs = results[LENS] if isinstance(results[LENS], dict) else None
    for engine, r in results.items():
        if not isinstance(r, dict):
            print(f"{engine:<34}  n/a: {r}")
            continue
        run = "n/a" if r["run_mb"] is None else f"{r['run_mb']:.0f}"
        cells = [engine, f"{r['ms']:.1f}" + ("*" if r["marked"] else ""), run, f"{r['loaded_mb']:.0f}",
                 f"{r['peak_mb']:.0f}", f"{r['cache_mb']:.0f}", str(len(r["check"]) - 1),
                 ratio(r["ms"], theirs and theirs["ms"]), ratio(r["run_mb"], theirs and theirs["run_mb"])]
        print(table_line(cells, columns))
    redone = sum(r["redone"] for r in results.values() if isinstance(r, dict))
    guard = ("guard off (smoke): runs are never redone" if math.isinf(s.guard) else
             f"guard: {redone} timed run(s) redone because other processes used > {s.guard:.0%} of a core")
    print(f"\n{guard}; * = every try disturbed, the least disturbed kept")
    print("run MB: peak resident memory during run_with_cache (warm-up and timed runs) above the resident "
          "memory just before; loaded MB: resident after loading; peak MB: the worker's high-water mark "
          "(imports, loading: TransformerLens's goes through transformers' model); cache MB: the tensors "
          "of one cache")
    ours = results[OURS] if isinstance(results[OURS], dict) else None
    if not (ours and theirs):
        return ["  run_with_cache: n/a (a worker did not run)"]
    same = list(ours["check"]) == list(theirs["check"])
    worst = max(abs(ours["check"][k] - theirs["check"][k]) / max(abs(theirs["check"][k]), 1e-30)
                for k in theirs["check"]) if same else math.inf
    print(f"same cache: {'the same' if same else 'DIFFERENT'} names in the same order; mean |activation| per "
          f"name and of the logits within {worst:.1e} (relative)")
    lines = [f"  time: ours {ours['ms']:.1f} ms = {ours['ms'] / theirs['ms']:.2f}x TransformerLens's "
             f"{theirs['ms']:.1f} ms {'ok' if ours['ms'] <= theirs['ms'] else 'MISSED'}"]
    if ours["run_mb"] is not None and theirs["run_mb"] is not None:
        lines.append(f"  run memory: ours {ours['run_mb']:.0f} MB = {ours['run_mb'] / theirs['run_mb']:.2f}x "
                     f"TransformerLens's {theirs['run_mb']:.0f} MB "
                     f"{'ok' if ours['run_mb'] <= theirs['run_mb'] else 'MISSED'}")
    lines.append(f"  the same activations: {'ok' if worst < 1e-4 else 'MISSED'}")
    return lines


def versions() -> str:
    """torch's version, and TransformerLens's when it is installed."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    try:
        return f"; torch {torch.__version__}, transformer-lens {version('transformer-lens')}"
    except PackageNotFoundError:
        return f"; torch {torch.__version__}"


def benchmark(args: argparse.Namespace) -> None:
    s = SMOKE if args.smoke else FULL
    overrides = {key: getattr(args, key) for key in ("minutes", "target_loss", "repeats", "tries")
                 if getattr(args, key) is not None}
    s = dataclasses.replace(s, **overrides)
    with tempfile.TemporaryDirectory(prefix="induction-benchmark-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        lines = [] if args.only == "run_with_cache" else induction(s, args.seed)
        lines += [] if args.only == "induction" else timing(s, work)
    print("\ntargets: the repeated-half loss reaches the target; induction heads are found; ablating them "
          f"raises it >= {s.ratio:g}x as much as as many heads named by neither score do on average; "
          "patching's top heads are "
          "the named ones, recovering >= 50% together; run_with_cache <= 1.0x TransformerLens's time and run "
          "memory, the same activations")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="a few training steps, a tiny timing shape, 1 run")
    parser.add_argument("--minutes", type=float, help="training time at most (default 3)")
    parser.add_argument("--target-loss", type=float, help="stop training at this repeated-half loss (0.1)")
    parser.add_argument("--repeats", type=int, help="timed runs per engine, the median kept (default 5)")
    parser.add_argument("--tries", type=int, help="tries per timed run while disturbed (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="the toy model's weights and data (default 0)")
    parser.add_argument("--only", choices=["induction", "run_with_cache"], help="one part only")
    parser.add_argument("--work", help="write the timing model here (default: a temporary directory)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # in a worker process: ours or lens
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    (worker if args.worker else benchmark)(args)  # a worker process: one engine's figures


if __name__ == "__main__":
    main()
