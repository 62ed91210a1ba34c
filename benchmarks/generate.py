"""CPU generation: ours at every precision against the engines people run GPT-2 with on a CPU
(transformers, CTranslate2, llama.cpp), on the same weights, each engine in its own fresh process.

The weights: one random model of GPT-2 124M's shape (``transformers.GPT2LMHeadModel`` after
``torch.manual_seed(0)``), saved with GPT-2's real tokenizer; CTranslate2 reads it converted by its
own converter (float32, bfloat16 and int8 when its CPU backend computes in them), llama.cpp reads it
exported by ``gpt2 export --format gguf`` (F32, BF16, Q8_0, Q4_0). Every engine runs greedily on 2
threads, in a worker process of this script (``--worker``) that prints its figures as one JSON line:

- decode tokens/s at batch 1 and 8: 32-token prompts of random ids, 128 new tokens; the prompt's
  forward pass is left out: batch x 127 / (time(128 new) - time(1 new));
- prefill: milliseconds to read a 512-token prompt and make one token;
- peak MB: the worker's resident high-water mark at its end, after loading and generating (VmHWM:
  the process's own; ``ru_maxrss`` would also count the parent's, which Linux carries over exec);
- same tokens: the share of greedy tokens equal to transformers' fp32 ones, over 8 prompts x 32 new
  tokens decoded as one batch of 8 by each engine's batch path (transformers fp32's own batch of 8
  is the reference; the prompts are of one length, so nothing is padded). llama-cpp-python's
  ``Llama`` has no batch API; this script's llama.cpp worker decodes the 8 as 8 sequences of one
  context through llama.cpp's low-level API (the context batch 8 is timed with), and only where it
  has no such context runs the 8 prompts one after another.

Every timed run is guarded against the other jobs of a shared machine: the CPU time the rest of the
machine used during it (busy jiffies of /proc/stat less this process's own CPU time) above 10% of
one core makes it disturbed, and it is redone (up to 10 tries; then the least disturbed is kept and
the figure marked ``*``). A figure is the median of ``--repeats`` runs. Also printed: this machine's
memory bandwidth (a sum over a 512 MiB tensor) and the floor it sets at batch 1: every weight is read
once per decode step, so tokens/s <= bandwidth / weight bytes (ours, counted from the loaded tensors);
and in each row the bandwidth measured just before its worker ran, as it moves between minutes on a
shared machine (engines measured minutes apart may have had different memory to work with).
A row that cannot run says why: CTranslate2's CPU backend has no bfloat16 compute; llama.cpp runs only
when llama-cpp-python is installed and ``gpt2 export`` works, and a llama.cpp build whose AMX kernels
die of SIGILL on this machine is run again with its weights in plain CPU buffers (the row says so).

Hooks cost nothing when none is registered: the row ``ours fp32, after run_with_hooks`` loads our
model (``GPT2.from_pretrained``), calls ``run_with_cache`` and ``run_with_hooks`` (an identity hook on
``blocks.0.hook_resid_pre``) on a short prompt before anything is timed, then builds the inference
model from that same object (``load_for_inference(model)``) and decodes as ``ours fp32`` does; it
runs by default and with ``--only hooks`` (which brings ``ours fp32`` along).

Targets: each of our precisions >= 1.0x llama.cpp's matching format (F32, BF16, Q8_0, Q4_0) at
batch 1 and batch 8; same tokens at bf16/int8/int4 >= llama.cpp's at BF16/Q8_0/Q4_0; prefill >= the
best other engine at the same precision; peak memory <= its weight bytes + 400 MB and <=
transformers'; after run_with_hooks, batch 1 >= 0.95x ours fp32.

    python benchmarks/generate.py [--repeats 5] [--compile] [--only NAME,...] [--work DIR] [--smoke]
        [--isa LEVEL --llama-dir DIR]

``--compile`` adds ours at every precision with ``torch.compile``. ``--smoke``: a 2-layer, 64-wide model
(GPT-2's vocabulary), 32 new tokens, one run per figure, one thread per engine, two workers at a time,
no guard: every row in well under a minute; its figures only have to exist.

Per instruction set: ``--isa LEVEL`` (avx512bf16, avx512, avx2) runs our workers with
``GPT2_KERNELS_ISA=LEVEL`` (our rows' names say, in brackets, the variant our kernels report in use:
``[avx2?]`` where ``gpt2.inference.kernels.summary()`` does not name one) and ``--llama-dir DIR``
makes the llama.cpp workers import llama_cpp from DIR: a llama-cpp-python built for the same level by
``benchmarks/llama_cpp_isa.py LEVEL`` (its DIR/BUILD.json must name the same level). With ``--isa``
the rows are ours and llama.cpp (and transformers, the reference tokens); ``--only`` narrows them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GPT2_SHARED_DATA", ROOT.parent / "shared" / "data"))
VOCAB = 50257
TICK = os.sysconf("SC_CLK_TCK")
HF = "transformers fp32"
# The formats of the other engines that match each of our precisions.
CT2_TYPES = {"fp32": ["float32"], "bf16": ["bfloat16"], "int8": ["int8", "int8_bfloat16"]}
GGUF_TYPES = {"fp32": "f32", "bf16": "bf16", "int8": "q8_0", "int4": "q4_0"}
ISAS = ["avx512bf16", "avx512", "avx2"]  # gpt2.inference.kernels' variants (GPT2_KERNELS_ISA)
HOOKS = "ours fp32, after run_with_hooks"
HOOK_PROMPT = 8  # tokens of the prompt run_with_cache and run_with_hooks see


@dataclass(frozen=True)
class Settings:
    """What is run: the model's shape (``transformers.GPT2Config`` fields), the token counts, and the
    guard (runs per figure, tries per run, others' CPU share beyond which a run is redone)."""

    shape: dict[str, int]
    prompt: int = 32
    new: int = 128
    prefill: int = 512
    agree_prompts: int = 8  # decoded as one batch
    agree_new: int = 32
    repeats: int = 5
    tries: int = 10
    threshold: float = 0.10
    threads: int = 2  # per engine
    jobs: int = 1  # workers run at once
    timeout_s: float | None = None  # per worker


FULL = Settings(shape={})  # GPT-2 124M
# One thread per engine, two workers at a time: its figures only have to exist. (On a busy machine,
# two threads of PyTorch waiting for each other at every small product make the tiny model 30x slower.)
SMOKE = Settings(shape={"n_layer": 2, "n_embd": 64, "n_head": 2}, new=32, repeats=1, tries=1,
                 threshold=math.inf, threads=1, jobs=2, timeout_s=180)


# ----------------------------------------------------------------------------------------------------
# Timing, guarded against the other jobs of the machine


def busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all cores: user, nice, system, irq, softirq, steal)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / TICK


