"""Training a GPT-2, from shards to checkpoints: nanoGPT's and llm.c's loop as a resumable tool.

The options are ``gpt2.training.config.TrainConfig`` (readable from a TOML or YAML file, saved in the
run). Read top to bottom: processes and devices, the run directory, the model, optimiser and
learning-rate schedule, checkpoint files (written atomically, for exact resume), the console; then
the run itself, in the shape of litgpt's ``pretrain.py``: one ``TrainState`` holds everything a run
has, ``setup`` builds it (resuming from a checkpoint with ``--resume``), ``train_step`` does one
optimiser step, ``validate`` and ``show_sample`` measure and print, ``write_checkpoint`` and
``resume`` save and restore the state's progress (step, tokens, time, data position, RNG,
optimiser: ``state_dict`` / ``load_state_dict``, as nanochat's checkpoint manager), ``fit`` is the
loop and ``finish`` the end; ``train`` runs ``setup``, ``fit`` and ``finish``.

Distributed runs start under ``torchrun``: each rank reads its own part of the data (see
``gpt2.data.loader.ShardLoader``) and DistributedDataParallel averages the gradients (NCCL on GPUs, gloo on
CPUs). With ``--fsdp`` the weights, gradients and optimiser state are sharded over the processes
instead (PyTorch's FSDP2, as torchtitan), for models that do not fit one GPU; checkpoints gather them
into the same files. Rank 0 writes the run directory, which must be on a file system every rank sees
for ``--resume``.

With ``--distill-from`` a frozen teacher (``load_teacher``) runs beside the model on every process,
and each micro-batch's loss is the distillation loss (``gpt2.loss.distillation_loss``), given the
teacher's final hidden states through the model's forward as its targets (``SoftTargets``), so that
DDP, FSDP and ``torch.compile`` see one ordinary forward pass.
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
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
from gpt2.adapters import lora
from gpt2.api import GPT2
from gpt2.checkpoints import LATEST, find_adapter
from gpt2.config import GPT2_VOCAB_SIZE, GPT2Config
from gpt2.data.chat import read_chat_info
from gpt2.data.loader import Batch, ShardLoader
from gpt2.data.shards import find_shards
from gpt2.generation.config import GenerationConfig
from gpt2.generation.sampling import generate_text
from gpt2.inference.load import check_device, default_device
from gpt2.loss import IGNORE, SoftTargets
from gpt2.tokenizer.bpe import Tokenizer, find_tokenizer_files
from gpt2.training.config import CONFIG_FILE, TrainConfig
from gpt2.training.metrics import METRICS_FILE, MetricsLog, plot_metrics, truncate_metrics
from gpt2.training.optimizers import (
    build_optimizers,
    decay_started,
    lr_factor,
    muon_parameters,
    set_learning_rates,
)
from gpt2.util.atomic import check_apart, followed, replace_dir, write_atomic
from gpt2.util.errors import UserError
from gpt2.util.memory import check_fits, physical_memory

STATE_FILE = "trainer_state.pt"  # in a checkpoint: TrainState's progress (see state_dict)
# In the checkpoint taken as a wsd run's decay begins: the one to extend the run from, never pruned.
DECAY_START_FILE = "decay_start"
STATE_KEYS = ("step", "tokens", "elapsed", "data", "rng", "optimizer")
CHECKPOINT_PREFIX = "step_"
TOKENIZER_PROBE = "Hello, world! <|endoftext|> 12345 \n\n  tokenizers must agree"
# Whole tensors (gathered from FSDP shards), on rank 0's CPU: what checkpoints hold.
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


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
    dev = check_device(default_device() if device == "auto" else device)
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device {device}: training runs on cpu or cuda only")
    if dev.type == "cuda":
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
    """bfloat16 where the hardware computes it natively: GPUs, and CPUs with AVX512-BF16 or AMX (faster
    than float32 there); elsewhere bfloat16 is emulated and slower, so float32."""
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
    weights = c.num_parameters() - (c.n_positions + 2) * c.n_embd  # less wpe and the final LayerNorm
    return 6 * weights + 12 * c.n_layer * c.n_embd * seq_len


# ---------------------------------------------------------------------------------------------
# The run directory


def _open_run_dir(cfg: TrainConfig) -> Path | None:
    """Check (and with --overwrite clear) the run directory; the checkpoint to resume from, if any."""
    run = Path(cfg.out)
    check_apart(run, {"--data": cfg.data, "--init-from": cfg.init_from, "--tokenizer": cfg.tokenizer,
                      "--distill-from": cfg.distill_from})
    if cfg.resume:
        checkpoint = checkpoints.latest_checkpoint(run)
        if checkpoint is None:
            latest = run / LATEST
            raise UserError(f"--resume: {run} holds no checkpoint (no {latest}); start without --resume")
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
        if not any((run / name).exists() for name in (CONFIG_FILE, LATEST, METRICS_FILE)):
            raise UserError(f"{run} is not empty and holds no training run; --overwrite refuses to clear it")
    return None


def _start_run_dir(cfg: TrainConfig, resume_from: Path | None) -> None:
    """Rank 0: clear an overwritten run or the debris of a killed one, and save the config. A run
    directory that is a symbolic link: the directory it names is cleared, and the link kept."""
    run = followed(Path(cfg.out))
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


def _model_tokenizer(data: Tokenizer | None, checkpoint: Tokenizer | None) -> Tokenizer | None:
    """The tokenizer a model trained on ``data``'s tokens keeps: the data's when it has a chat template
    (the same ids, checked, and the template the data was made with), else the checkpoint's."""
    if data is not None and data.chat_template is not None:
        return data
    return checkpoint or data


