"""Model configuration, the named presets (the one place where sizes and defaults live) and the
precisions a model can be loaded in."""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gpt2.util.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

GPT2_VOCAB_SIZE = 50257  # 256 bytes + 50,000 merges + <|endoftext|>
GPT2_CONTEXT = 1024
MAX_PARAMETERS = 10**12  # far beyond gpt2-xl's 1.6e9: a shape past it is a typo, not a model


def cache_dir() -> Path:
    """Where what this package downloads or builds is kept: ``$GPT2_CACHE`` or ``~/.cache/gpt2``."""
    return Path(os.environ.get("GPT2_CACHE", Path.home() / ".cache" / "gpt2"))


# The precisions a model can be loaded in for inference (``gpt2.inference.load.load_for_inference``).
PRECISIONS = {
    "fp32": "the weights as published",
    "bf16": "bfloat16 weights and cache: half the memory, faster on GPUs and on CPUs with AVX512-BF16",
    "int8": "int8 weights with a scale per output channel, inputs quantised to 8 bits on the fly "
            "(CPU): a quarter of the weight memory, outputs differ slightly",
    "int4": "4-bit weights in groups of 32 (a scale and a zero each), the tied embedding in int8 (CPU): "
            "the fewest bytes per token, outputs differ more",
}


@dataclass
class GPT2Config:
    """Hyper-parameters of a GPT-2 network. Field names follow Hugging Face's GPT2Config."""

    vocab_size: int = GPT2_VOCAB_SIZE
    n_positions: int = GPT2_CONTEXT  # context window
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    dropout: float = 0.0  # embeddings, attention weights and residual branches alike
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            if int(getattr(self, name)) <= 0:
                raise UserError(f"config: {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.n_embd % self.n_head:
            raise UserError(f"config: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"config: dropout must be in [0, 1), got {self.dropout}")
        if not 0 < self.layer_norm_epsilon < 1:  # also refuses NaN
            raise UserError(f"config: layer_norm_epsilon must be in (0, 1), got {self.layer_norm_epsilon}")
        if self.num_parameters() > MAX_PARAMETERS:
            raise UserError(f"config: {self.num_parameters():.3g} parameters is beyond any GPT-2 this "
                            f"package can hold (at most {MAX_PARAMETERS:.0e}); check n_layer, n_embd, "
                            "n_positions and vocab_size")

    def num_parameters(self) -> int:
        """The network's parameter count (the tied embedding once), from the shape alone."""
        block = 12 * self.n_embd**2 + 13 * self.n_embd  # attention and MLP weights, biases, LayerNorms
        return self.n_layer * block + (self.vocab_size + self.n_positions + 2) * self.n_embd

    @classmethod
    def from_preset(cls, name: str, **overrides: object) -> GPT2Config:
        """The preset ``name`` (see ``PRESETS``), with any fields replaced by ``overrides``."""
        if name not in PRESETS:
            raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


PUBLISHED_SIZES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # the family OpenAI released

PRESETS: dict[str, GPT2Config] = {
    # The published family (Radford et al. 2019; parameter counts as released).
    "gpt2": GPT2Config(n_layer=12, n_head=12, n_embd=768),  # 124M ("117M" in the paper)
    "gpt2-medium": GPT2Config(n_layer=24, n_head=16, n_embd=1024),  # 355M
    "gpt2-large": GPT2Config(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": GPT2Config(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    # Small presets for CPUs: trainable in minutes on two cores.
    "tiny": GPT2Config(n_layer=4, n_head=4, n_embd=256, n_positions=256),  # 3.2M + embeddings
    "mini": GPT2Config(n_layer=6, n_head=6, n_embd=384, n_positions=512),  # 10.6M + embeddings
    "nano": GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=128),  # 0.1M + embeddings: smoke tests
}


def read_settings(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """The top-level table of a TOML (.toml) or YAML (.yaml, .yml) file of options, such as a training
    config or an evaluation suite; ``what`` names the kind of file in error messages."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such {what}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); save the {what} as UTF-8") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            values = yaml.safe_load(text) or {}
        elif path.suffix == ".toml":
            values = tomllib.loads(text)
        else:
            raise UserError(f"{path}: a {what} is .toml, .yaml or .yml")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise UserError(f"{path}: not a valid {what} ({str(e).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: a {what} holds key = value options at the top level")
    return values