def guarded(run: Callable[[], float]) -> tuple[float, float]:
    """``run()``'s value, and the CPU time other processes used meanwhile, in cores (a share of the wall
    time; two jiffies are forgiven: /proc/stat counts in jiffies)."""
    busy, own, start = busy_seconds(), time.process_time(), time.perf_counter()
    value = run()
    wall = time.perf_counter() - start
    others = busy_seconds() - busy - (time.process_time() - own)
    return value, max(0.0, others - 2 / TICK) / wall


@dataclass
class Figure:
    value: float  # the median of the runs
    marked: bool  # some run was disturbed in every try: the least disturbed try was kept
    redone: int  # tries thrown away as disturbed


def figure(run: Callable[[], float], spec: dict[str, Any]) -> Figure:
    """The median of ``spec["repeats"]`` undisturbed runs of ``run``, each redone while disturbed."""
    values, marked, redone = [], False, 0
    for _ in range(spec["repeats"]):
        tries = [guarded(run)]
        while tries[-1][1] > spec["threshold"] and len(tries) < spec["tries"]:
            tries.append(guarded(run))
        value, disturbed = min(tries, key=lambda t: t[1])
        redone += len(tries) - 1
        marked |= disturbed > spec["threshold"]
        values.append(value)
    return Figure(statistics.median(values), marked, redone)


# ----------------------------------------------------------------------------------------------------
# Engines (in the worker process)

Generate = Callable[[list[list[int]], int], list[list[int]]]  # prompts, new tokens -> the new tokens


@dataclass
class Engine:
    gen: Generate
    weight_bytes: int
    b8_note: str = ""  # why batch 8 is not measured, when it is not
    info: str = ""  # what the engine says it runs (CTranslate2: its compute type)
    close: Callable[[], None] = lambda: None
    system: str = ""  # the instruction sets it runs with (ours: the kernels' summary; llama.cpp: its own)


class Refused(Exception):
    """The worker was asked for something the engine refuses (its one-line reason)."""


def tensor_bytes(model: Any) -> int:
    """Bytes of a torch model's parameters and buffers, each storage once (the tied embedding), and of
    the weights held outside any of them (``weight_bytes``: fbgemm's packed int8 weights, oneDNN's
    blocked bf16 ones)."""
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    packed = sum(getattr(m, "weight_bytes", 0) for m in model.modules())
    return packed + sum(t.numel() * t.element_size() for t in tensors.values())


def torch_engine(kind: str, weights: str, precision: str, compile: bool, threads: int,
                 hook_prompt: list[int] | None = None) -> Engine:
    """transformers' ``generate`` (``kind`` transformers, fp32) or ours (``load_for_inference``);
    ``hook_prompt``: ours runs ``run_with_cache`` and ``run_with_hooks`` on it first, on the model
    as loaded, then builds the inference model from that object."""
    import torch

    torch.set_num_threads(threads)
    if kind == "transformers":
        import transformers

        transformers.logging.set_verbosity_error()
        model = transformers.GPT2LMHeadModel.from_pretrained(weights).eval()

        def run(ids: torch.Tensor, n: int) -> torch.Tensor:
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, pad_token_id=0)
    else:
        from gpt2.generation.sampling import GenerationConfig, generate
        from gpt2.inference.load import load_for_inference

        if hook_prompt is not None:
            from gpt2 import GPT2

            weights = GPT2.from_pretrained(weights)
            run_hooks(weights, hook_prompt)
        model = load_for_inference(weights, precision=precision, device="cpu", compile=compile)

        def run(ids: torch.Tensor, n: int) -> torch.Tensor:
            return generate(model, ids, GenerationConfig(max_new_tokens=n, temperature=0))

    def gen(prompts: list[list[int]], n: int) -> list[list[int]]:
        ids = torch.tensor(prompts)
        with torch.inference_mode():
            return run(ids, n)[:, ids.shape[1]:].tolist()

    return Engine(gen, tensor_bytes(model), system=kernels_summary() if kind == "ours" else "")


def run_hooks(model: Any, prompt: list[int]) -> None:
    """``run_with_cache`` and ``run_with_hooks`` (an identity hook) on ``prompt``, as a user would."""
    import torch

    ids = torch.tensor([prompt])
    with torch.inference_mode():
        model.run_with_cache(ids)
        model.run_with_hooks(ids, fwd_hooks=[("blocks.0.hook_resid_pre", lambda a, hook: a)])


