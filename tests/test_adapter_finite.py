"""Adapters whose weights are not finite (issue 32): a LoRA adapter holding NaN or an infinity (a run that
diverged) made every output NaN, so ``gpt2 generate`` printed nothing and exited 0, and ``gpt2 merge``
wrote a model of NaN. Loading one is refused, in one ``error:`` line naming the file and the tensor,
whichever file format it is in and whichever verb loads it. Each test runs the real ``gpt2`` command,
in a process of its own, on real files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, run_gpt2
from safetensors.torch import load_file, save_file

from gpt2.adapters.lora import ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN


def spoiled(adapter_dir: Path, tmp_path: Path, value: float, *, bin: bool = False) -> tuple[Path, Path, str]:
    """A copy of ``adapter_dir`` with one weight set to ``value`` (in peft's older adapter_model.bin with
    ``bin``); the copy, its weights file and the name of the spoiled tensor."""
    adapter = Path(shutil.copytree(adapter_dir, tmp_path / "adapter"))
    tensors = load_file(adapter / ADAPTER_WEIGHTS)
    name = sorted(tensors)[-1]
    tensors[name][0, 0] = value
    (adapter / ADAPTER_WEIGHTS).unlink()
    file = adapter / (ADAPTER_WEIGHTS_BIN if bin else ADAPTER_WEIGHTS)
    if bin:
        torch.save(tensors, file)
    else:
        save_file(tensors, file, metadata={"format": "pt"})
    return adapter, file, name


def assert_refused(result: tuple[int, str, str], *words: str) -> None:
    code, out, err = result
    assert "Traceback" not in err, err
    assert_one_line_error(code, err, *words)
    assert out == ""


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_generating_with_a_non_finite_adapter_is_refused(
    tmp_path: Path, adapter_dir: Path, value: float
) -> None:
    adapter, file, name = spoiled(adapter_dir, tmp_path, value)
    assert_refused(run_gpt2("generate", "--adapter", adapter, "--prompt", "Once", "--max-new-tokens", 3),
                   str(file), repr(name), "NaN or infinite")


def test_merging_a_non_finite_adapter_writes_nothing(
    tmp_path: Path, model_dir: Path, adapter_dir: Path
) -> None:
    adapter, file, name = spoiled(adapter_dir, tmp_path, float("nan"))
    merged = tmp_path / "merged"
    assert_refused(run_gpt2("merge", "--adapter", adapter, "--model", model_dir, "--out", merged),
                   str(file), repr(name), "NaN or infinite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no model, no temporary directory


def test_a_non_finite_adapter_in_peft_older_bin_format_is_refused(
    tmp_path: Path, adapter_dir: Path
) -> None:
    adapter, file, name = spoiled(adapter_dir, tmp_path, float("-inf"), bin=True)
    assert_refused(run_gpt2("merge", "--adapter", adapter, "--out", tmp_path / "merged"), str(file),
                   repr(name), "NaN or infinite")
    assert not (tmp_path / "merged").exists()
