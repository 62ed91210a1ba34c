"""Training a GPT-2, from shards to checkpoints: nanoGPT's and llm.c's loop as a resumable tool.

Read top to bottom: ``TrainConfig`` (every option; readable from a TOML or YAML file, saved in the
run), the run directory, the model and optimiser, the learning-rate schedule, checkpoints (written
atomically with optimiser, RNG and data position, for exact resume), then ``train``.

Distributed runs start under ``torchrun``: each rank reads its own part of the data (see
``gpt2.data.ShardLoader``) and DistributedDataParallel averages the gradients (NCCL on GPUs, gloo on
CPUs). With ``--fsdp`` the weights, gradients and optimiser state are sharded over the processes
instead (PyTorch's FSDP2, as torchtitan), for models that do not fit one GPU; checkpoints gather them
into the same files. Rank 0 writes the run directory, which must be on a file system every rank sees
for ``--resume``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from gpt2 import checkpoints
from gpt2.api import GPT2
from gpt2.atomic import replace_dir, write_atomic
from gpt2.config import GPT2_VOCAB_SIZE, GPT2Config, read_settings
from gpt2.data import ShardLoader, find_shards
from gpt2.errors import UserError
from gpt2.metrics import MetricsLog, plot_metrics, truncate_metrics
from gpt2.sampling import generate_text
from gpt2.tokenizer import Tokenizer, find_tokenizer_files

CONFIG_FILE = "train.toml"  # the effective options of a run, enough to repeat it
LATEST = "latest"  # names the newest complete checkpoint directory (read by gpt2.checkpoints too)
STATE_FILE = "trainer_state.pt"  # optimiser, RNG states, data position, counters
CHECKPOINT_PREFIX = "step_"
TOKENIZER_PROBE = "Hello, world! <|endoftext|> 12345 \n\n  tokenizers must agree"
# Whole tensors (gathered from FSDP shards), on rank 0's CPU: what checkpoints hold.
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _option(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Every training option. Field names are the config-file keys and, with dashes, the CLI flags."""

    data: str | None = _option(None, "directory of token shards made by `gpt2 prepare` (or llm.c's)")
    out: str | None = _option(None, "run directory: checkpoints, metrics.jsonl, loss.png, train.toml")
    preset: str | None = _option(None, "model size for a model trained from scratch (see `gpt2 info`)")
    init_from: str | None = _option(None, "fine-tune this model: a Hugging Face-format directory, a run "
                                    "directory or a hub name such as gpt2")
    tokenizer: str | None = _option(None, "tokenizer for shards that have none beside them (llm.c's): "
                                    "a directory of tokenizer files or a .tiktoken file")
    dropout: float | None = _option(None, "dropout rate (default: the preset's or the model's own)")
    seq_len: int | None = _option(None, "tokens per training sequence (default: the model's context)")
    micro_batch: int = _option(8, "sequences per forward pass on each process")
    batch_tokens: int | None = _option(None, "tokens per optimiser step over all processes, reached by "
                                       "gradient accumulation (default: one micro-batch per process)")
    max_steps: int | None = _option(None, "optimiser steps to train for")
    time_limit: float | None = _option(None, "minutes to train for; with --max-steps, whichever ends "
                                       "first (the learning rate decays over the one that ends first)")
    lr: float = _option(6e-4, "peak learning rate")
    min_lr_ratio: float = _option(0.1, "final learning rate as a fraction of the peak")
    warmup_steps: int = _option(100, "steps of linear learning-rate warm-up")
    weight_decay: float = _option(0.1, "AdamW weight decay, applied to weight matrices only")
    beta1: float = _option(0.9, "AdamW beta1")
    beta2: float = _option(0.95, "AdamW beta2")
    grad_clip: float = _option(1.0, "clip the gradient norm to this (0: no clipping)")
    eval_interval: int = _option(250, "steps between validation-loss measurements (0: only at the end)")
    eval_tokens: int = _option(2**17, "validation tokens per measurement (at most the whole split)")
    checkpoint_interval: int = _option(1000, "steps between checkpoints (0: only at the end)")
    keep_checkpoints: int = _option(2, "checkpoints kept in the run directory, newest first (0: all)")
    sample_interval: int = _option(0, "steps between printed samples (0: only at the end)")
    sample_tokens: int = _option(200, "tokens per printed sample (0: no samples)")
    sample_prompt: str = _option("", "text the samples start from (default: a new document)")
    sample_temperature: float = _option(0.8, "sampling temperature of the printed samples")
    sample_top_k: int = _option(40, "sample from the k most likely tokens only")
    log_interval: int = _option(10, "steps between progress lines when the output is not a terminal")
    seed: int = _option(1337, "seed of the initial weights, data order and dropout")
    device: str = _option("auto", "cpu, cuda, cuda:N or auto (cuda when available)")
    dtype: str = _option("auto", "compute precision under autocast: float32, bfloat16 or auto (bfloat16 "
                         "on GPUs and CPUs with AVX512-BF16 or AMX, else float32); weights stay float32")
    compile: bool = _option(False, "compile the model with torch.compile (faster steps, slow start)")
    fsdp: bool = _option(False, "under torchrun, shard the weights, gradients and optimiser state over the "
                         "processes (FSDP) instead of copying them to each (DDP): for models that do not "
                         "fit one GPU; checkpoints are the same")
    resume: bool = _option(False, "continue the run in --out from its latest checkpoint")
    overwrite: bool = _option(False, "replace the run already in --out")

    ACTIONS = ("resume", "overwrite")  # what to do this time, not part of a run's saved config

    def __post_init__(self) -> None:
        for name in ("micro_batch", "eval_tokens"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_interval", "checkpoint_interval", "keep_checkpoints",
                     "sample_interval", "sample_tokens", "log_interval"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("seq_len", "batch_tokens", "max_steps"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        if self.time_limit is not None and self.time_limit <= 0:
            raise UserError(f"time_limit must be a positive number of minutes, got {self.time_limit}")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1:
            raise UserError(f"need lr > 0 and 0 <= min_lr_ratio <= 1, got {self.lr} and {self.min_lr_ratio}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise UserError(f"dtype must be float32, bfloat16 or auto, got {self.dtype!r}")

    def to_toml(self) -> str:
        """The options as TOML (unset ones and the one-time actions left out)."""
        lines = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None and f.name not in self.ACTIONS:
                lines.append(f"{f.name} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return {math.inf: "inf", -math.inf: "-inf"}.get(value, "nan")
    return json.dumps(value)  # strings, ints and floats are spelt the same in JSON and TOML


def _field_types(f: dataclasses.Field) -> tuple[type, ...]:
    names = {"int": int, "float": float, "str": str, "bool": bool, "None": type(None)}
    return tuple(names[n.strip()] for n in str(f.type).split("|"))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The options in a TOML (.toml) or YAML (.yaml, .yml) file, checked against ``TrainConfig``."""
    values = read_settings(path)
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for key, value in values.items():
        if key not in fields:
            raise UserError(f"{path}: unknown option {key!r}; options are: {', '.join(fields)}")
        types = _field_types(fields[key])
        if float in types and isinstance(value, int) and not isinstance(value, bool):
            values[key] = float(value)
        elif not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            names = " or ".join(t.__name__ for t in types if t is not type(None))
            raise UserError(f"{path}: option {key!r} must be {names}, got {value!r}")
    return values


def load_config(config_file: str | Path | None = None, **options: Any) -> TrainConfig:
    """Options from, in increasing priority: a resumed run's saved ``train.toml``, ``config_file``,
    and ``options`` (the command line)."""
    values = read_config_file(config_file) if config_file else {}
    values.update(options)
    if values.get("resume"):
        if not values.get("out"):
            raise UserError("--resume needs the run directory to continue: --out RUN")
        saved = Path(values["out"]) / CONFIG_FILE
        if not saved.is_file():
            raise UserError(f"--resume: {values['out']} holds no checkpoint (no {saved}); drop --resume")
        values = {**read_config_file(saved), **values}
    cfg = TrainConfig(**values)
    if not cfg.data or not cfg.out:
        raise UserError("give the data directory (--data DIR) and the run directory (--out RUN)")
    if (cfg.preset is None) == (cfg.init_from is None):
        raise UserError("give either --preset NAME (train from scratch) or --init-from MODEL (fine-tune)")
    if cfg.max_steps is None and cfg.time_limit is None:
        raise UserError("give --max-steps N or --time-limit MINUTES (or both)")
    return cfg


# ---------------------------------------------------------------------------------------------
# Processes and devices


@dataclass
class Distributed:
    """This process's place in a ``torchrun`` job (rank 0 of 1 without one)."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def init_distributed(device: str) -> Distributed:
    """Join the ``torchrun`` process group when there is one, and pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA GPU is visible; use --device cpu")
        dev = torch.device("cuda", local_rank if world_size > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Distributed(rank, world_size, dev)


def _on_main(env: Distributed, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only; its result, or the UserError it raised, reaches every rank."""
    outcome: list[Any] = [None]
    if env.is_main:
        try:
            outcome = [("ok", fn())]
        except UserError as e:
            outcome = [("error", str(e))]
    if env.world_size > 1:
        dist.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if kind == "error":
        raise UserError(value)
    return value


def autocast_dtype(option: str, device: torch.device) -> torch.dtype:
    """bfloat16 where the hardware computes it natively: GPUs, and CPUs with AVX512-BF16 or AMX (about
    1.7x float32's speed on this project's 2-core AVX512-BF16 machine); elsewhere bfloat16 is
    emulated and slower, so float32."""
    if option != "auto":
        return getattr(torch, option)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.bfloat16 if native else torch.float32


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 8192, repeats: int = 20) -> float:
    """FLOP/s of a large square matmul: the peak that MFU is measured against."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def flops_per_token(config: GPT2Config, seq_len: int) -> float:
    """Training FLOPs per token (PaLM appendix B, as nanoGPT): 6 per weight (wte counted once, as
    it is also the LM head; wpe is a lookup) plus attention's 12 * layers * width * sequence."""
    c = config
    weights = 12 * c.n_layer * c.n_embd**2 + 13 * c.n_layer * c.n_embd + c.vocab_size * c.n_embd
    return 6 * weights + 12 * c.n_layer * c.n_embd * seq_len


# ---------------------------------------------------------------------------------------------
# The run directory


def _open_run_dir(cfg: TrainConfig) -> Path | None:
    """Check (and with --overwrite clear) the run directory; the checkpoint to resume from, if any."""
    run = Path(cfg.out)
    if cfg.resume:
        latest = run / LATEST
        if not latest.is_file():
            raise UserError(f"--resume: {run} holds no checkpoint (no {latest}); start without --resume")
        checkpoint = run / latest.read_text().strip()
        if not (checkpoint / STATE_FILE).is_file():
            raise UserError(f"--resume: {checkpoint} has no {STATE_FILE}; it is not a resumable checkpoint")
        return checkpoint
    if run.is_file():
        raise UserError(f"--out {run} is a file; give a directory")
    if run.is_dir() and any(run.iterdir()):
        if not cfg.overwrite:
            raise UserError(
                f"{run} already holds a run; add --resume to continue it, --overwrite to replace it, "
                "or choose another --out"
            )
        if not any((run / name).exists() for name in (CONFIG_FILE, LATEST, "metrics.jsonl")):
            raise UserError(f"{run} is not empty and holds no training run; --overwrite refuses to clear it")
    return None


def _start_run_dir(cfg: TrainConfig, resume_from: Path | None) -> None:
    """Rank 0: clear an overwritten run or the debris of a killed one, and save the config."""
    run = Path(cfg.out)
    if resume_from is None and run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    for debris in run.glob(".*.tmp*"):  # temporary files and checkpoints of a killed run
        if debris.is_dir():
            shutil.rmtree(debris)
        else:
            debris.unlink()
    write_atomic(run / CONFIG_FILE, lambda tmp: tmp.write_text(cfg.to_toml(), encoding="utf-8"))


# ---------------------------------------------------------------------------------------------
# Model, tokenizer, optimiser, schedule


def _tokenizer_for(cfg: TrainConfig) -> Tokenizer | None:
    """The tokenizer saved beside the shards, else ``--tokenizer``, else none (llm.c's GPT-2 shards)."""
    data = Path(cfg.data)
    if find_tokenizer_files(data):
        return Tokenizer.from_pretrained(data)
    return Tokenizer.load(cfg.tokenizer) if cfg.tokenizer else None


def _same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    return a.n_vocab == b.n_vocab and a.encode(TOKENIZER_PROBE) == b.encode(TOKENIZER_PROBE)


def build_model(cfg: TrainConfig, tokenizer: Tokenizer | None, resume_from: Path | None) -> GPT2:
    """A float32 model from a checkpoint being resumed, a model to fine-tune, or a preset."""
    if resume_from is not None or cfg.init_from:
        model = GPT2.from_pretrained(resume_from or cfg.init_from, dtype=torch.float32)
        theirs = model.tokenizer
        if tokenizer is not None and theirs is not None and not _same_tokenizer(tokenizer, theirs):
            raise UserError(
                f"the data in {cfg.data} was tokenized with another tokenizer than {cfg.init_from}'s; "
                f"prepare it with `gpt2 prepare ... --tokenizer {cfg.init_from}`"
            )
        if cfg.dropout is not None and cfg.dropout != model.config.dropout:
            loaded = model
            model = GPT2(dataclasses.replace(loaded.config, dropout=cfg.dropout))
            model.load_state_dict(loaded.state_dict())
            model.tokenizer = loaded.tokenizer
    else:
        vocab = tokenizer.n_vocab if tokenizer is not None else GPT2_VOCAB_SIZE
        overrides: dict[str, Any] = {"vocab_size": vocab}
        if cfg.dropout is not None:
            overrides["dropout"] = cfg.dropout
        config = GPT2Config.from_preset(cfg.preset, **overrides)
        torch.manual_seed(cfg.seed)  # every rank starts from the same weights
        model = GPT2(config)
    if tokenizer is not None and tokenizer.n_vocab > model.config.vocab_size:
        raise UserError(
            f"the data's tokenizer has {tokenizer.n_vocab} tokens but the model only "
            f"{model.config.vocab_size}; prepare the data with the model's tokenizer"
        )
    model.tokenizer = model.tokenizer or tokenizer
    return model.train()


def shard_model(model: GPT2, device: torch.device, world_size: int) -> None:
    """FSDP2, as torchtitan: each block, then the rest (embeddings, the tied LM head, the final
    LayerNorm) is split over the processes, its shards moved to ``device`` one block at a time, and
    gathered whole only around its own forward and backward."""
    mesh = init_device_mesh(device.type, (world_size,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices and embeddings only (not biases or LayerNorms),
    fused into one kernel on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                             fused=device.type == "cuda")


def learning_rate(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warm-up over ``warmup_steps``, times a cosine decay from the peak to
    ``min_lr_ratio * lr`` over the run's ``progress`` (0 to 1, in steps or time)."""
    warmup = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * warmup * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def _progress(cfg: TrainConfig, step: int, elapsed: float) -> float:
    """How far the run is, 0 to 1: by steps, by time, or by whichever is further along."""
    fractions = [0.0]
    if cfg.max_steps:
        fractions.append(step / cfg.max_steps)
    if cfg.time_limit:
        fractions.append(elapsed / (cfg.time_limit * 60))
    return max(fractions)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(run: Path, step: int, model: GPT2, state: dict[str, Any], keep: int) -> Path:
    """Write ``RUN/step_NNNNNN`` (the model in Hugging Face format, its tokenizer, and ``state``)
    so that a kill at any moment leaves the previous checkpoint loadable: everything goes into a
    temporary directory, is flushed to disk, renamed into place, and only then does ``RUN/latest``
    (itself replaced atomically) name it. Keeps the newest ``keep`` checkpoints (0: all)."""
    name = _checkpoint_name(step)
    final = run / name
    tmp = run / f".{name}.tmp-{secrets.token_hex(4)}"
    checkpoints.save_model(model, tmp, tokenizer=model.tokenizer)
    write_atomic(tmp / STATE_FILE, lambda path: torch.save(state, path))
    # A `final` already there was written by a run killed before `latest` named it: replaced.
    replace_dir(tmp, final)
    write_atomic(run / LATEST, lambda path: path.write_text(name + "\n"))
    if keep:
        for old in sorted(run.glob(f"{CHECKPOINT_PREFIX}[0-9]*"))[:-keep]:
            shutil.rmtree(old)
    return final


def full_model(model: GPT2, sharded: bool, env: Distributed) -> GPT2 | None:
    """The model with all its weights on rank 0, for checkpoints and samples (None on other ranks).
    A sharded (FSDP) model is gathered into a copy in rank 0's CPU memory: every rank must call this."""
    if not sharded:
        return model if env.is_main else None
    weights = get_model_state_dict(model, options=FULL_STATE)
    if not env.is_main:
        return None
    with torch.device("meta"):
        whole = GPT2(model.config)
    whole.load_state_dict(weights, assign=True)
    whole.lm_head.weight = whole.transformer.wte.weight  # gathered as two copies: tie them again
    whole.tokenizer = model.tokenizer
    return whole


def _rng_states(env: Distributed) -> list[dict[str, torch.Tensor]]:
    """Every rank's random-number generator states (dropout draws differ per rank)."""
    mine = {"cpu": torch.get_rng_state()}
    if env.device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(env.device)
    states = [mine]
    if env.world_size > 1:
        states = [None] * env.world_size
        dist.all_gather_object(states, mine)
    return states


def _set_rng_state(states: list[dict[str, torch.Tensor]], env: Distributed, seed: int, step: int) -> None:
    if len(states) == env.world_size:
        torch.set_rng_state(states[env.rank]["cpu"])
        if "cuda" in states[env.rank] and env.device.type == "cuda":
            torch.cuda.set_rng_state(states[env.rank]["cuda"], env.device)
    else:  # resumed on another number of processes: a fresh, still deterministic, stream per rank
        torch.manual_seed(seed + 1_000_003 * step + env.rank)


# ---------------------------------------------------------------------------------------------
# Console output


class Console:
    """Rank 0's output: a progress line (redrawn in place on a terminal, every ``log_interval``
    steps otherwise) and permanent messages."""

    def __init__(self, enabled: bool, log_interval: int) -> None:
        self.enabled = enabled
        self.live = enabled and sys.stdout.isatty()
        self.log_interval = log_interval
        self.pending = False

    def progress(self, step: int, line: str) -> None:
        if not self.enabled:
            return
        if self.live:
            print(f"\r{line}\x1b[K", end="", flush=True)
            self.pending = True
        elif self.log_interval and step % self.log_interval == 0:
            print(line, flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.pending:
            print(flush=True)
            self.pending = False
        print(text, flush=True)


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainResult:
    """What a finished run reached."""

    run_dir: Path
    step: int
    tokens: int
    elapsed: float
    train_loss: float
    val_loss: float | None
    checkpoint: Path | None


@torch.no_grad()
def evaluate(model: nn.Module, loader: ShardLoader, batches: int, device: torch.device,
             autocast: Callable[[], Any], env: Distributed) -> float:
    """Mean loss over the first ``batches`` validation batches of every rank."""
    model.eval()
    loader.reset()
    total = torch.zeros((), device=device, dtype=torch.float64)
    for _ in range(batches):
        x, y = (t.to(device) for t in loader.next_batch())
        with autocast():
            logits = model(x)
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    model.train()
    if env.world_size > 1:
        dist.all_reduce(total)
    return (total / (batches * env.world_size)).item()


def sample(model: GPT2, cfg: TrainConfig, autocast: Callable[[], Any], seed: int) -> str:
    """A sample of ``sample_tokens`` from ``sample_prompt``, from its own random stream."""
    assert model.tokenizer is not None
    with autocast():
        (text,) = generate_text(model, model.tokenizer, cfg.sample_prompt, max_new_tokens=cfg.sample_tokens,
                                temperature=cfg.sample_temperature, top_k=cfg.sample_top_k, seed=seed,
                                at_window="slide")
    model.train()
    return cfg.sample_prompt + text


def _gradient_sync(model: nn.Module, sync: bool) -> AbstractContextManager:
    """Average gradients over processes only on the last micro-batch of a step (FSDP then keeps the
    earlier micro-batches' gradients unsharded: one reduce-scatter per step instead of one each)."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
    elif isinstance(model, nn.parallel.DistributedDataParallel) and not sync:
        return model.no_sync()
    return nullcontext()


def train(cfg: TrainConfig) -> TrainResult:
    """Train as ``cfg`` says; see the module docstring. Returns what the run reached."""
    env = init_distributed(cfg.device)
    try:
        return _train(cfg, env)
    finally:
        if env.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, env: Distributed) -> TrainResult:
    run = Path(cfg.out)
    console = Console(env.is_main, cfg.log_interval)
    # Everything a user can get wrong is checked before the run directory is touched.
    train_files = find_shards(cfg.data, "train")
    if not train_files:
        raise UserError(f"{cfg.data} holds no training shards (*train*.bin); make them with `gpt2 prepare`")
    val_files = find_shards(cfg.data, "val")
    tokenizer = _tokenizer_for(cfg)
    resume_from = _on_main(env, lambda: _open_run_dir(cfg))
    model = build_model(cfg, tokenizer, resume_from)
    seq_len = cfg.seq_len or model.config.n_positions
    if seq_len > model.config.n_positions:
        raise UserError(f"--seq-len {seq_len} exceeds the model's context of {model.config.n_positions}")
    micro_tokens = cfg.micro_batch * seq_len * env.world_size
    batch_tokens = cfg.batch_tokens or micro_tokens
    if batch_tokens % micro_tokens:
        raise UserError(
            f"--batch-tokens {batch_tokens} is not a multiple of micro-batch x seq-len x processes = "
            f"{cfg.micro_batch} x {seq_len} x {env.world_size} = {micro_tokens}"
        )
    accum = batch_tokens // micro_tokens
    train_loader = ShardLoader(train_files, cfg.micro_batch, seq_len, rank=env.rank,
                               world_size=env.world_size, seed=cfg.seed)
    val_loader = (ShardLoader(val_files, cfg.micro_batch, seq_len, rank=env.rank,
                              world_size=env.world_size, shuffle=False) if val_files else None)
    eval_batches = 0
    if val_loader is not None:
        per_batch = cfg.micro_batch * env.world_size
        eval_batches = max(1, min(math.ceil(cfg.eval_tokens / (per_batch * seq_len)),
                                  val_loader.num_samples // per_batch))
    _on_main(env, lambda: _start_run_dir(cfg, resume_from))

    # Model on the device, wrapped for several processes, then the optimiser over its parameters.
    device = env.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    raw_model = model  # the GPT2 itself, under any wrapper (FSDP shards it in place)
    sharded = cfg.fsdp and env.world_size > 1
    if sharded:
        shard_model(model, device, env.world_size)
    else:
        model.to(device)
        if env.world_size > 1:
            ids = [device.index] if device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(raw_model, device_ids=ids)
    optimizer = build_optimizer(model, cfg, device)
    step, tokens, elapsed_before = 0, 0, 0.0
    if resume_from is not None:
        state = torch.load(resume_from / STATE_FILE, map_location="cpu", weights_only=True)
        # Keyed by parameter name, whole tensors: the same file for 1 process, DDP and FSDP.
        set_optimizer_state_dict(raw_model, optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        train_loader.load_state_dict(state["data"])
        step, tokens, elapsed_before = state["step"], state["tokens"], state["elapsed"]
        _set_rng_state(state["rng"], env, cfg.seed, step)
        if env.is_main:
            truncate_metrics(run, step)
    else:
        torch.manual_seed(cfg.seed + env.rank)
    wrapped = model  # DDP's no_sync lives on the wrapper, not on a compiled model
    if cfg.compile:
        model = torch.compile(model)

    dtype = autocast_dtype(cfg.dtype, device)

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()

    peak = measure_matmul_flops(device, dtype) if device.type == "cuda" else None
    flops_token = flops_per_token(raw_model.config, seq_len)
    metrics = MetricsLog(run) if env.is_main else None
    can_sample = raw_model.tokenizer is not None and cfg.sample_tokens > 0

    def write_checkpoint() -> None:
        whole = full_model(raw_model, sharded, env)
        state = {"step": step, "tokens": tokens, "elapsed": elapsed, "data": train_loader.state_dict(),
                 "rng": _rng_states(env), "world_size": env.world_size,
                 "optimizer": get_optimizer_state_dict(raw_model, optimizer, options=FULL_STATE)}
        if whole is not None:
            path = save_checkpoint(run, step, whole, state, cfg.keep_checkpoints)
            console.message(f"checkpoint {path}")
        env.barrier()

    def show_sample(title: str) -> None:
        whole = full_model(raw_model, sharded, env)
        if whole is not None:
            console.message(f"--- {title} ---\n{sample(whole, cfg, autocast, cfg.seed)}\n---")

    console.message(
        f"training {raw_model.num_parameters():,} parameters on {env.world_size} x {device} "
        f"({str(dtype).removeprefix('torch.')}{', sharded by FSDP' if sharded else ''}): "
        f"{batch_tokens:,} tokens per step = {cfg.micro_batch} x {seq_len} x {env.world_size} process(es) "
        f"x {accum} accumulation; "
        f"{train_loader.num_tokens:,} training tokens" + (f", resuming at step {step}" if resume_from else "")
    )
    start = time.monotonic()
    elapsed = elapsed_before
    loss_value, val_loss, last_eval_step = math.nan, None, -1
    saved_step = step if resume_from is not None else -1
    step_time: float | None = None  # moving average of the seconds per step
    while True:
        elapsed = elapsed_before + time.monotonic() - start
        if cfg.time_limit and env.world_size > 1:  # every rank must stop at the same step
            shared = torch.tensor([elapsed], dtype=torch.float64, device=device)
            dist.broadcast(shared, src=0)
            elapsed = shared.item()
        if (cfg.max_steps and step >= cfg.max_steps) or (cfg.time_limit and elapsed >= cfg.time_limit * 60):
            break
        lr = learning_rate(cfg, step, _progress(cfg, step, elapsed))
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            x, y = (t.to(device, non_blocking=True) for t in train_loader.next_batch())
            with _gradient_sync(wrapped, micro == accum - 1):
                with autocast():
                    logits = model(x)
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten()) / accum
                loss.backward()
            loss_sum += loss.detach()
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if env.world_size > 1:
            dist.all_reduce(loss_sum)
            loss_sum /= env.world_size
        loss_value = loss_sum.item()  # waits for the GPU: the step's time is real
        dt = time.perf_counter() - t0
        step_time = dt if step_time is None else 0.9 * step_time + 0.1 * dt
        step += 1
        tokens += batch_tokens
        elapsed = elapsed_before + time.monotonic() - start
        if not math.isfinite(loss_value):
            raise UserError(f"the loss became {loss_value} at step {step}; lower --lr or keep --grad-clip")
        if env.is_main:
            record = _step_record(step, loss_value, lr, tokens, elapsed, batch_tokens / step_time, grad_norm,
                                  peak and batch_tokens * flops_token / (step_time * peak * env.world_size))
            assert metrics is not None
            metrics.write(record)
            console.progress(step, _progress_line(cfg, record, _remaining(cfg, step, elapsed, step_time)))
        if val_loader is not None and cfg.eval_interval and step % cfg.eval_interval == 0:
            val_loss = evaluate(model, val_loader, eval_batches, device, autocast, env)
            last_eval_step = step
            console.message(f"step {step}: validation loss {val_loss:.4f}")
            if metrics:
                metrics.write({"step": step, "val_loss": val_loss})
        if can_sample and cfg.sample_interval and step % cfg.sample_interval == 0:
            show_sample(f"sample at step {step}")
        if cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0:
            write_checkpoint()
            saved_step = step

    # The end: validation, checkpoint, samples, plot and summary.
    if val_loader is not None and last_eval_step != step:
        val_loss = evaluate(model, val_loader, eval_batches, device, autocast, env)
        if metrics:
            metrics.write({"step": step, "val_loss": val_loss})
    if step > saved_step:
        write_checkpoint()
        saved_step = step
    last_checkpoint = run / _checkpoint_name(saved_step) if saved_step >= 0 else None
    if metrics:
        metrics.close()
    result = TrainResult(run, step, tokens, elapsed, loss_value, val_loss, last_checkpoint)
    if can_sample:
        show_sample("sample")
    if env.is_main:
        plot = plot_metrics(run)
        console.message(_summary(result, plot))
    return result


def _checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:06d}"


def _step_record(step: int, loss: float, lr: float, tokens: int, elapsed: float, tokens_per_s: float,
                 grad_norm: torch.Tensor | None, mfu: float | None) -> dict[str, Any]:
    record: dict[str, Any] = {"step": step, "loss": loss, "lr": lr, "tokens": tokens,
                              "elapsed": round(elapsed, 3), "tokens_per_s": round(tokens_per_s, 1)}
    if grad_norm is not None:
        record["grad_norm"] = round(float(grad_norm), 5)
    if mfu:
        record["mfu"] = round(mfu, 4)
    return record


def _progress_line(cfg: TrainConfig, record: dict[str, Any], remaining: float) -> str:
    """``step 120/2000 | loss 3.2145 | lr 5.98e-04 | 45.2k tok/s | MFU 41.2% | ETA 3m12s``"""
    steps = f"{record['step']:>6}" + (f"/{cfg.max_steps}" if cfg.max_steps else "")
    line = (f"step {steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
            f"{record['tokens_per_s'] / 1000:,.1f}k tok/s")
    if "mfu" in record:
        line += f" | MFU {record['mfu']:.1%}"
    return line + f" | ETA {_duration(remaining)}"


def _remaining(cfg: TrainConfig, step: int, elapsed: float, step_time: float) -> float:
    """Seconds left: by steps at the current speed, or by the time limit, whichever is sooner."""
    left = [math.inf]
    if cfg.max_steps:
        left.append((cfg.max_steps - step) * step_time)
    if cfg.time_limit:
        left.append(cfg.time_limit * 60 - elapsed)
    return min(left)


def _summary(result: TrainResult, plot: Path) -> str:
    rate = result.tokens / result.elapsed if result.elapsed else 0.0
    val = f"{result.val_loss:.4f}" if result.val_loss is not None else "not measured (no validation shards)"
    return "\n".join([
        f"done: {result.step:,} steps, {result.tokens:,} tokens in {_duration(result.elapsed)} "
        f"({rate / 1000:,.1f}k tokens/s)",
        f"final train loss {result.train_loss:.4f}, validation loss {val}",
        f"checkpoint {result.checkpoint} (load it with GPT2.from_pretrained({str(result.run_dir)!r}))",
        f"loss curve {plot}",
    ])