def kernels_summary() -> str:
    """What ``gpt2.inference.kernels`` says it runs here (its ``summary()``, where it has one)."""
    from gpt2.inference import kernels

    return kernels.summary() if hasattr(kernels, "summary") else ""


def ct2_engine(path: str, compute_type: str, threads: int) -> Engine:
    """A CTranslate2 ``Generator`` over a converted directory; prompts go in as vocabulary strings."""
    import ctranslate2

    generator = ctranslate2.Generator(path, device="cpu", compute_type=compute_type,
                                      intra_threads=threads, inter_threads=1)
    vocabulary = json.loads((Path(path) / "vocabulary.json").read_text(encoding="utf-8"))

    def gen(prompts: list[list[int]], n: int) -> list[list[int]]:
        results = generator.generate_batch([[vocabulary[i] for i in p] for p in prompts], max_length=n,
                                           min_length=n, sampling_topk=1, include_prompt_in_result=False)
        return [r.sequences_ids[0] for r in results]

    return Engine(gen, (Path(path) / "model.bin").stat().st_size, info=generator.compute_type)


def use_plain_llama_buffers() -> None:
    """From now on llama.cpp keeps its weights in plain CPU buffers (no AMX or repacked layouts)."""
    import llama_cpp.llama_cpp as bindings

    defaults = bindings.llama_model_default_params

    def model_params() -> Any:
        params = defaults()
        params.use_extra_bufts = False
        return params

    bindings.llama_model_default_params = model_params  # what ``Llama`` starts from


def llama_engine(path: str, spec: dict[str, Any], extra_buffers: bool = True,
                 llama_dir: str | None = None) -> Engine:
    """llama.cpp through llama-cpp-python's low-level API: ``Llama``'s own context for batch 1 and a
    second one over the same model holding 8 sequences for batch 8; greedy = argmax of the logits.
    ``extra_buffers`` False: the weights stay in plain CPU buffers (no AMX or repacked layouts).
    ``llama_dir``: llama_cpp is imported from there (a build of benchmarks/llama_cpp_isa.py)."""
    if llama_dir:
        sys.path.insert(0, str(Path(llama_dir).resolve()))
    import llama_cpp

    if llama_dir and not Path(llama_cpp.__file__).resolve().is_relative_to(Path(llama_dir).resolve()):
        raise Refused(f"llama_cpp was imported from {llama_cpp.__file__}, not from {llama_dir}")

    if not extra_buffers:
        use_plain_llama_buffers()
    threads = spec["threads"]
    llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=1024,
                          n_batch=512, verbose=False)
    batch = llama_cpp.llama_batch_init(max(512, spec["prefill"]), 0, 8)
    contexts, note = {1: llm._ctx.ctx}, ""
    try:
        params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
        per_sequence = 256 * math.ceil((spec["prompt"] + spec["new"]) / 256)
        params.n_seq_max, params.n_ctx = 8, 8 * per_sequence  # each sequence gets n_ctx / n_seq_max
        context = llama_cpp.llama_init_from_model(llm._model.model, params)
        if not context:
            raise RuntimeError("llama_init_from_model gave no context")
        contexts[8] = context
    except (AttributeError, RuntimeError, TypeError) as e:
        note = f"no 8-sequence context ({e})"

    def gen(prompts: list[list[int]], n: int) -> list[list[int]]:
        return llama_greedy(llama_cpp, contexts[len(prompts)], batch, prompts, n, llm.n_vocab())

    def close() -> None:
        if 8 in contexts:
            llama_cpp.llama_free(contexts[8])
        llama_cpp.llama_batch_free(batch)
        llm.close()

    system = llama_cpp.llama_print_system_info().decode(errors="replace").strip(" |")
    return Engine(gen, Path(path).stat().st_size, b8_note=note, close=close, system=system)


def llama_decode(lib: Any, ctx: Any, batch: Any, entries: list[tuple[int, int, int, bool]]) -> None:
    """Decode (token, position, sequence, wants logits) entries in one ``llama_decode`` call."""
    for k, (token, position, sequence, logits) in enumerate(entries):
        batch.token[k], batch.pos[k], batch.n_seq_id[k] = token, position, 1
        batch.seq_id[k][0], batch.logits[k] = sequence, logits
    batch.n_tokens = len(entries)
    if (status := lib.llama_decode(ctx, batch)) != 0:
        raise RuntimeError(f"llama_decode returned {status}")


def llama_greedy(lib: Any, ctx: Any, batch: Any, prompts: list[list[int]], n: int, vocab: int
                 ) -> list[list[int]]:
    """``n`` greedy tokens after each prompt, the prompts decoded together as sequences 0, 1, ..."""
    import numpy as np

    lib.llama_memory_clear(lib.llama_get_memory(ctx), False)
    llama_decode(lib, ctx, batch, [(token, position, s, position == len(p) - 1)
                                   for s, p in enumerate(prompts) for position, token in enumerate(p)])
    rows = list(np.cumsum([len(p) for p in prompts]) - 1)  # where each prompt's logits are
    new: list[list[int]] = [[] for _ in prompts]
    for step in range(n):
        for s, row in enumerate(rows):
            logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, int(row)), shape=(vocab,))
            new[s].append(int(logits.argmax()))
        if step < n - 1:
            step_entries = [(new[s][-1], len(p) + step, s, True) for s, p in enumerate(prompts)]
            llama_decode(lib, ctx, batch, step_entries)
            rows = list(range(len(prompts)))
    return new


