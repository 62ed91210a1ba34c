"""LoRA adapters (Hu et al. 2021): a frozen base model plus trainable low-rank updates, in peft's files.

A target ``nn.Linear`` (W, b) becomes a ``LoRALinear``: ``y = x W^T + b + scale * B(A(dropout(x)))``,
with ``A`` (rank, in) drawn as peft draws it (Kaiming-uniform), ``B`` (out, rank) zero, so that a new
adapter changes nothing, and ``scale = alpha / rank``. The base weights keep their names
(``transformer.h.0.attn.c_attn.weight``); the adapter's are ``...c_attn.lora_A.weight`` and
``...c_attn.lora_B.weight``.

Read top to bottom: ``LoRAConfig``; the layer and ``add_lora`` (which also freezes the base);
``merge_lora`` (folds the update into W: a plain model again); peft's files: ``save_adapter``,
``read_adapter_config`` and ``load_adapter``. The files are what peft's ``PeftModel.save_pretrained``
writes for transformers' ``GPT2LMHeadModel`` (``adapter_config.json`` + ``adapter_model.safetensors``,
keys ``base_model.model.transformer.h.0.attn.c_attn.lora_A.weight``...), so that
``peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), directory)`` loads ours and
``load_adapter`` loads peft's. peft itself is not used here: importing it takes seconds, and its
layers rename the base weights.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from gpt2.checkpoints import ADAPTER_CONFIG, read_state_dict
from gpt2.config import GPT2Config
from gpt2.model import Transformer
from gpt2.util.atomic import write_atomic
from gpt2.util.errors import UserError
from gpt2.util.jsonfile import check_field, read_json_object

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"  # what peft wrote before safetensors
TARGETS = ("c_attn", "c_proj", "c_fc")  # GPT-2's projections; c_proj is both attn.c_proj and mlp.c_proj
DEFAULT_ALPHA = 8.0  # peft's default lora_alpha
PEFT_PREFIX = "base_model.model."  # of every key peft writes: PeftModel.base_model (LoraModel).model
# A key of an adapter tensor, the prefix and peft's adapter name (".default") stripped off.
KEY = re.compile(r"(?:transformer\.)?(h\.(\d+)\.(?:attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj))"
                 r"\.(lora_[AB])(?:\.default)?\.weight")
# peft options that change the network in ways not implemented here, with the one value accepted.
FIXED_OPTIONS = {"use_dora": False, "use_rslora": False, "bias": "none", "modules_to_save": None,
                 "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}}
# The fields of adapter_config.json read into a LoRAConfig, with the JSON types each may have.
CONFIG_FIELDS = {"r": (int,), "lora_alpha": (int, float), "lora_dropout": (int, float),
                 "base_model_name_or_path": (str, type(None))}
# The fields of adapter_config.json read into a LoRAConfig, with the JSON types each may have.
CONFIG_FIELDS = {"r": (int,), "lora_alpha": (int, float), "lora_dropout": (int, float),
                 "base_model_name_or_path": (str, type(None))}
# The fields of adapter_config.json read into a LoRAConfig, with the JSON types each may have.
CONFIG_FIELDS = {"r": (int,), "lora_alpha": (int, float), "lora_dropout": (int, float),
                 "base_model_name_or_path": (str, type(None))}


@dataclass(frozen=True)
class LoRAConfig:
    """An adapter's shape: ``rank`` and ``alpha`` (its output is scaled by alpha / rank; default 8, as
    peft's), dropout on its input, the layers it goes on (by their last name, as peft matches them;
    default c_attn, peft's for GPT-2) and the base model it adapts (a directory or a hub name)."""

    rank: int
    alpha: float = DEFAULT_ALPHA
    dropout: float = 0.0
    targets: tuple[str, ...] = ("c_attn",)
    base_model: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise UserError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) \
                or not 0 < self.alpha < math.inf:
            raise UserError(f"LoRA alpha must be a positive number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0 <= self.dropout < 1:
            raise UserError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            found = f"unknown LoRA target module {unknown[0]!r}" if unknown else "no LoRA target module"
            raise UserError(f"{found}; GPT-2's are {', '.join(TARGETS)}")
        object.__setattr__(self, "targets", tuple(dict.fromkeys(self.targets)))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def check_fits(self, config: GPT2Config) -> None:
        """Refuse a rank above the model's width (an update of that rank is no longer low-rank)."""
        if self.rank > config.n_embd:
            raise UserError(f"LoRA rank {self.rank} is above the model's width ({config.n_embd}); "
                            f"choose a rank of at most {config.n_embd} (4 to 64 is usual)")


# ----------------------------------------------------------------------------------------------------
# The layers


class LoRALinear(nn.Module):
    """A linear layer plus a low-rank update: it wraps the layer it adapts (``base_layer``, as peft
    names it) and adds ``lora_B(lora_A(lora_dropout(x))) * scale``; ``config`` is its adapter's. Its
    state dict names the base layer's tensors as the plain model does (``c_attn.weight``), so that a
    model's weights keep their names with an adapter on."""

    def __init__(self, base_layer: nn.Linear, config: LoRAConfig) -> None:
        super().__init__()
        like = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.base_layer = base_layer
        self.config = config
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.lora_A = nn.Linear(base_layer.in_features, config.rank, bias=False, **like)
        self.lora_B = nn.Linear(config.rank, base_layer.out_features, bias=False, **like)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as peft
        nn.init.zeros_(self.lora_B.weight)
        self.scale = config.scale
        self.register_state_dict_post_hook(_plain_names)
        self.register_load_state_dict_pre_hook(_wrapped_names)

    @property
    def weight(self) -> nn.Parameter:
        return self.base_layer.weight

    @property
    def bias(self) -> nn.Parameter | None:
        return self.base_layer.bias

    def forward(self, x: Tensor) -> Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scale


def _plain_names(module: nn.Module, state_dict: dict[str, Any], prefix: str, metadata: Any) -> None:
    """A ``LoRALinear``'s state dict: its base layer's tensors under the plain layer's names."""
    for name in [k for k in state_dict if k.startswith(prefix + "base_layer.")]:
        state_dict[prefix + name.removeprefix(prefix + "base_layer.")] = state_dict.pop(name)


def _wrapped_names(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Loading a ``LoRALinear``: the plain layer's names (``_plain_names``) are its base layer's."""
    for part in ("weight", "bias"):
        if prefix + part in state_dict:
            state_dict[prefix + "base_layer." + part] = state_dict.pop(prefix + part)


def add_lora(model: Transformer, config: LoRAConfig) -> None:
    """Freeze every weight of ``model`` and wrap each target layer in a ``LoRALinear`` with a new
    adapter (``B`` zero: nothing changes yet); ``lora_config_of(model)`` is then ``config``."""
    if lora_config_of(model) is not None:
        raise UserError("the model already has a LoRA adapter; merge it first (gpt2 merge)")
    config.check_fits(model.config)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, linear in target_layers(model, config.targets):
        model.set_submodule(name, LoRALinear(linear, config))


def target_layers(model: nn.Module, targets: tuple[str, ...]) -> list[tuple[str, nn.Linear]]:
    """(name, layer) of every ``nn.Linear`` whose last name is one of ``targets``."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets]


def lora_config_of(model: nn.Module) -> LoRAConfig | None:
    """The adapter ``add_lora`` gave ``model`` (None: a plain model)."""
    return next((m.config for m in model.modules() if isinstance(m, LoRALinear)), None)


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def trainable_parameters(model: nn.Module) -> int:
    """How many parameters will train (all of a plain model, the adapter's alone with LoRA)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def merge_lora(model: Transformer) -> None:
    """Fold each adapter into the weight of the layer it wraps (W += scale * B A, computed in float32)
    and put that layer back in its place: a plain model again, with every parameter trainable and no
    LoRA tensors left."""
    for name, layer in lora_layers(model):
        base = layer.base_layer
        delta = layer.lora_B.weight.float() @ layer.lora_A.weight.float() * layer.scale
        base.weight.copy_(base.weight.float() + delta)
        model.set_submodule(name, base)
    for p in model.parameters():
        p.requires_grad_(True)


# ----------------------------------------------------------------------------------------------------
# peft's files


def save_adapter(model: Transformer, directory: str | Path) -> None:
    """Write ``model``'s adapter in peft's format into ``directory``: adapter_model.safetensors, then
    adapter_config.json, each atomically."""
    config = lora_config_of(model)
    if config is None:
        raise UserError("the model has no LoRA adapter to save")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, layer in lora_layers(model):
        for part in ("lora_A", "lora_B"):
            tensor = getattr(layer, part).weight.detach().to("cpu").contiguous()
            tensors[f"{PEFT_PREFIX}{name}.{part}.weight"] = tensor
    write_atomic(directory / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps(peft_config(config), indent=2) + "\n"
    write_atomic(directory / ADAPTER_CONFIG, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def peft_config(config: LoRAConfig) -> dict[str, Any]:
    """adapter_config.json as peft's ``LoraConfig.save_pretrained`` writes it, with the fields that
    peft 0.10 already knows (older versions refuse fields they do not know)."""
    alpha = int(config.alpha) if float(config.alpha).is_integer() else config.alpha
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": config.base_model,
        "revision": None,
        "inference_mode": True,
        "r": config.rank,
        "lora_alpha": alpha,
        "lora_dropout": config.dropout,
        "target_modules": list(config.targets),
        "fan_in_fan_out": True,  # transformers' GPT-2 stores these layers as Conv1D, (in, out)
        "init_lora_weights": True,
        "layers_pattern": None,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "loftq_config": {},
        "layer_replication": None,
        "auto_mapping": None,
        **FIXED_OPTIONS,
    }


def read_adapter_config(directory: str | Path) -> LoRAConfig:
    """The ``LoRAConfig`` of an adapter directory (ours or peft's); options that would change the
    network in ways not implemented here are refused."""
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise UserError(f"{directory} holds no LoRA adapter (no {ADAPTER_CONFIG}); give the directory that "
                        "`gpt2 train --lora-rank` or peft's save_pretrained wrote")
    peft = read_json_object(path)
    for key, kinds in CONFIG_FIELDS.items():
        check_field(peft, key, kinds, str(path))
    if peft.get("peft_type") != "LORA":
        raise UserError(f"{path}: peft_type is {peft.get('peft_type')!r}; only LORA adapters are supported")
    for key, supported in FIXED_OPTIONS.items():
        if peft.get(key) not in (None, supported) and peft.get(key) not in ([], {}):  # [], {}: none either
            raise UserError(f"{path}: {key}={peft[key]!r} is not supported (only {supported!r})")
    targets = peft.get("target_modules")
    if not isinstance(targets, list):
        raise UserError(f"{path}: target_modules must be a list of module names ({', '.join(TARGETS)}), "
                        f"found {targets!r}")
    try:
        return LoRAConfig(rank=peft.get("r", 8), alpha=peft.get("lora_alpha", DEFAULT_ALPHA),
                          dropout=peft.get("lora_dropout", 0.0), targets=tuple(targets),
                          base_model=peft.get("base_model_name_or_path"))
    except (UserError, TypeError) as e:
        raise UserError(f"{path}: {e}") from None


def load_adapter(model: Transformer, directory: str | Path) -> LoRAConfig:
    """Add the adapter saved in ``directory`` (ours or peft's) to ``model`` (as ``add_lora``, with its
    weights). An adapter whose tensors do not fit the model is refused before the model is touched."""
    directory = Path(directory)
    config = read_adapter_config(directory)
    tensors = _read_adapter_tensors(directory)
    expected = _expected_shapes(model, config)
    _check_shapes(directory, config, tensors, expected, model.config)
    add_lora(model, config)
    layers = dict(lora_layers(model))
    with torch.no_grad():
        for key, tensor in tensors.items():
            name, part = key.rsplit(".", 1)
            getattr(layers["transformer." + name], part).weight.copy_(tensor)
    return config


def _read_adapter_tensors(directory: Path) -> dict[str, Tensor]:
    """The adapter's tensors, keyed ``h.{i}.attn.c_attn.lora_A`` (prefixes and adapter names off)."""
    raw: dict[str, Tensor] = {}
    if (directory / ADAPTER_WEIGHTS).is_file():
        file = directory / ADAPTER_WEIGHTS
        try:
            with safe_open(file, framework="pt") as f:
                raw = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a dict)
        except (SafetensorError, OSError) as e:
            raise UserError(f"{file}: corrupt or truncated safetensors file ({e}); save it again") from None
    elif (directory / ADAPTER_WEIGHTS_BIN).is_file():
        file = directory / ADAPTER_WEIGHTS_BIN
        raw = read_state_dict(file, fix="save it again")
    else:
        raise UserError(f"{directory} has no adapter weights: expected {ADAPTER_WEIGHTS}")
    tensors = {}
    for key, tensor in raw.items():
        match = KEY.fullmatch(key.removeprefix(PEFT_PREFIX))
        if match is None:
            raise UserError(f"{directory}: unexpected tensor {key!r}; only LoRA weights of GPT-2's "
                            f"{', '.join(TARGETS)} layers are supported")
        if not torch.isfinite(tensor).all():  # it would make every output NaN: generation prints nothing
            raise UserError(f"{file}: tensor {key!r} holds NaN or infinite values (its training diverged); "
                            "use an earlier checkpoint of its run, or train it again")
        tensors[f"{match[1]}.{match[3]}"] = tensor
    return tensors


def _expected_shapes(model: Transformer, config: LoRAConfig) -> dict[str, tuple[int, int]]:
    """The shape each adapter tensor of ``config`` must have on ``model``, keyed as the file's."""
    shapes = {}
    for name, linear in target_layers(model, config.targets):
        name = name.removeprefix("transformer.")
        shapes[f"{name}.lora_A"] = (config.rank, linear.in_features)
        shapes[f"{name}.lora_B"] = (linear.out_features, config.rank)
    return shapes


def _check_shapes(directory: Path, config: LoRAConfig, tensors: dict[str, Tensor],
                  expected: dict[str, tuple[int, int]], base: GPT2Config) -> None:
    """One line for an adapter that does not fit: made for another base (its width or depth), or
    tensors that disagree with its own adapter_config.json."""
    width, layers = _adapter_shape(tensors)
    if (width, layers) != (base.n_embd, base.n_layer) and tensors:
        named = f" ({config.base_model})" if config.base_model else ""
        raise UserError(f"{directory} is an adapter for a base of another shape: width {width} with "
                        f"{layers} layers, but the model has width {base.n_embd} with {base.n_layer} "
                        f"layers; give the base it was trained on{named} with --model")
    for key, shape in expected.items():
        if key not in tensors:
            raise UserError(f"{directory}: the adapter lacks {key} (its {ADAPTER_CONFIG} targets "
                            f"{', '.join(config.targets)}); its weights are incomplete")
        if tuple(tensors[key].shape) != shape:
            raise UserError(f"{directory}: tensor {key} has shape {tuple(tensors[key].shape)} but its "
                            f"{ADAPTER_CONFIG} (r={config.rank}) implies {shape}")
    extra = [k for k in tensors if k not in expected]
    if extra:
        raise UserError(f"{directory}: tensor {extra[0]} is not on a target of its {ADAPTER_CONFIG} "
                        f"({', '.join(config.targets)})")


def _adapter_shape(tensors: dict[str, Tensor]) -> tuple[int, int]:
    """The width and number of layers of the base that ``tensors`` were made for."""
    width, layers = 0, 0
    for key, tensor in tensors.items():
        layers = max(layers, int(key.split(".")[1]) + 1)
        if key.endswith("lora_A") and tensor.dim() == 2:
            width = tensor.shape[1] // 4 if ".mlp.c_proj." in key else tensor.shape[1]
    return width, layers
