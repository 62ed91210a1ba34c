"""Speculative decoding on the CPU: plain greedy decoding against prompt lookup and a draft model, ours
beside llama.cpp's prompt-lookup decoding on our GGUF export of the same weights, in the same run, at
batch 1; tokens/s and how many drafted tokens were accepted.

The model: ``--model DIR``, or the demo's (``runs/shakespeare``, which ``make demo`` trains: 4 layers x
256, a 4,096-token vocabulary, Shakespeare), or, where there is none, one trained here with the demo's
recipe (``gpt2 prepare shakespeare --vocab-size 4096``, ``gpt2 train --config configs/shakespeare.toml``)
for ``--train-minutes``. The draft model: ``--draft-model DIR``, or one distilled here from the model
(``gpt2 train --distill-from MODEL``) for ``--draft-minutes``: the ``nano`` preset's shape (2 layers x 64)
with the model's context and tokenizer, trained on the same data.

The tasks, several prompts each, all built at run time from the validation split of the prepared
Shakespeare (text the model was not trained on) and from this repository's own source; four whose
answer repeats its input, and free continuation:

- summaries: a passage + ``"\\nTL;DR:"`` (the paper's summarisation prompt);
- editing: a passage with words swapped in a few lines, then ``"The same passage, corrected:"`` and its
  first line;
- code: a function of the ``gpt2`` package, then ``"# The same function, reviewed:"`` and its ``def`` line;
- quotes: a passage, then a question asking which line follows one of its lines, the answer opened
  with a quotation mark;
- free: a character's name (``"ROMEO.\\n"``), nothing to copy.

Each prompt fills the model's context less the new tokens (``--new``, 128; at most half the context)
and one draft (llama-cpp-python drafts past the last token wanted; past the context it would fail).
The rows, per task: ours plain, ours prompt lookup (``PromptLookup``), ours draft model (``DraftModel``),
llama.cpp plain and llama.cpp prompt lookup (llama-cpp-python's ``Llama.generate`` without and with
``LlamaPromptLookupDecoding``), all greedy, ``--draft-tokens`` (7) drafted at a time, n-grams of up to
``--max-ngram`` (3) tokens looked up. Each engine runs in a worker process of its own (``--worker``),
on ``--threads`` (2) threads, fed the same token ids. Tokens/s leaves the prompt's pass out: the new
tokens after the first, over the seconds from the first new token to the last, summed over the task's
prompts; each time the median of ``--repeats`` runs. Acceptance: drafted tokens kept (ours:
``Drafter.stats``; llama.cpp's counted from its drafter's calls and the text it made, drafts past the
last token left out). Same text: the tokens equal the same engine's plain ones on every prompt (or on
how many).

Every timed run is guarded against the other jobs of a shared machine as in ``generate.py``: a run
during which other processes used more than 10% of a core is redone (up to 10 tries; then the least
disturbed is kept and the figure marked ``*``). A llama.cpp row that cannot run says why (llama-cpp-python
not installed, the export failed, its worker died).

Targets: ours with prompt lookup >= 1.8x ours plain on each input-grounded task (summaries, editing,
code, quotes) with the same text, >= 0.95x on free continuation, and >= llama.cpp's lookup decoding
in tokens/s on every task.

    python benchmarks/speculative.py [--model DIR] [--draft-model DIR] [--prompts 4] [--new 128]
        [--draft-tokens 7] [--repeats 3] [--threads 2] [--work DIR] [--smoke]

``--smoke``: the ``nano`` shape over a 512-token vocabulary trained for a few steps, a one-layer draft
model distilled for a few steps, one prompt per task, 16 new tokens, one run per figure, one thread,
no guard: every row in well under a minute; its figures only have to exist.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from generate import GGUF_TYPES, figure, ratio, use_plain_llama_buffers, versions

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL, DEMO_DATA = ROOT / "runs" / "shakespeare", ROOT / "data" / "shakespeare"
TASKS = ["summaries", "editing", "code", "quotes", "free"]
GROUNDED = TASKS[:4]  # the tasks whose answer repeats the input
OURS, LLAMA = ["plain", "lookup", "draft model"], ["plain", "lookup"]
OPENINGS = ["ROMEO.", "HAMLET.", "PORTIA.", "KING LEAR.", "OTHELLO.", "ROSALIND.", "MACBETH.", "JULIET."]
NAME_WIDTH = (12, 20)  # the task and method columns


@dataclass(frozen=True)
class Settings:
    """What is run: prompts per task, new tokens, drafting, the guard, threads, and how the models that
    are not given are trained (``gpt2 train`` options)."""

    prompts: int = 4
    new: int = 128
    draft_tokens: int = 7
    max_ngram: int = 3
    train: tuple[str, ...] = ("--time-limit", "3")  # a model made here, on a vocabulary of ``vocab``
    vocab: int = 4096
    draft_shape: tuple[tuple[str, int], ...] = (("n_layer", 2), ("n_head", 2), ("n_embd", 64))  # nano's
    distil: tuple[str, ...] = ("--time-limit", "3")
    threads: int = 2  # per engine
    repeats: int = 3
    tries: int = 10
    threshold: float = 0.10
    timeout_s: float | None = None  # per worker


FEW_STEPS = ("--max-steps", "8", "--warmup-steps", "4", "--eval-tokens", "4096")
FULL = Settings()
SMOKE = Settings(prompts=1, new=16, repeats=1, tries=1, threshold=math.inf, threads=1, timeout_s=180,
                 vocab=512, train=("--preset", "nano", *FEW_STEPS),
                 draft_shape=(("n_layer", 1), ("n_head", 1), ("n_embd", 32)), distil=FEW_STEPS)


# ----------------------------------------------------------------------------------------------------
# Workers: one engine each, every task and method, one JSON line out

@dataclass
class Generation:
    tokens: list[int]
    seconds: float  # from the first new token to the last: the prompt's pass left out
    drafts: tuple[int, int] | None = None  # (drafted, accepted); None without a drafter


Run = Callable[[list[int], int], Generation]  # prompt, new tokens


def first(tokens: Iterator[int], n: int) -> tuple[list[int], float]:
    """The first ``n`` of ``tokens``, and the seconds from the first to the last of them."""
    out: list[int] = []
    start = time.perf_counter()
    for token in tokens:
        out.append(token)
        if len(out) == 1:
            start = time.perf_counter()
        if len(out) == n:
            break
    return out, time.perf_counter() - start


def ours_methods(spec: dict[str, Any]) -> dict[str, Run]:
    """Our decode loop (``stream_tokens``) without a drafter, with ``PromptLookup`` and with
    ``DraftModel``; a run's (drafted, accepted) from the drafter's stats."""
    import torch

    from gpt2.generation.config import GenerationConfig
    from gpt2.generation.sampling import stream_tokens
    from gpt2.generation.speculative import DraftModel, PromptLookup
    from gpt2.inference.load import load_for_inference

    torch.set_num_threads(spec["threads"])
    model = load_for_inference(spec["model"], precision=spec["precision"], device="cpu")
    small = load_for_inference(spec["draft"], precision=spec["precision"], device="cpu")
    drafters = {"plain": None, "lookup": PromptLookup(spec["draft_tokens"], max_ngram=spec["max_ngram"]),
                "draft model": DraftModel(small, spec["draft_tokens"])}
    drafters["draft model"].check(model)

    def method(name: str) -> Run:
        drafter = drafters[name]

        def run(prompt: list[int], n: int) -> Generation:
            before = (drafter.stats.drafted, drafter.stats.accepted) if drafter else (0, 0)
            config = GenerationConfig(max_new_tokens=n, temperature=0)
            with torch.inference_mode():
                steps = stream_tokens(model, torch.tensor([prompt]), config, draft=drafter)
                tokens, seconds = first((int(token[0]) for token, _ in steps), n)
            if drafter is None:
                return Generation(tokens, seconds)
            return Generation(tokens, seconds, (drafter.stats.drafted - before[0],
                                                drafter.stats.accepted - before[1]))

        return run

    return {name: method(name) for name in OURS}


def llama_methods(spec: dict[str, Any], extra_buffers: bool) -> dict[str, Run]:
    """llama-cpp-python's ``Llama.generate`` (greedy), plain and with ``LlamaPromptLookupDecoding`` as
    its ``draft_model``, each its own ``Llama`` on the GGUF file; the KV cache is cleared before each
    run so that every prompt is read whole, as ours are."""
    import llama_cpp
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    if not extra_buffers:
        use_plain_llama_buffers()

    class Counted(LlamaPromptLookupDecoding):
        """The drafter, remembering each draft and the length of the text it followed."""

        def __init__(self, **options: int) -> None:
            super().__init__(**options)
            self.drafts: list[tuple[int, list[int]]] = []

        def __call__(self, input_ids: Any, /, **kwargs: Any) -> Any:
            draft = super().__call__(input_ids, **kwargs)
            self.drafts.append((len(input_ids), [int(t) for t in draft]))
            return draft

    counted = Counted(max_ngram_size=spec["max_ngram"], num_pred_tokens=spec["draft_tokens"])
    common = {"model_path": spec["gguf"], "n_ctx": spec["window"], "n_batch": 512,
              "n_threads": spec["threads"], "n_threads_batch": spec["threads"], "verbose": False}
    engines = {"plain": llama_cpp.Llama(**common), "lookup": llama_cpp.Llama(**common, draft_model=counted)}

    def method(name: str) -> Run:
        llm = engines[name]

        def run(prompt: list[int], n: int) -> Generation:
            llm.reset()
            counted.drafts = []
            steps = llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0)
            tokens, seconds = first(steps, n)
            if name == "plain":
                return Generation(tokens, seconds)
            return Generation(tokens, seconds, accepted_drafts(counted.drafts, prompt + tokens))

        return run

    return {name: method(name) for name in LLAMA}


def accepted_drafts(drafts: list[tuple[int, list[int]]], text: list[int]) -> tuple[int, int]:
    """(drafted, accepted) of drafts made after ``at`` tokens of ``text``: a drafted token counts where
    the text reaches its position; it is accepted while it and those before it equal the text's."""
    drafted = accepted = 0
    for at, draft in drafts:
        made = text[at : at + len(draft)]
        drafted += len(made)
        accepted += next((i for i, (a, b) in enumerate(zip(draft, made, strict=False)) if a != b), len(made))
    return drafted, accepted