def elapsed(gen: Generate, prompts: list[list[int]], n: int) -> float:
    start = time.perf_counter()
    gen(prompts, n)
    return time.perf_counter() - start


def decode_rate(gen: Generate, prompts: list[list[int]], n: int) -> float:
    """New tokens per second, the prompt's forward pass (and the first token) left out."""
    first = elapsed(gen, prompts, 1)
    return len(prompts) * (n - 1) / (elapsed(gen, prompts, n) - first)


def measure(engine: Engine, spec: dict[str, Any]) -> dict[str, Any]:
    """The worker's figures: the tokens to compare, decode rates, prefill, and how the guard fared."""
    prompts = spec["prompts"]
    agree = prompts["agree"]
    if engine.b8_note:  # no batch path: one prompt after another
        tokens = [engine.gen([p], spec["agree_new"])[0] for p in agree]
    else:
        tokens = engine.gen(agree, spec["agree_new"])
    result: dict[str, Any] = {"tokens": tokens, "agree_batched": not engine.b8_note,
                              "weight_bytes": engine.weight_bytes, "info": engine.info,
                              "system": engine.system, "redone": 0, "marked": [], "notes": []}

    def record(key: str, run: Callable[[], float]) -> None:
        f = figure(run, spec)
        result[key], result["redone"] = f.value, result["redone"] + f.redone
        if f.marked:
            result["marked"].append(key)

    for key in ("b1", "b8"):
        ids = prompts[key]
        result[key] = None
        if key == "b8" and engine.b8_note:
            result["notes"].append(f"batch 8: {engine.b8_note}")
            continue
        try:
            engine.gen(ids, 8)  # warm-up
            record(key, lambda ids=ids: decode_rate(engine.gen, ids, spec["new"]))
        except RuntimeError as e:
            result["notes"].append(f"batch {len(ids)}: {e}")
    engine.gen(prompts["prefill"], 1)
    record("prefill_ms", lambda: 1e3 * elapsed(engine.gen, prompts["prefill"], 1))
    return result


def resident_peak_mb() -> float:
    """This process's resident high-water mark (VmHWM), in MiB."""
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 1024


def worker(args: argparse.Namespace) -> None:
    """Load one engine, measure it and print its figures as one JSON line."""
    spec = json.loads(Path(args.spec).read_text())
    try:
        if args.worker in ("transformers", "ours"):
            hook_prompt = spec["prompts"]["b1"][0][:HOOK_PROMPT] if args.hooks else None
            engine = torch_engine(args.worker, args.weights, args.precision, args.compile, spec["threads"],
                                  hook_prompt)
        elif args.worker == "ctranslate2":
            engine = ct2_engine(args.weights, args.precision, spec["threads"])
        else:
            engine = llama_engine(args.weights, spec, extra_buffers=not args.no_extra_buffers,
                                  llama_dir=args.llama_dir)
    except Refused as e:
        print(json.dumps({"refused": str(e)}), flush=True)
        return
    result = measure(engine, spec)
    result["peak_mb"] = resident_peak_mb()
    engine.close()
    print(json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------------
# The parent: weights, conversions, workers


@dataclass
class Row:
    name: str
    precision: str  # our precision it is compared at
    engine: str  # transformers, ours, ctranslate2, llama.cpp
    worker: list[str] | None  # the worker's arguments; None: not run (``note`` says why)
    note: str = ""
    make: str = ""  # what the parent has to write first: a CTranslate2 quantization or a GGUF type
    result: dict[str, Any] | None = None
    bandwidth: float = 0.0  # GB/s, measured just before its worker ran
    variant: str = ""  # ours: "compile", "hooks" (after run_with_hooks) or "" (the plain row)
    env: dict[str, str] = dataclasses.field(default_factory=dict)  # the worker's extra environment


def make_weights(work: Path, shape: dict[str, int]) -> Path:
    """The random model, saved with GPT-2's tokenizer: the directory every engine reads."""
    import torch
    import transformers

    from gpt2 import GPT2, Tokenizer

    ranks = SHARED / "gpt2.tiktoken"
    if not ranks.is_file():
        sys.exit(f"{ranks} is missing: set GPT2_SHARED_DATA to the directory holding gpt2.tiktoken")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**shape))
    hf.save_pretrained(work / "hf")
    model = GPT2.from_pretrained(work / "hf", tokenizer=Tokenizer.from_file(ranks))
    model.save_pretrained(work / "model")
    shutil.rmtree(work / "hf")
    return work / "model"