def build_model(cfg: TrainConfig, tokenizer: Tokenizer | None, resume_from: Path | None) -> GPT2:
    """A float32 model from a checkpoint being resumed, a model to fine-tune, or a preset; with
    ``lora_rank``, the model to fine-tune frozen under a LoRA adapter (a LoRA checkpoint being resumed
    holds the adapter alone: its base is ``init_from`` again)."""
    adapter = resume_from if resume_from is not None and find_adapter(resume_from) else None
    if cfg.init_from and find_adapter(cfg.init_from):
        raise UserError(f"--init-from {cfg.init_from} is a LoRA adapter, not a model; fold it into its base "
                        f"first (gpt2 merge --adapter {cfg.init_from} --out DIR) and fine-tune DIR")
    if resume_from is not None or cfg.init_from:
        source = cfg.init_from if adapter is not None else resume_from or cfg.init_from
        directory = checkpoints.resolve(source)
        theirs = checkpoints.read_tokenizer(directory)
        if tokenizer is not None and theirs is not None and not _same_tokenizer(tokenizer, theirs):
            raise UserError(
                f"the data in {cfg.data} was tokenized with another tokenizer than {cfg.init_from}'s; "
                f"prepare it with `gpt2 prepare ... --tokenizer {cfg.init_from}`"
            )
        model = GPT2.from_pretrained(directory, dtype=torch.float32,
                                     tokenizer=_model_tokenizer(tokenizer, theirs))
        if cfg.dropout is not None and cfg.dropout != model.config.dropout:
            model.set_dropout(cfg.dropout)
    else:
        vocab = tokenizer.n_vocab if tokenizer is not None else GPT2_VOCAB_SIZE
        overrides: dict[str, Any] = {"vocab_size": vocab}
        if cfg.dropout is not None:
            overrides["dropout"] = cfg.dropout
        config = GPT2Config.from_preset(cfg.preset, **overrides)
        torch.manual_seed(cfg.seed)  # every rank starts from the same weights
        model = GPT2(config, tokenizer=tokenizer)
    if tokenizer is not None and tokenizer.n_vocab > model.config.vocab_size:
        raise UserError(
            f"the data's tokenizer has {tokenizer.n_vocab} tokens but the model only "
            f"{model.config.vocab_size}; prepare the data with the model's tokenizer"
        )
    if adapter is not None:
        lora.load_adapter(model, adapter)
    elif cfg.lora_rank is not None:
        assert cfg.init_from is not None  # (TrainConfig and load_config see to it)
        local = Path(cfg.init_from).expanduser()
        is_local = (local / checkpoints.CONFIG).is_file() or (local / LATEST).is_file()
        base = str(checkpoints.resolve(local).resolve()) if is_local else cfg.init_from  # for peft too
        targets = tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip())
        config = lora.LoRAConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha or lora.DEFAULT_ALPHA,
                                 dropout=cfg.lora_dropout, targets=targets, base_model=base)
        torch.manual_seed(cfg.seed)  # the same adapter on every rank
        lora.add_lora(model, config)
    return model.train()


def load_teacher(cfg: TrainConfig, student: GPT2, data: Tokenizer | None, seq_len: int,
                 device: torch.device) -> GPT2 | None:
    """The ``distill_from`` model (None without one), frozen, in eval mode (no dropout) and whole on
    ``device`` (on every process, beside a sharded student too). It must give its distribution over
    the student's tokens (the same vocabulary and tokenizer) and see the whole sequence (its context
    at least ``seq_len``)."""
    if cfg.distill_from is None:
        return None
    name = cfg.distill_from
    if find_adapter(name):
        raise UserError(f"--distill-from {name} is a LoRA adapter, not a model; fold it into its base first "
                        f"(gpt2 merge --adapter {name} --out DIR) and distil from DIR")
    teacher = GPT2.from_pretrained(checkpoints.resolve(name), dtype=torch.float32)
    ours, theirs = student.tokenizer or data, teacher.tokenizer
    fix = (f"distil from a model that uses the student's tokenizer, or prepare the data with the teacher's "
           f"(`gpt2 prepare ... --tokenizer {name}`) and train the student on it")
    vocab, context = teacher.config.vocab_size, teacher.config.n_positions
    if vocab != student.config.vocab_size:
        raise UserError(f"--distill-from {name} has a vocabulary of {vocab} tokens but the student "
                        f"{student.config.vocab_size}: a teacher must share the student's tokenizer; {fix}")
    if ours is not None and theirs is not None and not _same_tokenizer(ours, theirs):
        raise UserError(f"--distill-from {name} has another tokenizer than the student's (the same number of "
                        f"tokens, other ids): its distribution is over other tokens; {fix}")
    if context < seq_len:
        raise UserError(f"--distill-from {name} has a context of {context} tokens, shorter than the training "
                        f"sequences of {seq_len}; train with --seq-len {context} or less, or distil from a "
                        "teacher with a longer context")
    teacher.requires_grad_(False)
    return teacher.eval().to(device)