def measure(methods: dict[str, Run], spec: dict[str, Any]) -> dict[str, Any]:
    """Every task, prompt and method: a first run (warm-up; the tokens and the drafts), then the guarded
    decode seconds. Per task and method: the tokens, the seconds summed over the prompts, drafted and
    accepted, and how the guard fared."""
    n, results = spec["new"], {}
    for task, prompts in spec["tasks"].items():
        results[task] = {name: {"tokens": [], "seconds": 0.0, "drafted": 0, "accepted": 0, "marked": False,
                                "redone": 0} for name in methods}
        for prompt in prompts:
            for name, run in methods.items():
                r, made = results[task][name], run(prompt, n)
                r["tokens"].append(made.tokens)
                r["drafted"] += made.drafts[0] if made.drafts else 0
                r["accepted"] += made.drafts[1] if made.drafts else 0
                f = figure(lambda run=run, prompt=prompt: run(prompt, n).seconds, spec)
                r["seconds"] += f.value
                r["marked"] |= f.marked
                r["redone"] += f.redone
        print(f"  {spec['engine']}: {task} done", file=sys.stderr, flush=True)
    return results


def worker(args: argparse.Namespace) -> None:
    spec = json.loads(Path(args.worker).read_text())
    if spec["engine"] == "ours":
        methods = ours_methods(spec)
    else:
        methods = llama_methods(spec, extra_buffers=not args.no_extra_buffers)
    print(json.dumps(measure(methods, spec)), flush=True)