def plan(precisions: list[str], work: Path, model: Path, args: argparse.Namespace) -> list[Row]:
    """Every row, grouped by precision: what runs, and for what does not, why. With ``--isa``: ours
    (forced to the level) and llama.cpp (from ``--llama-dir``), and transformers for the reference."""
    ct2_types = ct2_supported()
    llama = bool(args.llama_dir) or importlib.util.find_spec("llama_cpp") is not None
    ours_env = {"GPT2_KERNELS_ISA": args.isa} if args.isa else {}
    rows = [Row(HF, "fp32", "transformers", ["transformers", "fp32", str(model)])]
    for p in precisions:
        rows.append(Row(f"ours {p}", p, "ours", ["ours", p, str(model)], env=ours_env))
        if p == "fp32" and not args.isa:
            rows.append(Row(HOOKS, p, "ours", ["ours", p, str(model), "--hooks"], variant="hooks"))
        if args.compile:
            rows.append(Row(f"ours {p} + compile", p, "ours", ["ours", p, str(model), "--compile"],
                            variant="compile", env=ours_env))
        for q in [] if args.isa else CT2_TYPES.get(p, []):
            row = Row(f"CTranslate2 {q}", p, "ctranslate2", ["ctranslate2", q, str(work / f"ct2-{q}")],
                      make=q)
            if ct2_types is None:
                row.worker, row.note = None, "ctranslate2 is not installed"
            elif q not in ct2_types:
                row.worker, row.note = None, (f"its CPU backend does not compute in {q} on this machine "
                                              f"(it offers {', '.join(sorted(ct2_types))})")
            rows.append(row)
        if p in GGUF_TYPES:
            t = GGUF_TYPES[p]
            within = ["--llama-dir", args.llama_dir] if args.llama_dir else []
            row = Row(f"llama.cpp {t.upper()}", p, "llama.cpp",
                      ["llama", t, str(work / f"model-{t}.gguf"), *within], make=t)
            if not llama:
                row.worker, row.note = None, "llama_cpp is not importable (pip install llama-cpp-python)"
            rows.append(row)
    if args.only:
        wanted = [w.strip() for w in args.only.split(",")]
        hooks = any(w in HOOKS for w in wanted)  # ours fp32 comes along: the hooks row's measure
        rows = [r for r in rows if r.name == HF or any(w in r.name for w in wanted)
                or (hooks and r.name == "ours fp32")]
    return rows


def ct2_supported() -> set[str] | None:
    """The compute types CTranslate2's CPU backend offers here (None: not installed)."""
    if importlib.util.find_spec("ctranslate2") is None:
        return None
    import ctranslate2

    return set(ctranslate2.get_supported_compute_types("cpu"))


def start_exports(rows: list[Row], model: Path) -> list[tuple[Row, subprocess.Popen, Any]]:
    """``gpt2 export --format gguf`` for every llama.cpp row, all at once, in the background."""
    started = []
    for row in rows:
        if row.engine == "llama.cpp" and row.worker:
            log = tempfile.TemporaryFile()  # noqa: SIM115 (closed by finish_exports)
            command = [sys.executable, "-m", "gpt2", "export", "--format", "gguf", "--model", str(model),
                       "--out", row.worker[2], "--type", row.make, "--overwrite"]
            started.append((row, subprocess.Popen(command, stdout=log, stderr=log), log))
    return started


def finish_exports(started: list[tuple[Row, subprocess.Popen, Any]]) -> None:
    for row, process, log in started:
        if process.wait():
            log.seek(0)
            lines = log.read().decode(errors="replace").strip().splitlines() or ["?"]
            row.worker, row.note = None, f"gpt2 export --format gguf failed: {lines[-1][:200]}"
        log.close()


def convert_ct2(rows: list[Row], model: Path) -> None:
    """CTranslate2's own converter (``ct2-transformers-converter``'s code, called in this process)."""
    for row in rows:
        if row.engine == "ctranslate2" and row.worker:
            from ctranslate2.converters import TransformersConverter

            TransformersConverter(str(model)).convert(row.worker[2], quantization=row.make, force=True)


def write_spec(work: Path, settings: Settings) -> Path:
    """The settings and the prompts (random ids from a fixed generator) every worker reads."""
    rng = random.Random(0)

    def prompts(n: int, length: int) -> list[list[int]]:
        return [[rng.randrange(VOCAB - 1) for _ in range(length)] for _ in range(n)]

    spec = dataclasses.asdict(settings) | {"prompts": {
        "agree": prompts(settings.agree_prompts, settings.prompt), "b1": prompts(1, settings.prompt),
        "b8": prompts(8, settings.prompt), "prefill": prompts(1, settings.prefill)}}
    path = work / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def run_worker(row: Row, spec: Path, settings: Settings, bandwidth: Callable[[], float]) -> None:
    """Run ``row``'s worker in a fresh process, the memory bandwidth measured just before; its figures
    land in ``row.result`` (or a note). A llama.cpp worker killed by SIGILL (this machine's AMX
    kernels of llama.cpp) runs again with the weights in plain CPU buffers."""
    row.bandwidth = bandwidth()
    engine, precision, weights, *rest = row.worker
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", engine, "--precision", precision,
               "--weights", weights, "--spec", str(spec), *rest]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=settings.timeout_s,
                              env=os.environ | {"OMP_NUM_THREADS": str(settings.threads)} | row.env)
    except subprocess.TimeoutExpired:
        row.note = f"worker timed out after {settings.timeout_s:.0f} s"
        return
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode == -signal.SIGILL and engine == "llama" and "--no-extra-buffers" not in rest:
        row.worker = [*row.worker, "--no-extra-buffers"]
        row.name += " (plain buffers)"
        run_worker(row, spec, settings, bandwidth)
        if row.result:
            row.result["notes"].append(
                "killed by SIGILL with llama.cpp's default weight buffers (its AMX kernels, which this "
                "llama-cpp-python build compiled in); measured with use_extra_bufts=False: no AMX, no "
                "repacked weight layouts")
        return
    if done.returncode or not lines:
        row.note = f"worker failed (exit {done.returncode}; its stderr is above)"
        print(f"--- {row.name}: worker failed:\n{done.stderr[-3000:]}", file=sys.stderr)
        return
    found = json.loads(lines[-1])
    if "refused" in found:
        row.note = found["refused"]
        print(f"  {row.name}: {row.note}", file=sys.stderr, flush=True)
        return
    row.result = r = found
    if "GPT2_KERNELS_ISA" in row.env:
        row.name += f" [{kernel_variant(r['system'], row.env['GPT2_KERNELS_ISA'])}]"
    print(f"  {row.name}: b1 {cell(r, 'b1')}, b8 {cell(r, 'b8')} tok/s, "
          f"prefill {cell(r, 'prefill_ms', 0)} ms, peak {r['peak_mb']:.0f} MB "
          f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)