def teacher_hidden(teacher: GPT2, batch: Batch) -> torch.Tensor:
    """The teacher's final hidden states for ``batch`` (B, T, C), without gradients: its forward pass
    short of the LM head, whose product the loss makes a chunk of positions at a time
    (``gpt2.loss.distillation_loss``), as the model's forward does given targets."""
    with torch.no_grad():
        if batch.segments is not None:
            return teacher._hidden_packed(batch.inputs, batch.segments)
        return teacher._hidden(batch.inputs, cache=None, attention_mask=None, last_only=False)


def shard_model(model: GPT2, device: torch.device, world_size: int) -> None:
    """FSDP2, as torchtitan: each block, then the rest (embeddings, the tied LM head, the final
    LayerNorm) is split over the processes, its shards moved to ``device`` one block at a time, and
    gathered whole only around its own forward and backward."""
    mesh = init_device_mesh(device.type, (world_size,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _progress(cfg: TrainConfig, step: int, elapsed: float) -> float:
    """How far the run is, 0 to 1: by steps, by time, or by whichever is further along."""
    fractions = [0.0]
    if cfg.max_steps:
        fractions.append(step / cfg.max_steps)
    if cfg.time_limit:
        fractions.append(elapsed / (cfg.time_limit * 60))
    return max(fractions)


# ---------------------------------------------------------------------------------------------
# Checkpoint files


def save_checkpoint(run: Path, step: int, model: GPT2, state: dict[str, Any], keep: int) -> Path:
    """Write ``RUN/step_NNNNNN`` (the model in Hugging Face format, or a LoRA run's adapter in peft's,
    its tokenizer, and ``state``) so that a kill at any moment leaves the previous checkpoint
    loadable: everything goes into a temporary directory, is flushed to disk, renamed into place, and
    only then does ``RUN/latest`` (itself replaced atomically) name it. Keeps the newest ``keep``
    checkpoints (0: all)."""
    name = _checkpoint_name(step)
    final = run / name
    tmp = run / f".{name}.tmp-{secrets.token_hex(4)}"
    # Room first: a disk that holds ``keep`` checkpoints can then write the next one.
    if keep:
        _prune_checkpoints(run, keep - 1)
    try:
        if lora.lora_config_of(model) is not None:  # the base is --init-from, unchanged
            lora.save_adapter(model, tmp)
            if model.tokenizer is not None:
                model.tokenizer.save_pretrained(tmp)
        else:
            checkpoints.save_model(model, tmp, tokenizer=model.tokenizer)
        write_atomic(tmp / STATE_FILE, lambda path: torch.save(state, path))
        # A `final` already there was written by a run killed before `latest` named it: replaced.
        replace_dir(tmp, final)
        checkpoints.write_latest(run, name)
    except checkpoints.WRITE_ERRORS as e:
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(run).free / 1e6
        raise UserError(
            f"cannot write checkpoint {final} ({checkpoints.write_failure(e)}; {free:,.1f} MB free there); "
            f"free space in {run} (or lower --keep-checkpoints) and continue the run with --resume"
        ) from None
    if keep:
        _prune_checkpoints(run, keep)
    return final


def _prune_checkpoints(run: Path, keep: int) -> None:
    """Remove the oldest checkpoints until the newest ``keep`` are left, never the one that ``latest``
    names nor the one taken as a wsd run's decay began."""
    latest = checkpoints.latest_checkpoint(run)
    found = [c for c in sorted(run.glob(f"{CHECKPOINT_PREFIX}[0-9]*")) if not (c / DECAY_START_FILE).exists()]
    for old in found[: max(0, len(found) - keep)]:
        if old != latest:
            shutil.rmtree(old)


def full_model(model: GPT2, sharded: bool, env: Distributed) -> GPT2 | None:
    """The model with all its weights on rank 0, for checkpoints and samples (None on other ranks).
    A sharded (FSDP) model is gathered into a copy in rank 0's CPU memory: every rank must call this."""
    if not sharded:
        return model if env.is_main else None
    weights = get_model_state_dict(model, options=FULL_STATE)
    if not env.is_main:
        return None
    with torch.device("meta"):
        whole = GPT2(model.config, tokenizer=model.tokenizer)
    adapter = lora.lora_config_of(model)
    if adapter is not None:
        lora.add_lora(whole, adapter)  # on the meta device too: the gathered tensors fill both
    whole.load_state_dict(weights, assign=True)
    whole.lm_head.weight = whole.transformer.wte.weight  # gathered as two copies: tie them again
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
# The run's state, and setting it up


@dataclass
class TrainState:
    """Everything a run holds. Set up once: the options, processes, model (with its wrappers),
    optimiser, data and sizes. Changed by every step: the progress below, which a checkpoint saves
    (``state_dict``) and ``resume`` restores, then what this session measured."""

    cfg: TrainConfig
    env: Distributed
    run_dir: Path
    console: Console
    model: GPT2  # the GPT2 itself; FSDP shards it in place
    parallel: nn.Module  # DistributedDataParallel(model) over several processes, else the model itself
    compiled: nn.Module  # torch.compile(parallel) with --compile, else parallel: what the steps run
    sharded: bool  # by FSDP over the processes
    optimizers: list[torch.optim.Optimizer]  # AdamW, and Muon with --optimizer muon
    train_loader: ShardLoader
    val_loader: ShardLoader | None
    dtype: torch.dtype  # of the computations under autocast
    seq_len: int
    batch_tokens: int  # per optimiser step, over all processes
    accum: int  # micro-batches per optimiser step and process
    eval_batches: int  # validation batches per measurement and process
    flops_per_token: float
    teacher: GPT2 | None = None  # with --distill-from: the frozen model the student learns from
    peak_flops: float | None = None  # of one GPU's matmuls, for MFU; None on CPUs
    metrics: MetricsLog | None = None  # rank 0's metrics.jsonl
    resumed_from: Path | None = None  # the checkpoint this session started from
    # Progress, saved in checkpoints.
    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0  # seconds of training, all sessions of the run together
    # This session.
    started: float = 0.0  # time.monotonic() when its loop began...
    elapsed_before: float = 0.0  # ...and ``elapsed`` then
    loss: float = math.nan  # training loss of the last step (the data's cross-entropy)...
    soft_loss: float | None = None  # ...and, distilling, its soft loss (T^2 x KL from the teacher)
    val_loss: float | None = None
    last_eval_step: int = -1
    saved_step: int = -1  # of the newest checkpoint (-1: none)
    step_time: float | None = None  # moving average of the seconds per step
    decaying: bool = False  # the learning rate is in its final decay

    @property
    def can_sample(self) -> bool:
        return self.model.tokenizer is not None and self.cfg.sample_tokens > 0


def setup(cfg: TrainConfig, env: Distributed) -> TrainState:
    """Check everything a user can get wrong before the run directory is touched; then start the
    run directory, place the model and its optimiser, and resume from the latest checkpoint with
    ``--resume``."""
    train_files, val_files = _shards(cfg)
    tokenizer = _tokenizer_for(cfg)
    chat = read_chat_info(cfg.data)
    resume_from = _on_main(env, partial(_open_run_dir, cfg))
    saved = read_trainer_state(resume_from) if resume_from is not None else None
    model = build_model(cfg, tokenizer, resume_from)
    seq_len, batch_tokens, accum = _batch_shape(cfg, env, model.config, chat and chat["seq_len"])
    check_memory(cfg.micro_batch, seq_len, model.config, env.device)
    teacher = load_teacher(cfg, model, tokenizer, seq_len, env.device)
    train_loader = ShardLoader(train_files, cfg.micro_batch, seq_len, rank=env.rank,
                               world_size=env.world_size, seed=cfg.seed, masked=chat is not None)
    val_loader = (ShardLoader(val_files, cfg.micro_batch, seq_len, rank=env.rank, world_size=env.world_size,
                              shuffle=False, masked=chat is not None) if val_files else None)
    for loader in (train_loader, val_loader):
        if loader is not None:
            loader.check_vocab(model.config.vocab_size)
    _on_main(env, partial(_start_run_dir, cfg, resume_from))
    sharded = cfg.fsdp and env.world_size > 1
    parallel = place_model(model, sharded, env)
    state = TrainState(
        cfg=cfg, env=env, run_dir=Path(cfg.out), console=Console(env.is_main, cfg.log_interval),
        model=model, parallel=parallel, compiled=parallel, sharded=sharded,
        optimizers=build_optimizers(model, cfg, env.device), train_loader=train_loader,
        val_loader=val_loader, dtype=autocast_dtype(cfg.dtype, env.device), seq_len=seq_len,
        batch_tokens=batch_tokens, accum=accum, eval_batches=_eval_batches(cfg, env, val_loader, seq_len),
        flops_per_token=flops_per_token(model.config, seq_len) + (
            flops_per_token(teacher.config, seq_len) / 3 if teacher is not None else 0.0),  # its forward
        teacher=teacher,
    )
    if resume_from is not None and saved is not None:
        resume(state, resume_from, saved)
    else:
        torch.manual_seed(cfg.seed + env.rank)
    if cfg.compile:
        state.compiled = torch.compile(parallel)
    if env.device.type == "cuda":  # after the seeding: it draws random matrices
        state.peak_flops = measure_matmul_flops(env.device, state.dtype)
    if env.is_main:
        state.metrics = MetricsLog(state.run_dir)
    return state


def _shards(cfg: TrainConfig) -> tuple[list[Path], list[Path]]:
    """The training shards (there must be some) and the validation shards (there may be none)."""
    train_files = find_shards(cfg.data, "train")
    if not train_files:
        raise UserError(f"{cfg.data} holds no training shards (*train*.bin); make them with `gpt2 prepare`")
    return train_files, find_shards(cfg.data, "val")


def _batch_shape(
    cfg: TrainConfig, env: Distributed, config: GPT2Config, packed: int | None
) -> tuple[int, int, int]:
    """Tokens per sequence, tokens per optimiser step, and micro-batches per step and process.
    ``packed``: the window length of chat data, which the sequences must have."""
    if packed and cfg.seq_len not in (None, packed):
        raise UserError(f"{cfg.data} holds chat examples packed in windows of {packed} tokens; train with "
                        f"--seq-len {packed} or prepare the data again with --seq-len {cfg.seq_len}")
    seq_len = cfg.seq_len or packed or config.n_positions
    if seq_len > config.n_positions:
        raise UserError(f"--seq-len {seq_len} exceeds the model's context of {config.n_positions}")
    micro_tokens = cfg.micro_batch * seq_len * env.world_size
    batch_tokens = cfg.batch_tokens or micro_tokens
    if batch_tokens % micro_tokens:
        raise UserError(
            f"--batch-tokens {batch_tokens} is not a multiple of micro-batch x seq-len x processes = "
            f"{cfg.micro_batch} x {seq_len} x {env.world_size} = {micro_tokens}"
        )
    return seq_len, batch_tokens, batch_tokens // micro_tokens


def check_memory(micro_batch: int, seq_len: int, config: GPT2Config, device: torch.device) -> None:
    """Refuse a micro-batch whose activations alone (a rough estimate: per token and layer about 34
    widths plus 5 attention rows per head, in float32; the logits are computed a chunk at a time)
    exceed the device's memory."""
    c = config
    per_sequence = seq_len * c.n_layer * (34 * c.n_embd + 5 * c.n_head * seq_len) * 4
    gpu = device.type == "cuda"
    total = torch.cuda.get_device_properties(device).total_memory if gpu else physical_memory()
    fits = max(1, (total or 0) // per_sequence // 2)
    check_fits(micro_batch * per_sequence, f"the activations of --micro-batch {micro_batch}",
               f"use --micro-batch {fits} or less, and --batch-tokens for the step size",
               total=total, where=str(device) if gpu else "this machine")


def _eval_batches(cfg: TrainConfig, env: Distributed, val_loader: ShardLoader | None, seq_len: int) -> int:
    """Validation batches per measurement: ``eval_tokens`` worth, at most the whole split."""
    if val_loader is None:
        return 0
    per_batch = cfg.micro_batch * env.world_size
    wanted = math.ceil(cfg.eval_tokens / (per_batch * seq_len))
    return max(1, min(wanted, val_loader.num_samples // per_batch))


def place_model(model: GPT2, sharded: bool, env: Distributed) -> nn.Module:
    """Put the model on this process's device: sharded over the processes (FSDP), or whole and
    wrapped in DistributedDataParallel over several. Returns what the gradients synchronise through:
    the DDP wrapper, else the model itself."""
    device = env.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if sharded:
        shard_model(model, device, env.world_size)
        return model
    model.to(device)
    if env.world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return model


# ---------------------------------------------------------------------------------------------
# One optimiser step, validation and samples


def autocast(state: TrainState) -> AbstractContextManager:
    """Autocast to the run's compute dtype (nothing to do for float32)."""
    if state.dtype == torch.float32:
        return nullcontext()
    return torch.autocast(state.env.device.type, dtype=state.dtype)


def train_step(state: TrainState) -> None:
    """One optimiser step at the scheduled learning rate; then the progress and rank 0's log."""
    cfg, env = state.cfg, state.env
    factor = lr_factor(cfg, state.step, _progress(cfg, state.step, state.elapsed))
    set_learning_rates(state.optimizers, factor)
    t0 = time.perf_counter()
    loss_sums = _accumulate_gradients(state)
    grad_norm = None
    if cfg.grad_clip:
        grad_norm = nn.utils.clip_grad_norm_(state.compiled.parameters(), cfg.grad_clip)
    for optimizer in state.optimizers:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if env.world_size > 1:
        dist.all_reduce(loss_sums)
        loss_sums /= env.world_size
    losses = loss_sums.tolist()  # waits for the GPU: the step's time is real
    state.loss, state.soft_loss = losses[0], losses[1] if len(losses) > 1 else None
    dt = time.perf_counter() - t0
    state.step_time = dt if state.step_time is None else 0.9 * state.step_time + 0.1 * dt
    state.step += 1
    state.tokens += state.batch_tokens
    state.elapsed = _elapsed(state)
    for loss in losses:
        if not math.isfinite(loss):
            raise UserError(f"the loss became {loss} at step {state.step}; lower --lr or keep --grad-clip")
    if env.is_main:
        _log_step(state, cfg.lr * factor, grad_norm)


def _accumulate_gradients(state: TrainState) -> torch.Tensor:
    """Forward and backward passes over ``accum`` micro-batches, the gradients averaged over the
    processes on the last one only; this process's share of the step's loss: the data's
    cross-entropy, and distilling, the soft loss after it. A loss is the mean over the step's trained
    targets, all micro-batches and processes together (chat data trains only some: each micro-batch
    weighs by the targets it has)."""
    device, world_size = state.env.device, state.env.world_size
    batches = [_on_device(state.train_loader.next_batch(), device) for _ in range(state.accum)]
    targets = torch.stack([(b.targets != IGNORE).sum() for b in batches]).sum()
    if world_size > 1:
        dist.all_reduce(targets)
    scale = world_size / targets.clamp(min=1)  # DDP and FSDP average the processes' gradients
    loss_sums = torch.zeros(1 if state.teacher is None else 2, device=device)
    for micro, batch in enumerate(batches):
        with _gradient_sync(state.parallel, micro == state.accum - 1):
            loss, measured = _training_loss(state, batch)
            loss = loss * scale
            loss.backward()
        loss_sums += measured * scale
    return loss_sums


def _on_device(batch: Batch, device: torch.device) -> Batch:
    return Batch(*(t if t is None else t.to(device, non_blocking=True) for t in batch))


def _loss(state: TrainState, batch: Batch) -> torch.Tensor:
    """The summed cross-entropy of ``batch``'s trained targets under the model the steps run
    (computed in chunks of positions: the batch's logits are never all held, ``gpt2.loss``)."""
    with autocast(state):
        return state.compiled(batch.inputs, segments=batch.segments, targets=batch.targets)


def _training_loss(state: TrainState, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed loss that ``batch`` trains (``_loss``'s cross-entropy; distilling, the mix of the
    soft and hard losses that ``--distill-weight`` sets), and what it measures for the log, without
    gradients: the cross-entropy, and distilling, the soft loss after it."""
    if state.teacher is None:
        loss = _loss(state, batch)
        return loss, loss.detach()[None]
    cfg = state.cfg
    with autocast(state):
        soft = SoftTargets(batch.targets, teacher_hidden(state.teacher, batch), state.teacher.lm_head.weight,
                           cfg.distill_temperature, cfg.distill_weight)
        loss = state.compiled(batch.inputs, segments=batch.segments, targets=soft)
    assert soft.hard is not None and soft.soft is not None  # set by the loss (gpt2.loss.lm_loss)
    return loss, torch.stack([soft.hard, soft.soft]).float()


def _gradient_sync(model: nn.Module, sync: bool) -> AbstractContextManager:
    """Average gradients over processes only on the last micro-batch of a step (FSDP then keeps the
    earlier micro-batches' gradients unsharded: one reduce-scatter per step instead of one each)."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
    elif isinstance(model, nn.parallel.DistributedDataParallel) and not sync:
        return model.no_sync()
    return nullcontext()


def _log_step(state: TrainState, lr: float, grad_norm: torch.Tensor | None) -> None:
    """Rank 0: the step's record in metrics.jsonl and its progress line."""
    assert state.metrics is not None and state.step_time is not None
    peak, world_size = state.peak_flops, state.env.world_size
    mfu = peak and state.batch_tokens * state.flops_per_token / (state.step_time * peak * world_size)
    record = _step_record(state.step, state.loss, lr, state.tokens, state.elapsed,
                          state.batch_tokens / state.step_time, grad_norm, mfu)
    if state.soft_loss is not None:
        record["soft_loss"] = state.soft_loss
    state.metrics.write(record)
    remaining = _remaining(state.cfg, state.step, state.elapsed, state.step_time)
    state.console.progress(state.step, _progress_line(state.cfg, record, remaining))


def _elapsed(state: TrainState, *, shared: bool = False) -> float:
    """Seconds of training, all sessions together. ``shared``: under a time limit, rank 0's clock
    on every rank, so that all stop at the same step."""
    elapsed = state.elapsed_before + time.monotonic() - state.started
    if shared and state.cfg.time_limit and state.env.world_size > 1:
        clock = torch.tensor([elapsed], dtype=torch.float64, device=state.env.device)
        dist.broadcast(clock, src=0)
        elapsed = clock.item()
    return elapsed


@torch.no_grad()
def evaluate(state: TrainState) -> float:
    """Mean loss per trained target over the first ``eval_batches`` validation batches of every rank."""
    model, loader, env = state.compiled, state.val_loader, state.env
    assert loader is not None
    model.eval()
    loader.reset()
    total = torch.zeros(2, device=env.device, dtype=torch.float64)  # loss summed, targets counted
    for _ in range(state.eval_batches):
        batch = _on_device(loader.next_batch(), env.device)
        total[0] += _loss(state, batch)
        total[1] += (batch.targets != IGNORE).sum()
    model.train()
    if env.world_size > 1:
        dist.all_reduce(total)
    return (total[0] / total[1].clamp(min=1)).item()


def validate(state: TrainState, *, announce: bool = True) -> None:
    """Measure the validation loss and log it (``announce``: print it too)."""
    state.val_loss = evaluate(state)
    state.last_eval_step = state.step
    if announce:
        state.console.message(f"step {state.step}: validation loss {state.val_loss:.4f}")
    if state.metrics:
        state.metrics.write({"step": state.step, "val_loss": state.val_loss})


def sample_text(state: TrainState, model: GPT2) -> str:
    """``model``'s continuation of ``sample_prompt`` (``sample_tokens`` long), prompt included,
    from its own random stream."""
    cfg = state.cfg
    assert model.tokenizer is not None
    settings = GenerationConfig(max_new_tokens=cfg.sample_tokens, temperature=cfg.sample_temperature,
                                top_k=cfg.sample_top_k, seed=cfg.seed, at_window="slide")
    with autocast(state):
        (text,) = generate_text(model, model.tokenizer, cfg.sample_prompt, settings)
    model.train()
    return cfg.sample_prompt + text


def show_sample(state: TrainState, title: str) -> None:
    """Print a sample under ``title`` (rank 0; every rank must call this, to gather FSDP shards)."""
    whole = full_model(state.model, state.sharded, state.env)
    if whole is not None:
        state.console.message(f"--- {title} ---\n{sample_text(state, whole)}\n---")


# ---------------------------------------------------------------------------------------------
# Saving and restoring the state


def state_dict(state: TrainState) -> dict[str, Any]:
    """What a checkpoint saves beside the model: the progress, the data position, every rank's RNG
    states and the optimiser's (keyed by parameter name, whole tensors: the same file for one
    process, DDP and FSDP). Every rank must call this."""
    return {"step": state.step, "tokens": state.tokens, "elapsed": state.elapsed,
            "data": state.train_loader.state_dict(), "rng": _rng_states(state.env),
            "world_size": state.env.world_size,
            "optimizer": get_optimizer_state_dict(state.model, state.optimizers, options=FULL_STATE)}


def load_state_dict(state: TrainState, saved: dict[str, Any]) -> None:
    """Restore what ``state_dict`` saved (on any number of processes)."""
    set_optimizer_state_dict(state.model, state.optimizers, saved["optimizer"],
                             options=StateDictOptions(full_state_dict=True))
    state.train_loader.load_state_dict(saved["data"])
    state.step, state.tokens, state.elapsed = saved["step"], saved["tokens"], saved["elapsed"]
    _set_rng_state(saved["rng"], state.env, state.cfg.seed, state.step)


def write_checkpoint(state: TrainState) -> None:
    """Save the model (gathered whole) and ``state_dict(state)`` as ``RUN/step_NNNNNN``; every rank
    must call this."""
    whole = full_model(state.model, state.sharded, state.env)
    saved = state_dict(state)
    path = _on_main(state.env, lambda: save_checkpoint(state.run_dir, state.step, whole, saved,
                                                        state.cfg.keep_checkpoints))
    # Every rank has the result, but a broadcast's sender may leave before the others have read it:
    # meet here, so that no rank runs ahead to the end of the run and tears down the process group.
    state.env.barrier()
    state.console.message(f"checkpoint {path}")
    state.saved_step = state.step


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """``checkpoint``'s saved ``state_dict``, unpickled without running code, its keys checked."""
    path = checkpoint / STATE_FILE
    fix = f"resume from another checkpoint (name it in {checkpoint.parent / LATEST}) or start a new run"
    # Read, not mapped: the optimiser would keep the mapping, and so the disk space of a checkpoint
    # that is pruned later.
    saved = checkpoints.torch_load(path, "a trainer state", fix, mmap=False)
    missing = [key for key in STATE_KEYS if not isinstance(saved, dict) or key not in saved]
    if missing:
        raise UserError(f"{path}: not a trainer state (it lacks {', '.join(missing)}); {fix}")
    assert isinstance(saved, dict)
    return saved


def resume(state: TrainState, checkpoint: Path, saved: dict[str, Any]) -> None:
    """Continue from ``checkpoint`` (whose weights the model was built from): its ``saved`` state
    (from ``read_trainer_state``), and the metrics log cut back to its step (the steps after it are
    logged again)."""
    try:
        load_state_dict(state, saved)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"{checkpoint / STATE_FILE} does not fit this run ({type(e).__name__} {reason}); "
                        "resume from another checkpoint") from None
    state.resumed_from = checkpoint
    state.saved_step = state.step
    if state.env.is_main:
        truncate_metrics(state.run_dir, state.step)


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


def train(cfg: TrainConfig) -> TrainResult:
    """Train as ``cfg`` says; see the module docstring. Returns what the run reached."""
    env = init_distributed(cfg.device)
    try:
        result = _train(cfg, env)
        # The run's state (DDP's reducer with it) is gone; gloo's threads let go of the last
        # collective's tensors, which takes the GIL, while this waits without it. Tearing the group
        # down before then can deadlock: its destructor joins them holding the GIL.
        env.barrier()
        return result
    finally:
        if env.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, env: Distributed) -> TrainResult:
    state = setup(cfg, env)
    try:
        fit(state)
        return finish(state)
    finally:
        if state.metrics:
            state.metrics.close()  # also when a step fails: the run directory is left unused


def fit(state: TrainState) -> None:
    """Optimiser steps until ``max_steps`` or ``time_limit``, with validations, samples and
    checkpoints at their intervals. Only the steps count as training time (``elapsed``, which the
    time limit and the schedule follow): the rest is taken off the clock."""
    cfg = state.cfg
    state.console.message(_start_message(state))
    state.started, state.elapsed_before = time.monotonic(), state.elapsed
    state.decaying = _in_decay(state)
    while True:
        state.elapsed = _elapsed(state, shared=True)
        if _finished(cfg, state.step, state.elapsed):
            break
        if _decay_begins(state):
            _off_the_clock(state, _keep_decay_start)
        train_step(state)
        _off_the_clock(state, _between_steps)


def _between_steps(state: TrainState) -> None:
    """The validation, sample and checkpoint due after this step."""
    cfg = state.cfg
    if state.val_loader is not None and _due(cfg.eval_interval, state.step):
        validate(state)
    if state.can_sample and _due(cfg.sample_interval, state.step):
        show_sample(state, f"sample at step {state.step}")
    if _due(cfg.checkpoint_interval, state.step):
        write_checkpoint(state)


def _off_the_clock(state: TrainState, work: Callable[[TrainState], None]) -> None:
    """Run ``work`` without counting its time as training."""
    start = time.monotonic()
    work(state)
    state.started += time.monotonic() - start


def _in_decay(state: TrainState) -> bool:
    """Under ``wsd``, whether the next step is in the learning rate's final decay."""
    cfg = state.cfg
    return cfg.lr_schedule == "wsd" and decay_started(cfg, _progress(cfg, state.step, state.elapsed))


def _decay_begins(state: TrainState) -> bool:
    """Under ``wsd``, whether the next step is the first of the learning rate's decay."""
    decaying = _in_decay(state)
    begins = decaying and not state.decaying
    state.decaying = decaying
    return begins


def _keep_decay_start(state: TrainState) -> None:
    """Checkpoint the end of the stable phase (unless this step has one) and mark it to be kept: a
    longer run resumes from it (name it in ``RUN/latest``) and decays later."""
    if state.step > state.saved_step:
        write_checkpoint(state)
    if state.env.is_main:
        path = state.run_dir / _checkpoint_name(state.step)
        (path / DECAY_START_FILE).write_text(f"step {state.step}: the last before the decay\n")
        state.console.message(f"the learning rate decays from here; {path} is kept: to train longer, name it "
                              f"in {state.run_dir / LATEST} and continue with --resume and a longer run")


def finish(state: TrainState) -> TrainResult:
    """The end: validation and checkpoint (unless the last step had them), a sample, the plot and the
    summary."""
    if state.val_loader is not None and state.last_eval_step != state.step:
        validate(state, announce=False)
    if state.step > state.saved_step:
        write_checkpoint(state)
    last = state.run_dir / _checkpoint_name(state.saved_step) if state.saved_step >= 0 else None
    if state.metrics:
        state.metrics.close()
    result = TrainResult(state.run_dir, state.step, state.tokens, state.elapsed, state.loss, state.val_loss,
                         last)
    if state.can_sample:
        show_sample(state, "sample")
    if state.env.is_main:
        plot = plot_metrics(state.run_dir)
        state.console.message(_summary(result, plot, lora.lora_config_of(state.model) is not None))
    return result


def _finished(cfg: TrainConfig, step: int, elapsed: float) -> bool:
    """Whether the run has reached ``max_steps`` or ``time_limit``."""
    by_steps = bool(cfg.max_steps) and step >= cfg.max_steps
    return by_steps or (bool(cfg.time_limit) and elapsed >= cfg.time_limit * 60)


def _due(interval: int, step: int) -> bool:
    """Whether something done every ``interval`` steps (0: never) is due after ``step``."""
    return bool(interval) and step % interval == 0


def _start_message(state: TrainState) -> str:
    cfg, env = state.cfg, state.env
    fsdp = ", sharded by FSDP" if state.sharded else ""
    resuming = f", resuming at step {state.step}" if state.resumed_from is not None else ""
    total, adapter = state.model.num_parameters(), lora.lora_config_of(state.model)
    what = f"{total:,} parameters"
    if adapter is not None:
        what = (f"{lora.trainable_parameters(state.model):,} of {total:,} parameters (a LoRA adapter of rank "
                f"{adapter.rank} on {', '.join(adapter.targets)}; the base is frozen)")
    return (
        f"training {what} on {env.world_size} x {env.device} "
        f"({str(state.dtype).removeprefix('torch.')}{fsdp}): "
        f"{state.batch_tokens:,} tokens per step = {cfg.micro_batch} x {state.seq_len} x {env.world_size} "
        f"process(es) x {state.accum} accumulation; "
        f"{state.train_loader.num_tokens:,} training tokens{resuming}; {_recipe(state)}"
    )


def _recipe(state: TrainState) -> str:
    """The optimisers and the schedule, as the start message names them."""
    cfg = state.cfg
    adamw = f"AdamW (lr {cfg.lr:g})"
    if cfg.optimizer == "muon":
        matrices = len(muon_parameters(state.model))
        adamw = f"Muon (lr {cfg.muon_settings()[0]:g}) on {matrices} matrices, {adamw} on the rest"
    recipe = f"{adamw}, {cfg.lr_schedule} schedule decaying over the last {cfg.schedule_decay_fraction():.0%}"
    if state.teacher is not None:
        recipe += (f"; distilled from {cfg.distill_from} ({state.teacher.num_parameters():,} parameters) at "
                   f"temperature {cfg.distill_temperature:g}, soft loss weight {cfg.distill_weight:g}")
    return recipe


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
    """``step 120/2000 | loss 3.2145 | lr 5.98e-04 | 45.2k tok/s | MFU 41.2% | ETA 3m12s`` (distilling,
    ``| soft 1.0321`` after the loss)"""
    steps = f"{record['step']:>6}" + (f"/{cfg.max_steps}" if cfg.max_steps else "")
    line = f"step {steps} | loss {record['loss']:.4f} | "
    if "soft_loss" in record:
        line += f"soft {record['soft_loss']:.4f} | "
    line += f"lr {record['lr']:.2e} | {record['tokens_per_s'] / 1000:,.1f}k tok/s"
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


def _summary(result: TrainResult, plot: Path, adapter: bool) -> str:
    rate = result.tokens / result.elapsed if result.elapsed else 0.0
    val = f"{result.val_loss:.4f}" if result.val_loss is not None else "not measured (no validation shards)"
    use = (f"a LoRA adapter: run it with --adapter {result.run_dir}, or fold it in with gpt2 merge" if adapter
           else f"load it with GPT2.from_pretrained({str(result.run_dir)!r})")
    return "\n".join([
        f"done: {result.step:,} steps, {result.tokens:,} tokens in {_duration(result.elapsed)} "
        f"({rate / 1000:,.1f}k tokens/s)",
        f"final train loss {result.train_loss:.4f}, validation loss {val}",
        f"checkpoint {result.checkpoint} ({use})",
        f"loss curve {plot}",
    ])