# ----------------------------------------------------------------------------------------------------
# The parent: models, prompts, workers


def gpt2(*args: object) -> str | None:
    """Run ``gpt2 ARGS`` in a process of its own: None, or the last line it wrote when it failed."""
    done = subprocess.run([sys.executable, "-m", "gpt2", *map(str, args)], capture_output=True, text=True)
    if done.returncode == 0:
        return None
    return (done.stderr.strip().splitlines() or ["?"])[-1][:300]


def must(*args: object) -> None:
    if (failed := gpt2(*args)) is not None:
        sys.exit(f"gpt2 {' '.join(map(str, args))} failed: {failed}")


QUIET = ("--eval-interval", "0", "--sample-tokens", "0", "--checkpoint-interval", "0", "--log-interval", "0",
         "--overwrite")


def the_model(args: argparse.Namespace, settings: Settings, work: Path) -> tuple[Path, Path, str]:
    """The model, the prepared data its prompts come from, and what the model is."""
    if args.model or (not args.smoke and (DEMO_MODEL / "latest").is_file()):
        model = args.model or DEMO_MODEL
        data = args.data or (DEMO_DATA if model == DEMO_MODEL and DEMO_DATA.is_dir() else None)
        if data is None:
            data = work / "data"
            must("prepare", "shakespeare", "--tokenizer", model, "--out", data, "--overwrite")
        return model, data, str(model)
    data, model = work / "data", work / "model"
    print("  training a model with the demo's recipe", file=sys.stderr, flush=True)
    must("prepare", "shakespeare", "--vocab-size", settings.vocab, "--out", data, "--overwrite")
    must("train", "--config", ROOT / "configs" / "shakespeare.toml", "--data", data, "--out", model,
         *settings.train, *QUIET)
    return model, data, f"the demo's recipe ({' '.join(settings.train)}), trained here"