def kernel_variant(summary: str, forced: str) -> str:
    """The instruction-set variant ``gpt2.inference.kernels.summary()`` names (``forced?`` where it
    names none: the level was asked for, the kernels do not say which they run; ``kernels off``)."""
    if summary.startswith("off"):
        return "kernels off"
    named = re.search(rf"\b({'|'.join(sorted(ISAS, key=len, reverse=True))})\b", summary)
    return named.group(1) if named else f"{forced}?"


def bandwidth_meter(spec: dict[str, Any]) -> Callable[[], float]:
    """A measure of read bandwidth (GB/s): summing a 512 MiB float32 tensor on the engines' threads,
    guarded like every run. The parent keeps the tensor and measures before every worker, as this
    machine's bandwidth moves between minutes (28-54 GB/s seen)."""
    import torch

    torch.set_num_threads(spec["threads"])
    x = torch.ones(128 * 2**20)
    x.sum()

    def run() -> float:
        start = time.perf_counter()
        x.sum()
        return x.numel() * 4 / (time.perf_counter() - start) / 1e9

    return lambda: figure(run, spec | {"repeats": max(5, spec["repeats"])}).value


# ----------------------------------------------------------------------------------------------------
# The report


def cell(result: dict[str, Any] | None, key: str, digits: int = 1) -> str:
    if result is None or result.get(key) is None:
        return "n/a"
    return f"{result[key]:.{digits}f}" + ("*" if key in result["marked"] else "")


def ratio(value: float | None, reference: float | None) -> str:
    return f"{value / reference:.2f}x" if value and reference else "-"


def agreement(result: dict[str, Any] | None, reference: list[list[int]] | None) -> float | None:
    """The share of ``result``'s greedy tokens equal to the reference's, position by position."""
    if not result or not reference:
        return None
    pairs = [(a, b) for x, y in zip(result["tokens"], reference, strict=True)
             for a, b in zip(x, y, strict=True)]
    return sum(a == b for a, b in pairs) / len(pairs)


def reference_tokens(rows: list[Row]) -> list[list[int]] | None:
    return next((r.result["tokens"] for r in rows if r.name == HF and r.result), None)


def best_other(row: Row, rows: list[Row], key: str) -> tuple[float | None, str]:
    """The best figure ``key`` (highest rate, lowest time) of another engine at ``row``'s precision."""
    found = [(r.result[key], r.name) for r in rows
             if r.precision == row.precision and r.engine != "ours" and r.result and r.result.get(key)]
    if not found:
        return None, ""
    return min(found) if key == "prefill_ms" else max(found)


def comparisons(row: Row, rows: list[Row], floors: dict[str, float]) -> list[str]:
    """The ratio columns of one of our rows (speeds: higher is better; peak: lower is better)."""
    r, hf = row.result, next((x.result for x in rows if x.name == HF and x.result), None)
    if row.engine != "ours" or r is None:
        return [""] * 5
    b1, b8 = best_other(row, rows, "b1")[0], best_other(row, rows, "b8")[0]
    prefill = best_other(row, rows, "prefill_ms")[0]
    return [ratio(r["b1"], b1), ratio(r["b8"], b8), ratio(prefill, r["prefill_ms"]),
            ratio(r["peak_mb"], hf and hf["peak_mb"]), ratio(r["b1"], floors.get(row.precision))]


COLUMNS = [("engine", 34), ("b1 tok/s", 11), ("b8 tok/s", 11), ("prefill 512 ms", 16), ("weights MB", 12),
           ("peak MB", 9), ("GB/s", 6), ("same tokens", 13), ("b1 vs best", 12), ("b8 vs best", 12),
           ("prefill vs best", 17), ("peak vs HF", 12), ("b1 of floor", 13)]


def table(rows: list[Row], floors: dict[str, float]) -> list[str]:
    """The table's lines: a header, then a row per engine (rows that did not run say why)."""
    reference = reference_tokens(rows)
    lines = ["".join(f"{name:<{w}}" if i == 0 else f"{name:>{w}}" for i, (name, w) in enumerate(COLUMNS))]
    lines.append("-" * len(lines[0]))
    for row in rows:
        r = row.result
        if r is None:
            lines.append(f"{row.name:<34}  n/a: {row.note}")
            continue
        same = "" if (share := agreement(r, reference)) is None else f"{share:.0%}"
        name = row.name + (f" (= {r['info']})" if r["info"] and r["info"] != row.make else "")
        cells = [name, cell(r, "b1"), cell(r, "b8"), cell(r, "prefill_ms", 0),
                 f"{r['weight_bytes'] / 2**20:.0f}", f"{r['peak_mb']:.0f}", f"{row.bandwidth:.0f}", same,
                 *comparisons(row, rows, floors)]
        lines.append("".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}"
                             for i, (c, (_, w)) in enumerate(zip(cells, COLUMNS, strict=True))))
    return lines


