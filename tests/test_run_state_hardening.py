"""No run loses a model: option ranges checked up front, corrupt run state as one-line errors, no
command destroying what a user made, and a full disk handled (issue 11)."""

from __future__ import annotations

import os
import pickle
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, random_model, random_words, run_cli

from gpt2 import GPT2, UserError
from gpt2.data.shards import find_shards, read_shard, write_shard
from gpt2.evaluation.report import load_suite

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "from", "home"]
TINY = ["--preset", "nano", "--seq-len", "32", "--micro-batch", "4", "--eval-tokens", "256",
        "--sample-tokens", "0", "--log-interval", "0", "--warmup-steps", "2"]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``data``: shards of random words over a 300-token vocabulary; ``run``: 4 steps of nano on them,
    checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("hardening")
    (root / "words.txt").write_text(random_words(WORDS, 12_000, seed=0), encoding="utf-8")
    from gpt2.cli import main

    assert main(["prepare", str(root / "words.txt"), "--vocab-size", "300", "--out", str(root / "data")]) == 0
    assert main(["train", "--data", str(root / "data"), "--out", str(root / "run"), *TINY, "--max-steps", "4",
                 "--checkpoint-interval", "2"]) == 0
    return root


def copy_run(root: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    return run


def train(capsys: pytest.CaptureFixture, data: Path, out: Path, *extra: object) -> tuple[int, str, str]:
    return run_cli(capsys, "train", "--data", data, "--out", out, *TINY, "--max-steps", 2, *extra)


# --- 4: every option has a checked range, before the run directory is touched --------------------


@pytest.mark.parametrize(("flags", "word"), [
    (["--grad-clip", "-1"], "grad_clip"),
    (["--grad-clip", "nan"], "grad_clip"),
    (["--beta1", "2"], "beta1"),
    (["--beta2", "nan"], "beta2"),
    (["--seed", str(2**70)], "seed"),
    (["--seed", "-1"], "seed"),
    (["--sample-temperature", "-1"], "sample_temperature"),
    (["--sample-top-k", "-1"], "sample_top_k"),
    (["--lr", "inf"], "lr"),
    (["--lr", "nan"], "lr"),
    (["--weight-decay", "-0.1"], "weight_decay"),
    (["--dropout", "1.5"], "dropout"),
    (["--time-limit", "inf"], "time_limit"),
    (["--device", "bogus"], "bogus"),
    (["--micro-batch", "10000000"], "memory"),
])
def test_out_of_range_options_are_refused_before_the_run_directory_is_touched(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture, flags: list[str], word: str
) -> None:
    code, _, err = train(capsys, root / "data", tmp_path / "new", *flags)
    assert_one_line_error(code, err, word)
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = train(capsys, root / "data", tmp_path / "new", "--device", "cuda")
    assert_one_line_error(code, err, "CUDA")
    assert not (tmp_path / "new").exists()


def test_a_preset_with_resume_is_refused(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = copy_run(root, tmp_path)
    code, _, err = run_cli(capsys, "train", "--out", run, "--resume", "--preset", "tiny", "--max-steps", 6)
    assert_one_line_error(code, err, "--preset", "--resume")


# --- 5: corrupt run state is one line --------------------------------------------------------------


class Evil:
    def __reduce__(self) -> tuple:
        return (os.system, ("touch EVIL_MARKER",))


@pytest.mark.parametrize("kind", ["pickle", "text", "empty", "truncated", "keys"])
def test_a_corrupt_trainer_state_is_one_line_and_runs_nothing(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    run = copy_run(root, tmp_path)
    monkeypatch.chdir(tmp_path)
    state = run / "step_000004" / "trainer_state.pt"
    if kind == "pickle":
        state.write_bytes(pickle.dumps(Evil()))
    elif kind == "text":
        state.write_text("not a checkpoint\n")
    elif kind == "empty":
        state.write_bytes(b"")
    elif kind == "truncated":
        state.write_bytes(state.read_bytes()[:1000])
    else:
        torch.save({"step": 4}, state)
    before = (run / "metrics.jsonl").read_bytes()
    code, _, err = run_cli(capsys, "train", "--out", run, "--resume", "--max-steps", 6)
    assert_one_line_error(code, err, "trainer_state.pt")
    assert not (tmp_path / "EVIL_MARKER").exists()
    assert (run / "metrics.jsonl").read_bytes() == before  # nothing was done to the run


@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage", b"../../etc\n", b"", b"step_\x00\n"])
def test_garbage_in_latest_is_one_line(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture, content: bytes
) -> None:
    run = copy_run(root, tmp_path)
    (run / "latest").write_bytes(content)
    code, _, err = run_cli(capsys, "train", "--out", run, "--resume", "--max-steps", 6)
    assert_one_line_error(code, err, "latest")
    with pytest.raises(UserError, match="latest"):
        GPT2.from_pretrained(run)


@pytest.mark.parametrize(("name", "content"), [
    ("train.toml", b"\xff\xfe\xfa"), ("train.toml", b"lr = ["), ("train.toml", b"lr = 'fast'\n"),
    ("train.toml", b"beta1 = 7.0\n"), ("metrics.jsonl", b"\xff\xfe\xfa\n"), ("metrics.jsonl", b"5\n[1, 2]\n"),
    ("metrics.jsonl", b'{"step": "a", "loss": [1]}\n'),
])
def test_garbage_in_the_saved_options_or_metrics_is_one_line(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture, name: str, content: bytes
) -> None:
    run = copy_run(root, tmp_path)
    (run / name).write_bytes(content)
    if name == "train.toml":
        code, _, err = run_cli(capsys, "train", "--out", run, "--resume", "--max-steps", 6)
    else:
        code, _, err = run_cli(capsys, "plot", run)
    assert_one_line_error(code, err, *(["metrics.jsonl"] if name == "metrics.jsonl" else []))


@pytest.mark.parametrize("damage", ["text", "bitflip"])
def test_a_damaged_pytorch_model_bin_is_one_line(tmp_path: Path, damage: str) -> None:
    model = random_model()
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    weights = tmp_path / "pytorch_model.bin"
    torch.save(model.state_dict(), weights)
    if damage == "text":
        weights.write_text("version https://git-lfs.github.com/spec/v1\n")
    else:
        raw = bytearray(weights.read_bytes())
        for i in range(0, len(raw), 97):
            raw[i] ^= 0xFF
        weights.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"pytorch_model\.bin"):
        GPT2.from_pretrained(tmp_path)


@pytest.mark.parametrize("name", ["bad.toml", "bad.yaml"])
def test_a_non_utf8_config_file_is_one_line(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture, name: str
) -> None:
    (tmp_path / name).write_bytes(b"lr = 0.1 # \xff\xfe\n")
    code, _, err = run_cli(capsys, "train", "--config", tmp_path / name, "--out", tmp_path / "new")
    assert_one_line_error(code, err, name, "UTF-8")
    with pytest.raises(UserError, match="UTF-8"):
        load_suite(tmp_path / name)


def test_shard_tokens_beyond_the_vocabulary_are_refused_up_front(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = tmp_path / "data"
    shutil.copytree(root / "data", data)
    shard = find_shards(data, "train")[0]
    tokens = np.array(read_shard(shard))
    tokens[len(tokens) // 2] = 400  # the vocabulary has 300
    write_shard(shard, tokens)
    code, _, err = run_cli(capsys, "train", "--data", data, "--out", tmp_path / "new", "--init-from",
                           root / "run", *TINY[2:], "--max-steps", 2)
    assert_one_line_error(code, err, shard.name, "400")
    assert not (tmp_path / "new").exists()


def test_a_shard_index_naming_a_path_outside_the_model_is_refused(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    model = random_model()
    model.save_pretrained(model_dir)
    (model_dir / "model.safetensors").rename(tmp_path / "outside.safetensors")
    (model_dir / "model.safetensors.index.json").write_text(
        '{"weight_map": {"transformer.wte.weight": "../outside.safetensors"}}')
    with pytest.raises(UserError, match="outside"):
        GPT2.from_pretrained(model_dir)


# --- 6: nothing a user made is destroyed by a later command ------------------------------------


def test_tokenizer_train_refuses_to_replace_a_models_tokenizer(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = copy_run(root, tmp_path)
    checkpoint = run / "step_000004"
    before = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
    code, _, err = run_cli(capsys, "tokenizer", "train", root / "words.txt", "--vocab-size", "270",
                           "--out", checkpoint)
    assert_one_line_error(code, err, "--overwrite")
    assert {p.name: p.read_bytes() for p in checkpoint.iterdir()} == before
    code, _, err = run_cli(capsys, "tokenizer", "train", root / "words.txt", "--vocab-size", "270",
                           "--out", tmp_path / "tok", "--overwrite")
    assert code == 0, err


def test_fine_tuning_into_the_run_being_replaced_is_refused(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = copy_run(root, tmp_path)
    code, _, err = run_cli(capsys, "train", "--data", root / "data", "--out", run, "--overwrite",
                           "--init-from", run, *TINY[2:], "--max-steps", 2)
    assert_one_line_error(code, err, "--init-from", "--out")
    GPT2.from_pretrained(run)  # still there


# --- 7: a full disk ------------------------------------------------------------------------------


@pytest.fixture
def small_disk(root: Path, tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A tmpfs with room for 2.5 of the module run's checkpoints; yields it and one checkpoint's bytes."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    checkpoint = sum(-(-p.stat().st_size // 4096) * 4096 for p in (root / "run" / "step_000004").iterdir())
    disk = tmp_path / "disk"
    disk.mkdir()
    size = int(2.5 * checkpoint) + 64 * 4096
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield disk, checkpoint
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_is_one_line_and_the_run_resumes_on_the_same_disk(
    root: Path, small_disk: tuple[Path, int], capsys: pytest.CaptureFixture
) -> None:
    disk, _ = small_disk
    run = disk / "run"
    code, _, err = run_cli(capsys, "train", "--data", root / "data", "--out", run, *TINY, "--max-steps", 4,
                           "--checkpoint-interval", 1, "--keep-checkpoints", 3)
    assert_one_line_error(code, err, str(run), "free")
    assert not list(run.glob(".*tmp*"))  # the half-written checkpoint is gone
    assert (run / "latest").read_text().strip() == "step_000002"
    # Room for two checkpoints is enough for --keep-checkpoints 2: the oldest goes before the next is written.
    code, _, err = run_cli(capsys, "train", "--out", run, "--resume", "--keep-checkpoints", 2)
    assert code == 0, err
    assert sorted(p.name for p in run.glob("step_*")) == ["step_000003", "step_000004"]
    assert (run / "latest").read_text().strip() == "step_000004"
    GPT2.from_pretrained(run)


# --- 9: files follow the umask ---------------------------------------------------------------------


def test_saved_files_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        random_model().save_pretrained(tmp_path)
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