def the_draft(args: argparse.Namespace, settings: Settings, model: Path, data: Path, work: Path
              ) -> tuple[Path, str]:
    """The draft model and what it is: given, or the draft shape with the model's context and tokenizer
    distilled from the model on ``data`` (trained on the data's tokens where ``gpt2 train`` has no
    ``--distill-from``)."""
    if args.draft_model:
        return args.draft_model, str(args.draft_model)
    from gpt2 import GPT2, GPT2Config
    from gpt2.training.config import TrainConfig

    teacher = GPT2.from_pretrained(model, device="cpu")
    shape = dict(settings.draft_shape)
    config = GPT2Config.from_preset("nano", vocab_size=teacher.config.vocab_size,
                                    n_positions=teacher.config.n_positions, **shape)
    GPT2(config, tokenizer=teacher.tokenizer).save_pretrained(work / "student")
    distil = "distill_from" in {f.name for f in dataclasses.fields(TrainConfig)}
    print("  training the draft model", file=sys.stderr, flush=True)
    must("train", "--init-from", work / "student", *(["--distill-from", model] if distil else []),
         "--data", data, "--out", work / "draft", "--optimizer", "muon", "--lr", "6e-3", "--warmup-steps", 50,
         *settings.distil, *QUIET)
    how = "distilled from the model" if distil else \
        "trained on the data (this gpt2 train has no --distill-from)"
    return work / "draft", (f"{shape['n_layer']} layer(s) x {shape['n_embd']}, {how} "
                            f"({' '.join(settings.distil)}), here")


def held_out_lines(data: Path) -> list[str]:
    """The validation split's text, as lines (its documents separated by a blank line)."""
    import numpy as np

    from gpt2.data.shards import find_shards, read_shard
    from gpt2.tokenizer.bpe import Tokenizer

    tok = Tokenizer.from_pretrained(data)
    tokens = np.concatenate([read_shard(s) for s in find_shards(data, "val")]).astype(np.int64)
    cuts = [-1, *np.flatnonzero(tokens == tok.eot_token).tolist(), len(tokens)]
    lines: list[str] = []
    for a, b in itertools.pairwise(cuts):
        if b - a > 1:
            lines += [line.rstrip() for line in tok.decode(tokens[a + 1 : b].tolist()).splitlines()] + [""]
    return lines