def targets(rows: list[Row]) -> list[str]:
    """Each of our rows against the targets of the module docstring."""
    hf = next((r.result for r in rows if r.name == HF and r.result), None)
    reference = reference_tokens(rows)
    lines = []
    for row in rows:
        if row.engine != "ours" or row.result is None or row.variant == "hooks":
            continue
        r, checks = row.result, []
        llama = next((x.result for x in rows if x.engine == "llama.cpp" and x.precision == row.precision
                      and x.result), None)
        for key in ("b1", "b8"):
            if llama and r[key] and llama[key]:
                checks.append(f"{key} {r[key] / llama[key]:.2f}x llama.cpp "
                              f"{'ok' if r[key] >= llama[key] else 'MISSED'}")
        ours, theirs = agreement(r, reference), agreement(llama, reference)
        if row.precision != "fp32" and ours is not None and theirs is not None:
            checks.append(f"same tokens {ours:.0%} vs llama.cpp {GGUF_TYPES[row.precision].upper()}'s "
                          f"{theirs:.0%} {'ok' if ours >= theirs else 'MISSED'}")
        prefill, name = best_other(row, rows, "prefill_ms")
        if prefill:
            checks.append(f"prefill {prefill / r['prefill_ms']:.2f}x {name} "
                          f"{'ok' if r['prefill_ms'] <= prefill else 'MISSED'}")
        budget = r["weight_bytes"] / 2**20 + 400
        checks.append(f"peak {r['peak_mb']:.0f} MB <= weights + 400 = {budget:.0f} "
                      f"{'ok' if r['peak_mb'] <= budget else 'MISSED'}")
        if hf:
            checks.append(f"<= transformers' {hf['peak_mb']:.0f} "
                          f"{'ok' if r['peak_mb'] <= hf['peak_mb'] else 'MISSED'}")
        lines.append(f"  {row.name}: " + "; ".join(checks))
    return lines


def hooks_line(rows: list[Row]) -> str | None:
    """After run_with_hooks against ours fp32 (None: the hooks row was not asked for)."""
    hooks = next((r for r in rows if r.variant == "hooks"), None)
    if hooks is None:
        return None
    if hooks.result is None:
        return f"hooks: {HOOKS} n/a: {hooks.note}"
    plain = next((r.result for r in rows if r.engine == "ours" and r.precision == "fp32" and not r.variant
                  and r.result), None)
    line = f"hooks: after run_with_hooks b1 {cell(hooks.result, 'b1')} tok/s"
    if not (plain and plain["b1"] and hooks.result["b1"]):
        return line + " (ours fp32: n/a)"
    share = hooks.result["b1"] / plain["b1"]
    line += f" = {share:.2f}x ours fp32 {'ok' if share >= 0.95 else 'MISSED'} (target >= 0.95x)"
    if plain["b8"] and hooks.result["b8"]:
        line += f"; b8 {cell(hooks.result, 'b8')} tok/s = {hooks.result['b8'] / plain['b8']:.2f}x"
    return line


def report(rows: list[Row], bandwidth: float, settings: Settings, args: argparse.Namespace) -> None:
    """Print the header lines, the table and its footnotes."""
    import torch
    import transformers

    ours = {r.precision: r.result["weight_bytes"] for r in rows if r.engine == "ours" and r.result}
    floors = {p: bandwidth * 1e9 / b for p, b in ours.items()}
    shape = "GPT-2 124M shape" if not settings.shape else f"smoke shape {settings.shape}"
    print(f"\n{shape}, random weights, greedy; CPU, {settings.threads} thread(s) per engine, each in its own "
          f"process; torch {torch.__version__}, transformers {transformers.__version__}"
          f"{versions(args.llama_dir)}")
    if args.isa or args.llama_dir:
        print("\n".join(systems(rows, args)))
    print(f"decode: {settings.prompt}-token prompts, {settings.new} new tokens; "
          f"prefill: {settings.prefill}-token prompt + 1 token; "
          f"median of {settings.repeats} run(s) per figure")
    print(f"memory bandwidth {bandwidth:.1f} GB/s -> batch-1 floor (weights read once per token): "
          + ", ".join(f"{p} {floors[p]:.0f} tok/s ({b / 2**20:.0f} MB)" for p, b in ours.items()) + "\n")
    print("\n".join(table(rows, floors)))
    redone = sum(r.result["redone"] for r in rows if r.result)
    guard = ("guard off (smoke): runs are never redone" if math.isinf(settings.threshold) else
             f"guard: {redone} timed run(s) redone because other processes used > {settings.threshold:.0%} "
             "of a core")
    print(f"\n{guard}"
          + "".join(f"; {r.name} {r.result['redone']}" for r in rows if r.result and r.result["redone"])
          + "; * = every try disturbed, the least disturbed kept")
    print("vs best: ours / the best other engine at the same precision (fp32: transformers, CTranslate2 "
          "float32, llama.cpp F32; bf16: CTranslate2 bfloat16, llama.cpp BF16; int8: CTranslate2 int8, "
          "llama.cpp Q8_0; int4: llama.cpp Q4_0), speeds (prefill as speed: higher is better); "
          "peak vs HF: ours / transformers' (lower is better); b1 of floor: share of the bandwidth floor")
    print("peak MB: the worker's resident high-water mark after loading and generating (torch engines "
          "include torch's own ~220 MB); weights MB: ours and transformers' tensors, the other "
          "engines' files; GB/s: the memory's read bandwidth just before the row's worker ran")
    print("same tokens: greedy tokens equal to transformers' fp32 ones "
          f"({settings.agree_prompts} prompts x {settings.agree_new} new tokens, decoded as one batch of "
          f"{settings.agree_prompts}; llama.cpp: {settings.agree_prompts} sequences of one context)")
    for row in rows:
        for note in (row.result or {}).get("notes", []):
            print(f"note: {row.name}: {note}")
        if row.result and not row.result.get("agree_batched", True):
            print(f"note: {row.name}: same tokens from the prompts decoded one after another (no batch path)")
    print("targets: ours >= 1.0x llama.cpp at batch 1 and 8, same tokens at bf16/int8/int4 >= llama.cpp's "
          "BF16/Q8_0/Q4_0, prefill >= best other, peak <= weights + 400 MB and <= transformers'")
    print("\n".join(targets(rows)))
    if line := hooks_line(rows):
        print(line)


