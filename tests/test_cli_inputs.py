"""Careless and hostile input to the verbs that run a model: sizes that cannot fit, values out of range,
shapes no GPT-2 has, text that is not UTF-8. Each ends in one ``error:`` line before any work, and an
interactive chat survives a message it cannot answer."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from conftest import BYTES, assert_one_line_error, random_model, run_cli, saved_model_dir

from gpt2 import GPT2Config, UserError


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved_model_dir(random_model(n_positions=128, tokenizer=BYTES), tmp_path_factory)


def test_a_generation_that_cannot_fit_in_memory_is_refused_with_the_estimate(model_dir: Path, capsys) -> None:
    code, out, err = run_cli(capsys, "generate", "--model", model_dir, "--num-samples", 10**9, "--no-stream",
                             "--max-new-tokens", 10)
    assert_one_line_error(code, err, "1,000,000,000 sequences", "GiB", "fewer sequences")
    assert out == ""


@pytest.mark.parametrize(("change", "words"), [
    ({"n_layer": 10**9}, ["parameters", "n_layer"]),
    ({"n_positions": 10**12}, ["parameters", "n_positions"]),
    ({"layer_norm_epsilon": -1}, ["layer_norm_epsilon"]),
], ids=["n_layer-1e9", "n_positions-1e12", "negative-epsilon"])
def test_configs_no_gpt2_has_are_one_line_errors(
    model_dir: Path, tmp_path: Path, capsys, change, words
) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in model_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, **change}))
    for argv in (["info", bad], ["generate", "--model", bad, "--max-new-tokens", 2]):
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, "config.json", *words)
    with pytest.raises(UserError, match="layer_norm_epsilon"):
        GPT2Config(layer_norm_epsilon=float("nan"))


@pytest.mark.parametrize(("argv", "words"), [
    (["detect", "--text", "x" * 100, "--threshold", "nan"], ["threshold", "finite"]),
    (["detect", "--calibrate", "PEOPLE", "--passages", 0], ["at least 2 passages"]),
    (["eval", "lambada", "--file", "DATA", "--limit", 0], ["limit", "at least 1"]),
    (["eval", "lambada", "--file", "DATA", "--limit", -1], ["limit", "at least 1"]),
    (["eval", "perplexity", "--file", "PEOPLE", "--context", 1], ["context must be between 2"]),
    (["generate", "--device", "bogus"], ["unknown device 'bogus'"]),
], ids=["threshold-nan", "passages-0", "limit-0", "limit-negative", "context-1", "device-bogus"])
def test_values_out_of_range_are_one_line_errors(
    model_dir: Path, tmp_path: Path, capsys, argv, words
) -> None:
    people = tmp_path / "people.txt"
    people.write_text("some words people wrote, " * 40, encoding="utf-8")
    data = tmp_path / "lambada.jsonl"
    data.write_text(json.dumps({"text": "the cat sat on the mat"}) + "\n", encoding="utf-8")
    files = {"PEOPLE": people, "DATA": data}
    argv = [argv[0], *(files.get(a, a) for a in argv[1:]), "--model", model_dir]
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, *words)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_a_one_line_error(model_dir: Path, capsys) -> None:
    code, _, err = run_cli(capsys, "generate", "--model", model_dir, "--device", "cuda")
    assert_one_line_error(code, err, "no CUDA GPU", "--device cpu")


def test_text_that_is_not_utf8_is_refused_alike_from_files_stdin_and_arguments(
    model_dir: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    invalid = b"caf\xe9 au lait"
    (tmp_path / "prompt.txt").write_bytes(invalid)
    code, _, err = run_cli(capsys, "generate", "--model", model_dir, "--prompt-file", tmp_path / "prompt.txt")
    assert_one_line_error(code, err, "prompt.txt", "utf-8")
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(invalid)))
    code, _, err = run_cli(capsys, "generate", "--model", model_dir, "--prompt-file", "-")
    assert_one_line_error(code, err, "standard input", "not valid UTF-8")
    as_argument = invalid.decode("utf-8", "surrogateescape")  # how Python hands such bytes in argv over
    code, _, err = run_cli(capsys, "generate", "--model", model_dir, "--prompt", as_argument)
    assert_one_line_error(code, err, "not valid UTF-8", "caf")


def test_chat_refuses_one_message_and_goes_on(model_dir: Path, capsys, monkeypatch) -> None:
    messages = b"hello\n" + b"x" * 200 + b"\n" + b"\xff\xfe\n" + b"and you?\n\n"
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(messages)))
    code, out, err = run_cli(capsys, "chat", "--model", model_dir, "--max-new-tokens", 8, "--seed", 0)
    assert code == 0
    assert out.count("gpt2> ") == 2  # the first and the last message were answered
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and "too long for the context window" in errors[0] and "UTF-8" in errors[1]


def test_translate_of_a_long_sentence_keeps_its_end_instead_of_suggesting_an_option_it_lacks(
    model_dir: Path, capsys
) -> None:
    code, out, err = run_cli(capsys, "task", "translate", "--model", model_dir, "--text", "word " * 60)
    assert code == 0 and "--truncate" not in err
    assert out.endswith("\n")
