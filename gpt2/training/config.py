"""The options of a training run: ``TrainConfig``, its TOML and YAML files, and its fields' types.

Read top to bottom: ``TrainConfig`` (every option, with its help text), ``field_types`` (the types
each option accepts, read from its annotation: the one source for the config-file check here and
for the flags of ``gpt2 train``), then the files: ``read_config_file`` and ``load_config``, which
merges a resumed run's saved ``train.toml``, a config file and the command line.

Imports no torch (only the standard library, ``gpt2.config`` and ``gpt2.util.errors``): the CLI builds
``gpt2 train --help`` from this module without loading the trainer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt2.config import read_settings
from gpt2.util.atomic import check_apart
from gpt2.util.errors import UserError

SEED_LIMIT = 2**63  # seeds torch.manual_seed, and numpy (seed + rank, + steps), all accept
OPTIMIZERS = ("adamw", "muon")
LR_SCHEDULES = ("cosine", "wsd")
# Muon's defaults, from the sweep in the README
MUON_DEFAULTS = {"muon_lr": 0.02, "muon_weight_decay": 0.0, "muon_momentum": 0.95}
DECAY_FRACTIONS = {"cosine": 1.0, "wsd": 0.2}  # the default share of the run that the decay takes
DISTILL_DEFAULTS = {"distill_temperature": 2.0, "distill_weight": 1.0}  # soft targets at T = 2, no hard loss
CONFIG_FILE = "train.toml"  # in a run directory: the effective options of the run, enough to repeat it


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
    time_limit: float | None = _option(None, "minutes of training steps (validations, samples and "
                                       "checkpoints not counted); with --max-steps, whichever ends first "
                                       "(the learning rate decays over the one that ends first)")
    optimizer: str = _option("adamw", "adamw (AdamW on every weight, nanoGPT's recipe) or muon (Muon on "
                             "the transformer blocks' weight matrices, AdamW on the embeddings, biases "
                             "and LayerNorms, modded-nanogpt's)")
    lr: float = _option(6e-4, "peak learning rate of AdamW")
    muon_lr: float | None = _option(None, f"peak learning rate of Muon (default {MUON_DEFAULTS['muon_lr']})")
    muon_weight_decay: float | None = _option(None, "Muon's decoupled weight decay (default "
                                              f"{MUON_DEFAULTS['muon_weight_decay']})")
    muon_momentum: float | None = _option(None, f"Muon's momentum (default {MUON_DEFAULTS['muon_momentum']})")
    lr_schedule: str = _option("cosine", "cosine (warm-up, then a cosine decay) or wsd (warm-up, a stable "
                               "phase at the peak, then a linear decay: a run can be extended by resuming "
                               "it from a checkpoint taken before the decay)")
    decay_fraction: float | None = _option(None, "the last fraction of the run over which the learning rate "
                                           "decays, in (0, 1] (default: cosine 1.0, wsd 0.2)")
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
    lora_rank: int | None = _option(None, "fine-tune a low-rank adapter (LoRA) of this rank instead of every "
                                    "weight: the --init-from model stays frozen, the optimiser holds the "
                                    "adapter alone, and checkpoints hold the adapter in peft's format "
                                    "(run it with --adapter, fold it in with `gpt2 merge`)")
    lora_alpha: float | None = _option(None, "LoRA's scale: the adapter's output is multiplied by alpha / "
                                       "rank (default 8, as peft)")
    lora_dropout: float = _option(0.0, "dropout rate on the LoRA adapters' input")
    lora_targets: str = _option("c_attn", "comma-separated layers that get LoRA adapters: c_attn "
                                "(attention's query, key and value), c_proj (attention's and the MLP's "
                                "outputs), c_fc (the MLP's input)")
    distill_from: str | None = _option(None, "distil the model from this teacher (knowledge distillation, as "
                                       "DistilGPT-2 was trained): train it towards the teacher's next-token "
                                       "distribution, softened by --distill-temperature, instead of (or, "
                                       "with --distill-weight, beside) the data's next tokens; a Hugging "
                                       "Face-format directory, a run directory or a hub name, with the "
                                       "data's tokenizer and a context at least --seq-len long")
    distill_temperature: float = _option(
        DISTILL_DEFAULTS["distill_temperature"], "temperature T of distillation's soft targets: the "
        "teacher's and the student's logits are divided by T before their softmax, and the soft loss (the KL "
        "divergence from the teacher's distribution to the student's) is multiplied by T^2")
    distill_weight: float = _option(
        DISTILL_DEFAULTS["distill_weight"], "share of the soft loss in distillation's training loss, in "
        "[0, 1]: weight x soft loss + (1 - weight) x the cross-entropy of the data's tokens (1: the teacher "
        "alone)")
    resume: bool = _option(False, "continue the run in --out from its latest checkpoint")
    overwrite: bool = _option(False, "replace the run already in --out")

    ACTIONS = ("resume", "overwrite")  # what to do this time, not part of a run's saved config

    def __post_init__(self) -> None:
        """Every option's range, checked at once: nothing is done with an option that cannot work."""
        for name in ("micro_batch", "eval_tokens"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_interval", "checkpoint_interval", "keep_checkpoints",
                     "sample_interval", "sample_tokens", "log_interval", "sample_top_k"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("seq_len", "batch_tokens", "max_steps"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        if self.time_limit is not None and not 0 < self.time_limit < math.inf:
            raise UserError(f"time_limit must be a positive number of minutes, got {self.time_limit}")
        if not 0 < self.lr < math.inf or not 0 <= self.min_lr_ratio <= 1:
            raise UserError(f"need lr > 0 (finite) and 0 <= min_lr_ratio <= 1, got {self.lr} and "
                            f"{self.min_lr_ratio}")
        self._check_float_ranges()
        self._check_choices()
        self._check_optimizer()
        self._check_lora()
        self._check_distillation()

    def _check_choices(self) -> None:
        """The seed, the precision and the device's spelling (whether it exists: gpt2.training.trainer)."""
        if not 0 <= self.seed < SEED_LIMIT:
            raise UserError(f"seed must be in [0, 2**63), got {self.seed}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise UserError(f"dtype must be float32, bfloat16 or auto, got {self.dtype!r}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise UserError(f"device must be cpu, cuda, cuda:N or auto, got {self.device!r}")

    def _check_optimizer(self) -> None:
        """The optimiser, the schedule and their numbers; Muon's options only with Muon."""
        for name, choices in (("optimizer", OPTIMIZERS), ("lr_schedule", LR_SCHEDULES)):
            if getattr(self, name) not in choices:
                raise UserError(f"{name} must be {' or '.join(choices)}, got {getattr(self, name)!r}")
        if self.decay_fraction is not None and not 0 < self.decay_fraction <= 1:
            raise UserError(f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        given = [name for name in MUON_DEFAULTS if getattr(self, name) is not None]
        if self.optimizer != "muon" and given:
            raise UserError(f"{given[0]} is an option of Muon; give --optimizer muon too, or drop it")
        lr, decay, momentum = self.muon_settings()
        if not (0 < lr < math.inf and 0 <= decay < math.inf and 0 <= momentum < 1):
            raise UserError(f"need muon_lr > 0, muon_weight_decay >= 0 and muon_momentum in [0, 1), got "
                            f"{lr}, {decay} and {momentum}")
        if self.optimizer == "muon" and self.fsdp:
            raise UserError("--optimizer muon with --fsdp: Muon orthogonalises whole matrices, which FSDP "
                            "shards over the processes; drop --fsdp (DDP) or use --optimizer adamw")

    def muon_settings(self) -> tuple[float, float, float]:
        """Muon's learning rate, weight decay and momentum, defaults filled in."""
        return tuple(MUON_DEFAULTS[name] if getattr(self, name) is None else getattr(self, name)
                     for name in MUON_DEFAULTS)  # type: ignore[return-value]

    def schedule_decay_fraction(self) -> float:
        """The share of the run the learning rate's decay takes."""
        return DECAY_FRACTIONS[self.lr_schedule] if self.decay_fraction is None else self.decay_fraction

    def _check_float_ranges(self) -> None:
        """The optimiser's, dropout's and the samples' numbers (NaN fails every comparison)."""
        ranges = {"weight_decay": (0.0, math.inf), "grad_clip": (0.0, math.inf), "beta1": (0.0, 1.0),
                  "beta2": (0.0, 1.0), "sample_temperature": (0.0, math.inf)}  # name: [low, high)
        for name, (low, high) in ranges.items():
            if not low <= getattr(self, name) < high:
                raise UserError(f"{name} must be in [{low}, {high}), got {getattr(self, name)}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")

    def _check_lora(self) -> None:
        """LoRA's numbers, and that there is a model to adapt (the layer names: gpt2.adapters.lora)."""
        if self.lora_alpha is not None and not 0 < self.lora_alpha < math.inf:
            raise UserError(f"lora_alpha must be a positive number, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_rank is None:
            given = [name for name, on in (("lora_alpha", self.lora_alpha is not None),
                                           ("lora_dropout", self.lora_dropout != 0.0),
                                           ("lora_targets", self.lora_targets != "c_attn")) if on]
            if given:
                raise UserError(f"{given[0]} is an option of LoRA fine-tuning; give --lora-rank R too")
            return
        if self.lora_rank <= 0:
            raise UserError(f"lora_rank must be positive, got {self.lora_rank}")
        if self.preset is not None:
            raise UserError("lora_rank fine-tunes an existing model: give it with --init-from MODEL, not "
                            "--preset")

    def _check_distillation(self) -> None:
        """Distillation's numbers (NaN fails every comparison), and that there is a teacher (whether it
        fits the student: gpt2.training.trainer)."""
        if not 0 < self.distill_temperature < math.inf:
            raise UserError(f"distill_temperature must be a positive finite number, got "
                            f"{self.distill_temperature}")
        if not 0 <= self.distill_weight <= 1:
            raise UserError(f"distill_weight must be in [0, 1], got {self.distill_weight}")
        if self.distill_from is None:
            given = [name for name, default in DISTILL_DEFAULTS.items() if getattr(self, name) != default]
            if given:
                raise UserError(f"{given[0]} is an option of distillation; give --distill-from TEACHER too")

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


def field_types(cls: type) -> dict[str, tuple[type, ...]]:
    """The types each field of dataclass ``cls`` accepts, from its annotation, in field order:
    ``int | None`` gives ``(int, NoneType)``, ``bool`` gives ``(bool,)``."""
    hints = typing.get_type_hints(cls)
    return {f.name: typing.get_args(hints[f.name]) or (hints[f.name],) for f in dataclasses.fields(cls)}


# ---------------------------------------------------------------------------------------------
# Config files


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The options in a TOML (.toml) or YAML (.yaml, .yml) file, checked against ``TrainConfig``."""
    values = read_settings(path)
    types = field_types(TrainConfig)
    for key, value in values.items():
        if key not in types:
            raise UserError(f"{path}: unknown option {key!r}; options are: {', '.join(types)}")
        values[key] = _checked_value(path, key, value, types[key])
    return values


def _checked_value(path: str | Path, key: str, value: Any, types: tuple[type, ...]) -> Any:
    """``value`` as option ``key`` takes it (an integer where a float is expected becomes a float)."""
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        names = " or ".join(t.__name__ for t in types if t is not type(None))
        raise UserError(f"{path}: option {key!r} must be {names}, got {value!r}")
    return value


def load_config(config_file: str | Path | None = None, **options: Any) -> TrainConfig:
    """Options from, in increasing priority: a resumed run's saved ``train.toml``, ``config_file``,
    and ``options`` (the command line)."""
    values = read_config_file(config_file) if config_file else {}
    values.update(options)
    if values.get("resume"):
        values = _resumed_values(values)
    cfg = TrainConfig(**values)
    if not cfg.data or not cfg.out:
        raise UserError("give the data directory (--data DIR) and the run directory (--out RUN)")
    if (cfg.preset is None) == (cfg.init_from is None):
        raise UserError("give either --preset NAME (train from scratch) or --init-from MODEL (fine-tune)")
    if cfg.max_steps is None and cfg.time_limit is None:
        raise UserError("give --max-steps N or --time-limit MINUTES (or both)")
    # --overwrite clears the run directory: none of what the run reads may be in it (refused here, before
    # torch is imported; the trainer checks again for a TrainConfig made without this function).
    check_apart(cfg.out, {"--data": cfg.data, "--init-from": cfg.init_from, "--tokenizer": cfg.tokenizer,
                          "--distill-from": cfg.distill_from, "--config": config_file})
    return cfg


def _resumed_values(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` over the resumed run's saved options; a different model (which a resumed run, built
    from its checkpoint, would ignore) is refused."""
    if not values.get("out"):
        raise UserError("--resume needs the run directory to continue: --out RUN")
    saved_file = Path(values["out"]) / CONFIG_FILE
    if not saved_file.is_file():
        raise UserError(f"--resume: {values['out']} holds no checkpoint (no {saved_file}); drop --resume")
    saved = read_config_file(saved_file)
    for name in ("preset", "init_from", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets"):
        if values.get(name) is not None and values[name] != saved.get(name):
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} {values[name]} with --resume: a resumed run continues its own model "
                            f"({saved_file}); drop {flag}, or start a new run without --resume")
    return {**saved, **values}