def systems(rows: list[Row], args: argparse.Namespace) -> list[str]:
    """Which instruction sets ran: our kernels' summary (per worker, as each said) and llama.cpp's."""
    ours = sorted({r.result["system"] for r in rows if r.engine == "ours" and r.result} - {""})
    llama = sorted({r.result["system"] for r in rows if r.engine == "llama.cpp" and r.result})
    forced = f"GPT2_KERNELS_ISA={args.isa}" if args.isa else "no GPT2_KERNELS_ISA"
    return [f"ours ({forced}): kernels {' / '.join(ours) or 'n/a'}",
            f"llama.cpp ({args.llama_dir or 'as installed'}): {' / '.join(llama) or 'n/a'}"]


def versions(llama_dir: str | None = None) -> str:
    """The other engines' versions, as installed (llama-cpp-python: the one in ``llama_dir``, if given)."""
    from importlib.metadata import PackageNotFoundError, distributions, version

    found = []
    for package in ("ctranslate2", "llama-cpp-python"):
        if package == "llama-cpp-python" and llama_dir:
            found += [f"{package} {d.version} ({llama_dir})" for d in distributions(path=[llama_dir])
                      if d.metadata["Name"].replace("_", "-").lower() == package][:1]
            continue
        with contextlib.suppress(PackageNotFoundError):
            found.append(f"{package} {version(package)}")
    return "".join(f", {v}" for v in found)


def benchmark(args: argparse.Namespace) -> None:
    """Write the weights and every engine's files, run each worker, print the report."""
    from gpt2.config import PRECISIONS

    settings = SMOKE if args.smoke else FULL
    if args.repeats:
        settings = dataclasses.replace(settings, repeats=args.repeats)
    if args.tries:
        settings = dataclasses.replace(settings, tries=args.tries)
    with tempfile.TemporaryDirectory(prefix="generate-benchmark-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        model = make_weights(work, settings.shape)
        rows = plan(list(PRECISIONS), work, model, args)
        exports = start_exports(rows, model)
        convert_ct2(rows, model)
        finish_exports(exports)
        spec = write_spec(work, settings)
        meter = bandwidth_meter(json.loads(spec.read_text()))
        bandwidth = meter()
        print(f"  weights and conversions ready ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
        with ThreadPoolExecutor(settings.jobs) as pool:
            list(pool.map(lambda row: run_worker(row, spec, settings, meter), [r for r in rows if r.worker]))
        report(rows, bandwidth, settings, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny model, 32 new tokens, one run, no guard")
    parser.add_argument("--repeats", type=int, default=0, help="runs per figure, the median kept (default 5)")
    parser.add_argument("--tries", type=int, default=0, help="tries per run while disturbed (default 10)")
    parser.add_argument("--compile", action="store_true", help="add ours, each precision, compiled")
    parser.add_argument("--only", help="only the rows whose name holds one of these comma-separated words "
                                       "(transformers always runs: it is the reference)")
    parser.add_argument("--work", help="write the weights and converted files here (default: a temp dir)")
    parser.add_argument("--isa", choices=ISAS, help="our kernels forced to this instruction-set variant "
                        "(GPT2_KERNELS_ISA); the rows: ours and llama.cpp (needs --llama-dir)")
    parser.add_argument("--llama-dir", help="import llama_cpp from this directory (a build of "
                                            "benchmarks/llama_cpp_isa.py for the same level)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # in a worker process: the engine
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--no-extra-buffers", action="store_true", help=argparse.SUPPRESS)  # llama.cpp
    parser.add_argument("--hooks", action="store_true", help=argparse.SUPPRESS)  # ours: run_with_hooks first
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if problem := check_isa(args):
        print(f"generate.py: error: {problem}", file=sys.stderr)
        sys.exit(2)
    benchmark(args)


def check_isa(args: argparse.Namespace) -> str | None:
    """What is wrong with ``--isa`` / ``--llama-dir``, in one line (None: nothing)."""
    if args.isa and not args.llama_dir:
        return (f"--isa {args.isa} needs --llama-dir: llama.cpp built for {args.isa} "
                f"(python benchmarks/llama_cpp_isa.py {args.isa})")
    if not args.llama_dir:
        return None
    where = Path(args.llama_dir)
    if not (where / "llama_cpp" / "__init__.py").is_file():
        return (f"--llama-dir {where}: no llama_cpp package there (build one with "
                f"python benchmarks/llama_cpp_isa.py {args.isa or 'LEVEL'} --out {where.parent})")
    record = where / "BUILD.json"
    if args.isa and record.is_file():
        built = json.loads(record.read_text())
        if built.get("level") != args.isa:
            return f"--llama-dir {where} holds llama.cpp built for {built.get('level')}, not {args.isa}"
        if not built.get("verify", {}).get("ok", False):
            return f"--llama-dir {where}: its build failed its checks ({record}); rebuild it"
    args.llama_dir = str(where.resolve())
    return None


if __name__ == "__main__":
    main()
