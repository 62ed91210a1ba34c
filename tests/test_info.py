"""``gpt2 info``: config, parameter count, dtype and size of a checkpoint or a preset."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_cli

from gpt2 import GPT2, GPT2Config, Tokenizer
from gpt2.cli import main


def info(capsys: pytest.CaptureFixture, *argv: str) -> dict[str, str]:
    """The rows ``gpt2 info ARGV`` prints, by their first word."""
    code, out, _ = run_cli(capsys, "info", *argv)
    assert code == 0
    return dict(line.split(None, 1) for line in out.splitlines())


def test_info_on_a_saved_model(tmp_path: Path, capsys) -> None:
    config = GPT2Config.from_preset("tiny", vocab_size=1000, dropout=0.1)
    GPT2(config).to(torch.bfloat16).save_pretrained(tmp_path)
    rows = info(capsys, str(tmp_path))
    d = config.n_embd
    blocks = config.n_layer * (12 * d * d + 13 * d) + 2 * d  # independent of the model's own count
    total = blocks + (config.vocab_size + config.n_positions) * d
    assert rows["model"] == str(tmp_path)
    assert rows["layers"].split() == ["4", "heads", "4", "d_model", "256"]
    assert rows["context"].split() == ["256", "vocabulary", "1000", "dropout", "0.1"]
    assert rows["parameters"] == f"{total:,} ({blocks:,} without embeddings)"
    assert rows["dtype"] == "bfloat16"
    assert rows["size"] == f"{total * 2 / 2**20:,.1f} MiB"
    assert rows["tokenizer"] == "none"


def test_info_shows_the_saved_tokenizer(tmp_path: Path, gpt2_ranks_file: Path, capsys) -> None:
    model = GPT2(GPT2Config.from_preset("tiny"), tokenizer=Tokenizer.from_file(gpt2_ranks_file))
    model.save_pretrained(tmp_path)
    assert info(capsys, str(tmp_path))["tokenizer"] == "50257 tokens, <|endoftext|> = 50256"


def test_info_on_a_preset_needs_no_memory(capsys) -> None:
    rows = info(capsys, "--preset", "gpt2-xl")
    assert rows["parameters"].startswith("1,557,611,200 ")
    assert rows["size"] == f"{1_557_611_200 * 4 / 2**20:,.1f} MiB"


def test_info_wants_a_model_or_a_preset(capsys) -> None:
    assert main(["info"]) == 2
    assert capsys.readouterr().err == "error: give either MODEL or --preset NAME\n"