def passages(lines: list[str], count: int, length: int = 40) -> list[list[str]]:
    """``count`` runs of ``length`` lines spread evenly over ``lines``, each starting a paragraph."""
    starts = [i for i in range(1, len(lines) - length) if not lines[i - 1] and lines[i] and lines[i + 1]]
    picked = [starts[k * len(starts) // count] for k in range(count)] if starts else []
    return [lines[s : s + length] for s in picked]


def functions(count: int, fits: Callable[[str], bool]) -> list[str]:
    """``count`` functions of the ``gpt2`` package (whole, dedented) that ``fits``, spread over it."""
    found = []
    for path in sorted((ROOT / "gpt2").rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno > 1:
                text = textwrap.dedent("\n".join(lines[node.lineno - 1 : node.end_lineno]))
                if fits(text):
                    found.append(text)
    return [found[k * len(found) // count] for k in range(min(count, len(found)))]


def swapped(lines: list[str]) -> list[str]:
    """The lines with the second and third words of every third line swapped (the edits to correct)."""
    out = []
    for i, line in enumerate(lines):
        words = line.split(" ")
        if i % 3 == 1 and len(words) >= 3:
            words[1], words[2] = words[2], words[1]
        out.append(" ".join(words))
    return out


def quote_question(lines: list[str]) -> str | None:
    """The passage, then which line follows its middle-most line of 3 words or more that is followed by
    another such line; None where no line is."""
    middle = sorted(range(len(lines) - 1), key=lambda i: abs(i - len(lines) // 2))
    j = next((i for i in middle if len(lines[i].split()) >= 3 and len(lines[i + 1].split()) >= 3), None)
    if j is None:
        return None
    return "\n".join(lines) + f'\n\nQ: Which line comes after "{lines[j].strip()}"?\nA: "'


def code_prompt(function: str) -> str:
    """A function, then the opening of its reviewed copy: its ``def`` line."""
    first = next(line for line in function.splitlines() if line.lstrip().startswith(("def ", "async def ")))
    return f"{function}\n\n# The same function, reviewed:\n{first}\n"


def grounded_prompt(task: str, lines: list[str]) -> str | None:
    """The prompt of ``task`` over a passage's lines."""
    text = "\n".join(lines)
    if task == "summaries":
        return text + "\nTL;DR:"
    if task == "editing":
        return "\n".join(swapped(lines)) + f"\n\nThe same passage, corrected:\n{lines[0]}\n"
    return quote_question(lines)


def longest(make: Callable[[int], str | None], most: int, fits: Callable[[str], bool]) -> str | None:
    """``make(n)`` for the largest n in [3, most] whose prompt fits (None: none does)."""
    for n in range(most, 2, -1):
        prompt = make(n)
        if prompt is not None and fits(prompt):
            return prompt
    return None


def build_prompts(tok: Any, data: Path, budget: int, count: int) -> dict[str, list[str]]:
    """Every task's prompts, each at most ``budget`` tokens; the passage tasks each from passages of
    their own (the first ``count`` of 4 x ``count`` that make a prompt)."""
    def fits(prompt: str) -> bool:
        return len(tok.encode(prompt)) <= budget

    tasks: dict[str, list[str]] = {}
    runs = passages(held_out_lines(data), 12 * count)
    for t, task in enumerate(["summaries", "editing", "quotes"]):
        made = (longest(lambda n, p=p, task=task: grounded_prompt(task, p[:n]), len(p), fits)
                for p in runs[t::3])
        tasks[task] = [p for p in made if p][:count]
    tasks["code"] = [code_prompt(f) for f in functions(count, lambda f: fits(code_prompt(f)))]
    tasks["free"] = [f"{name}\n" for name in OPENINGS[:count]]
    return {task: tasks[task] for task in TASKS}


@dataclass
class Engine:
    name: str  # ours, llama.cpp
    methods: list[str]
    note: str = ""  # why it did not run
    results: dict[str, Any] | None = None
    notes: list[str] = dataclasses.field(default_factory=list)


def run_worker(engine: Engine, spec: dict[str, Any], work: Path, settings: Settings, plain: bool = False
               ) -> None:
    """``engine``'s worker in a fresh process; a llama.cpp one killed by SIGILL (the AMX kernels of a
    llama-cpp-python built for another CPU) is run again with its weights in plain CPU buffers."""
    path = work / f"spec-{engine.name}.json"
    path.write_text(json.dumps(spec | {"engine": engine.name}))
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(path)]
    try:
        done = subprocess.run(command + (["--no-extra-buffers"] if plain else []), capture_output=True,
                              text=True, timeout=settings.timeout_s,
                              env=os.environ | {"OMP_NUM_THREADS": str(settings.threads)})
    except subprocess.TimeoutExpired:
        engine.note = f"worker timed out after {settings.timeout_s:.0f} s"
        return
    if done.returncode == -signal.SIGILL and engine.name == "llama.cpp" and not plain:
        engine.notes.append("killed by SIGILL with llama.cpp's default weight buffers; measured with "
                            "use_extra_bufts=False (no AMX, no repacked weights)")
        return run_worker(engine, spec, work, settings, plain=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        engine.note = f"worker failed (exit {done.returncode}; its stderr is above)"
        print(f"--- {engine.name}: worker failed:\n{done.stderr[-3000:]}", file=sys.stderr)
        return
    engine.results = json.loads(lines[-1])


# ----------------------------------------------------------------------------------------------------
# The report

COLUMNS = [("task", NAME_WIDTH[0]), ("method", NAME_WIDTH[1]), ("tok/s", 9), ("speed-up", 10),
           ("vs ours plain", 15), ("acceptance", 12), ("same text", 11)]


def rate(r: dict[str, Any], new: int) -> float | None:
    """Decode tokens/s over a task's prompts (the prompt's pass and its token left out)."""
    return len(r["tokens"]) * (new - 1) / r["seconds"] if r["seconds"] > 0 else None


def same_text(r: dict[str, Any], plain: dict[str, Any]) -> str:
    same = sum(a == b for a, b in zip(r["tokens"], plain["tokens"], strict=True))
    return "yes" if same == len(r["tokens"]) else f"{same}/{len(r['tokens'])}"


def row_cells(task: str, engine: Engine, method: str, ours_plain: float | None, new: int) -> list[str]:
    r, plain = engine.results[task][method], engine.results[task]["plain"]
    value, own = rate(r, new), rate(plain, new)
    acceptance = f"{r['accepted'] / r['drafted']:.0%}" if r["drafted"] else "-"
    return [f"{value:.1f}" + ("*" if r["marked"] else "") if value else "n/a",
            ratio(value, own) if method != "plain" else "", ratio(value, ours_plain),
            acceptance if method != "plain" else "", same_text(r, plain) if method != "plain" else "-"]


def table(engines: list[Engine], tasks: list[str], new: int) -> list[str]:
    def line(cells: list[str]) -> str:
        widths = [w for _, w in COLUMNS]
        return "".join(f"{c:<{w}}" if i < 2 else f"{c:>{w}}"
                       for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    lines = [line([name for name, _ in COLUMNS])]
    lines.append("-" * len(lines[0]))
    for task in tasks:
        ours = engines[0].results and rate(engines[0].results[task]["plain"], new)
        for engine in engines:
            for method in engine.methods:
                name = [task, f"{engine.name} {method}"]
                if engine.results is None:
                    lines.append(f"{task:<{NAME_WIDTH[0]}}{name[1]:<{NAME_WIDTH[1]}}  n/a: {engine.note}")
                else:
                    lines.append(line(name + row_cells(task, engine, method, ours, new)))
    return lines


def targets(engines: list[Engine], tasks: list[str], new: int) -> list[str]:
    """Ours with prompt lookup against the targets of the module docstring, task by task."""
    ours, llama = engines[0].results, engines[1].results
    if ours is None:
        return ["  ours did not run"]
    lines = []
    for task in tasks:
        lookup, plain = rate(ours[task]["lookup"], new), rate(ours[task]["plain"], new)
        goal = 1.8 if task in GROUNDED else 0.95
        met = lookup is not None and plain is not None and lookup >= goal * plain
        same = same_text(ours[task]["lookup"], ours[task]["plain"]) == "yes"
        checks = [f"{ratio(lookup, plain)} plain (>= {goal}x) {'ok' if met else 'MISSED'}",
                  f"same text {'ok' if same else 'MISSED'}"]
        theirs = llama and rate(llama[task]["lookup"], new)
        if theirs:
            met = (lookup or 0) >= theirs
            checks.append(f"{ratio(lookup, theirs)} llama.cpp lookup {'ok' if met else 'MISSED'}")
        lines.append(f"  {task}: ours lookup " + "; ".join(checks))
    return lines


def report(engines: list[Engine], spec: dict[str, Any], prompts: dict[str, list[str]], about: dict[str, str],
           settings: Settings) -> None:
    import torch

    tasks = [t for t in TASKS if spec["tasks"][t]]
    new = spec["new"]
    print(f"\nmodel: {about['model']}; draft model: {about['draft']}")
    gguf = GGUF_TYPES[spec["precision"]].upper()
    print(f"{spec['precision']} (llama.cpp {gguf} from gpt2 export), greedy, "
          f"batch 1, {settings.threads} thread(s) per engine, each in its own process; {new} new tokens, "
          f"{spec['draft_tokens']} drafted at a time, n-grams up to {spec['max_ngram']}; median of "
          f"{settings.repeats} run(s) per time; torch {torch.__version__}{versions()}")
    for task in tasks:
        lengths = sorted({len(p) for p in spec["tasks"][task]})
        span = f"{lengths[0]}" + (f"-{lengths[-1]}" if len(lengths) > 1 else "")
        print(f"  {task}: {len(spec['tasks'][task])} prompt(s) of {span} tokens, e.g. "
              f"{prompts[task][0][-60:]!r}")
    print()
    print("\n".join(table(engines, tasks, new)))
    redone = sum(r["redone"] for e in engines if e.results for t in e.results.values() for r in t.values())
    print("\n" + ("guard off (smoke): runs are never redone" if math.isinf(settings.threshold) else
                  f"guard: {redone} timed run(s) redone because other processes used > "
                  f"{settings.threshold:.0%} of a core; * = every try disturbed, the least disturbed kept"))
    print("tok/s: decode tokens/s, the prompt's pass left out; speed-up: against the same engine's plain "
          "decoding; acceptance: drafted tokens kept; same text: tokens equal to the same engine's plain "
          "ones on every prompt (or on how many)")
    ours, llama = engines[0].results, engines[1].results
    if ours and llama:
        same = [a == b for t in tasks for a, b in zip(ours[t]["plain"]["tokens"], llama[t]["plain"]["tokens"],
                                                      strict=True)]
        print(f"llama.cpp plain = ours plain (the same greedy tokens) on {sum(same)} of {len(same)} prompts")
    for engine in engines:
        for note in engine.notes:
            print(f"note: {engine.name}: {note}")
    print("targets: ours lookup >= 1.8x ours plain on summaries, editing, code and quotes with the same "
          "text, >= 0.95x on free continuation, >= llama.cpp's lookup decoding")
    print("\n".join(targets(engines, tasks, new)))


def benchmark(args: argparse.Namespace) -> None:
    """Models, prompts and the GGUF export first; then each engine's worker; then the report."""
    from gpt2 import GPT2

    settings = SMOKE if args.smoke else FULL
    chosen = {k: getattr(args, k) for k in ("prompts", "new", "draft_tokens", "max_ngram", "repeats", "tries",
                                            "threads") if getattr(args, k)}
    settings = dataclasses.replace(settings, **chosen)
    if args.train_minutes:
        settings = dataclasses.replace(settings, train=("--time-limit", str(args.train_minutes)))
    if args.draft_minutes:
        settings = dataclasses.replace(settings, distil=("--time-limit", str(args.draft_minutes)))
    with tempfile.TemporaryDirectory(prefix="speculative-benchmark-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        model, data, about_model = the_model(args, settings, work)
        draft, about_draft = the_draft(args, settings, model, data, work)
        target = GPT2.from_pretrained(model, device="cpu")
        window, tok = target.config.n_positions, target.tokenizer
        new = min(settings.new, window // 2)
        prompts = build_prompts(tok, data, min(window - new - settings.draft_tokens, 512), settings.prompts)
        spec = dataclasses.asdict(settings) | {
            "model": str(model), "draft": str(draft), "precision": args.precision, "window": window,
            "new": new, "tasks": {t: [tok.encode(p) for p in ps] for t, ps in prompts.items()},
            "gguf": str(work / "model.gguf")}
        engines = [Engine("ours", OURS), Engine("llama.cpp", LLAMA)]
        if importlib.util.find_spec("llama_cpp") is None:
            engines[1].note = "llama_cpp is not importable (pip install llama-cpp-python)"
        elif failed := gpt2("export", "--format", "gguf", "--model", model, "--out", spec["gguf"],
                            "--type", GGUF_TYPES[args.precision], "--overwrite"):
            engines[1].note = f"gpt2 export --format gguf failed: {failed}"
        print(f"  models, prompts and export ready ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
        for engine in engines:
            if not engine.note:
                run_worker(engine, spec, work, settings)
        report(engines, spec, prompts, {"model": about_model, "draft": about_draft}, settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny model, 16 new tokens, one prompt per "
                        "task, one run, no guard")
    parser.add_argument("--model", type=Path, help="the model (default: runs/shakespeare if `make demo` made "
                        "it, else one trained here with the demo's recipe)")
    parser.add_argument("--data", type=Path, help="prepared data whose validation split the passages come "
                        "from, in the model's tokens (default: data/shakespeare for the demo's model, else "
                        "Shakespeare prepared here with the model's tokenizer)")
    parser.add_argument("--draft-model", type=Path, help="the draft model (default: one distilled here)")
    parser.add_argument("--train-minutes", type=float, help="training of a model made here (default 3)")
    parser.add_argument("--draft-minutes", type=float, help="distillation of the draft model (default 3)")
    parser.add_argument("--precision", default="fp32", choices=list(GGUF_TYPES),
                        help="ours' precision; llama.cpp runs the matching GGUF type (default fp32)")
    parser.add_argument("--prompts", type=int, help="prompts per task (default 4)")
    parser.add_argument("--new", type=int, help="new tokens per prompt, at most half the context "
                        "(default 128)")
    parser.add_argument("--draft-tokens", type=int, help="tokens drafted at a time (default 7)")
    parser.add_argument("--max-ngram", type=int, help="longest n-gram prompt lookup matches (default 3)")
    parser.add_argument("--repeats", type=int, help="runs per time, the median kept (default 3)")
    parser.add_argument("--tries", type=int, help="tries per run while disturbed (default 10)")
    parser.add_argument("--threads", type=int, help="threads per engine (default 2)")
    parser.add_argument("--work", help="write the models, the export and the specs here (default: a "
                        "temporary directory)")
    parser.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)  # a worker process: its spec
    parser.add_argument("--no-extra-buffers", action="store_true", help=argparse.SUPPRESS)  # llama.cpp's
    args = parser.parse_args()
    (worker if args.worker else benchmark)(args)


if __name__ == "__main__":
    main()
