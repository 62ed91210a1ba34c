"""Training: learning, exact resume after SIGKILL, kills while checkpointing, DDP through torchrun,
fine-tuning a transformers checkpoint, options files, and the errors a user can cause."""

from __future__ import annotations

import json
import math
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run_cli
from safetensors.torch import load_file

from gpt2 import GPT2, Tokenizer, UserError
from gpt2.cli import main
from gpt2.data.shards import find_shards, read_shard
from gpt2.training.config import load_config
from gpt2.training.metrics import read_metrics
from gpt2.training.trainer import train

# A model of 0.1M parameters (+ embeddings) on sequences of 64: a step takes milliseconds.
NANO = [
    "--preset",
    "nano",
    "--seq-len",
    "64",
    "--micro-batch",
    "8",
    "--lr",
    "3e-3",
    "--warmup-steps",
    "5",
    "--eval-tokens",
    "2048",
    "--sample-tokens",
    "0",
    "--log-interval",
    "0",
]


@pytest.fixture(scope="module")
def data(shakespeare_files: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~250 KB of two plays, a 512-token vocabulary trained on them, shards with 5% validation."""
    root = tmp_path_factory.mktemp("training")
    corpus = root / "corpus"
    corpus.mkdir()
    for path in shakespeare_files:
        if path.name in ("hamlet_gut.txt", "macbeth_gut.txt"):
            (corpus / path.name).write_text(path.read_text(encoding="utf-8")[:125_000], encoding="utf-8")
    assert main(["prepare", str(corpus), "--vocab-size", "512", "--out", str(root / "data")]) == 0
    return root / "data"


def gpt2_command(*args: object) -> list[str]:
    return [sys.executable, "-m", "gpt2", *(str(a) for a in args)]


def losses(run: Path, key: str = "loss") -> list[float]:
    return [r[key] for r in read_metrics(run) if key in r]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / (run / "latest").read_text().strip() / "model.safetensors")


def test_loss_falls_well_below_the_unigram_entropy(data: Path, tmp_path: Path) -> None:
    tokens = np.concatenate([read_shard(p) for p in find_shards(data, "train")])
    p = np.bincount(tokens) / tokens.size
    unigram_entropy = float(-(p[p > 0] * np.log(p[p > 0])).sum())  # nats per token
    run = tmp_path / "run"
    result = train(
        load_config(data=str(data), out=str(run), preset="nano", seq_len=64, micro_batch=16, max_steps=250,
                    lr=1e-2, warmup_steps=10, eval_interval=0, eval_tokens=8192, sample_tokens=0,
                    log_interval=0)
    )
    assert result.step == 250 and result.val_loss is not None
    assert result.val_loss < unigram_entropy - 0.5, (result.val_loss, unigram_entropy)
    assert losses(run)[0] > unigram_entropy  # it started from a uniform guess, ln(512) = 6.24
    # The run holds everything: config, metrics, plot, and a checkpoint that loads with its tokenizer.
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_config(resume=True, out=str(run)).max_steps == 250  # train.toml repeats the run
    model = GPT2.from_pretrained(run)
    assert model.tokenizer is not None and model.tokenizer.n_vocab == Tokenizer.from_pretrained(data).n_vocab


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_after_sigkill_is_bit_exact(data: Path, tmp_path: Path, optimizer: str) -> None:
    args = [
        "train",
        "--data",
        data,
        *NANO,
        "--optimizer",
        optimizer,
        "--max-steps",
        60,
        "--checkpoint-interval",
        10,
        "--eval-interval",
        20,
        "--keep-checkpoints",
        0,
    ]
    reference = subprocess.Popen(
        gpt2_command(*args, "--out", tmp_path / "ref"), stdout=subprocess.DEVNULL
    )
    killed_run = tmp_path / "killed"
    victim = subprocess.Popen(
        [sys.executable, "-c", STOPPER, "15", *map(str, args), "--out", killed_run],
        stdout=subprocess.DEVNULL,
    )
    _, status = os.waitpid(victim.pid, os.WUNTRACED)  # until it stops itself, mid-run
    assert os.WIFSTOPPED(status), "the run ended before it could be killed"
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    assert (killed_run / "latest").exists() and len(losses(killed_run)) >= 13
    assert not (killed_run / "step_000060").exists()
    subprocess.run(gpt2_command("train", "--out", killed_run, "--resume"), check=True,
                   stdout=subprocess.DEVNULL)
    assert reference.wait() == 0
    expected, resumed = final_weights(tmp_path / "ref"), final_weights(killed_run)
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
    assert losses(killed_run) == losses(tmp_path / "ref")  # the log was cut back to the checkpoint
    assert losses(killed_run, "val_loss") == losses(tmp_path / "ref", "val_loss")


# Runs `gpt2 train ...` that stops itself (SIGSTOP) at its AT-th training step, just after the first
# optimizer's update (torch's hook after each optimizer step; the training itself is ours, unchanged), for
# the test to kill it there: mid-run, at a step that no timing moves.
STOPPER = """
import os, signal, sys
from torch.optim.optimizer import register_optimizer_step_post_hook
at, counted = int(sys.argv[1]), []
def stop_at(optimizer, args, kwargs):
    if not counted or optimizer is counted[0]:  # the first optimizer's steps (AdamW; Muon beside it)
        counted.append(optimizer)
        if len(counted) == at:
            os.kill(os.getpid(), signal.SIGSTOP)
register_optimizer_step_post_hook(stop_at)
from gpt2.cli import main
sys.exit(main(sys.argv[2:]))
"""


# Runs `gpt2 train ...` with one OS call replaced by SIGKILL once the first checkpoint is complete.
KILLER = """
import os, signal, sys
from pathlib import Path
mode, run = sys.argv[1], Path(sys.argv[2])
real = {"files": os.fsync, "rename": os.rename, "latest": os.replace}[mode]
def maybe_die(*args, **kwargs):
    target = Path(str(args[-1])).name if mode != "files" else ""
    if (run / "latest").exists() and (mode == "files" or target == {"rename": "step_000020",
                                                                       "latest": "latest"}[mode]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
setattr(os, {"files": "fsync", "rename": "rename", "latest": "replace"}[mode], maybe_die)
from gpt2.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.slow
def test_a_kill_while_writing_a_checkpoint_leaves_the_previous_one_loadable(
    data: Path, tmp_path: Path
) -> None:
    # Killed while writing the files, at the rename of the finished directory, and when `latest`
    # is about to name it.
    modes = ["files", "rename", "latest"]
    procs = {}
    for mode in modes:
        run = tmp_path / mode
        procs[mode] = subprocess.Popen(
            [
                sys.executable,
                "-c",
                KILLER,
                mode,
                run,
                "train",
                "--data",
                data,
                "--out",
                run,
                *NANO,
                "--max-steps",
                "20",
                "--checkpoint-interval",
                "10",
                "--eval-interval",
                "0",
            ],
            stdout=subprocess.DEVNULL,
        )
    for mode in modes:
        assert procs[mode].wait() == -signal.SIGKILL, mode
        run = tmp_path / mode
        assert (run / "latest").read_text().strip() == "step_000010"
        model = GPT2.from_pretrained(run)
        saved = load_file(run / "step_000010" / "model.safetensors")
        assert torch.equal(model.transformer.wte.weight, saved["transformer.wte.weight"])
        assert model.tokenizer is not None
    # Resuming cleans up: the complete but unannounced step_000020 is written again and announced.
    run = tmp_path / "latest"
    assert (run / "step_000020").is_dir()
    subprocess.run(
        gpt2_command("train", "--out", run, "--resume"), check=True, stdout=subprocess.DEVNULL
    )
    assert (run / "latest").read_text().strip() == "step_000020"
    assert GPT2.from_pretrained(run).config.n_layer == 2
    assert not [p for p in run.iterdir() if ".tmp" in p.name]


# Two processes accumulating two micro-batches of 4 (gradients synchronised on the second only) against
# one process accumulating four: the same global batch.
DISTRIBUTED = ["--max-steps", 6, "--eval-interval", 3, "--dtype", "float32", "--micro-batch", 4,
               "--batch-tokens", 2 * 2 * 4 * 64]
TORCHRUN = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2"]


def torchrun(*args: object) -> str:
    """``gpt2 ARGS`` in 2 processes under real torchrun; its standard output."""
    return subprocess.run([*TORCHRUN, "-m", "gpt2", *(str(a) for a in args)], check=True,
                          capture_output=True, text=True, timeout=300).stdout


def two_processes_beside_one(data: Path, two: Path, one: Path, *options: object) -> str:
    """Train the same run in 2 processes (out ``two``) and in 1 (out ``one``), side by side, both with
    ``options`` (--fsdp only applies to the 2 processes); the 2-process run's standard output."""
    args = ["train", "--data", data, *NANO, *DISTRIBUTED]
    alone = [o for o in options if o != "--fsdp"]
    single = subprocess.Popen(gpt2_command(*args, *alone, "--out", one), stdout=subprocess.DEVNULL)
    out = torchrun(*args, *options, "--out", two)
    assert single.wait() == 0
    return out


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(
    data: Path, tmp_path: Path, optimizer: str
) -> None:
    one, two = tmp_path / "one", tmp_path / "ddp"
    two_processes_beside_one(data, two, one, "--optimizer", optimizer)
    assert len(losses(one)) == len(losses(two)) == 6
    # Muon orthogonalises in bfloat16 (torch.optim.Muon): the processes' other order of summing
    # gradients can round an update's element the other way, which the steps carry to ~1e-5 * loss
    # (seen: 3.4e-6 relative on an AMD EPYC, where AdamW's runs agree to 1e-6).
    rtol = 1e-5 if optimizer == "muon" else 0
    assert np.allclose(losses(one), losses(two), rtol=rtol, atol=1e-5), (losses(one), losses(two))
    assert np.allclose(losses(one, "val_loss"), losses(two, "val_loss"), rtol=rtol, atol=1e-5)


@pytest.mark.slow
def test_fsdp_matches_one_process_and_its_checkpoints_load_and_resume(data: Path, tmp_path: Path) -> None:
    run, one = tmp_path / "fsdp", tmp_path / "one"
    out = two_processes_beside_one(data, run, one, "--fsdp", "--checkpoint-interval", 3,
                                   "--keep-checkpoints", 0)
    assert "on 2 x cpu (float32, sharded by FSDP)" in out and "2 process(es) x 2 accumulation" in out
    assert len(losses(run)) == 6
    for key in ("loss", "grad_norm", "val_loss"):
        assert np.allclose(losses(one, key), losses(run, key), rtol=0, atol=1e-5), (key, losses(one, key))
    # The gathered checkpoint is an ordinary one: it loads, tokenizer included, with the same weights.
    model, reference = GPT2.from_pretrained(run), GPT2.from_pretrained(one)
    assert model.tokenizer is not None and model.lm_head.weight is model.transformer.wte.weight
    for name, tensor in reference.state_dict().items():
        assert torch.allclose(model.state_dict()[name], tensor, rtol=0, atol=1e-5), name
    # Resumed from its step-3 checkpoint (as if stopped there), it repeats steps 4-6 exactly: the
    # sharded optimiser state, RNG and data position came back. train.toml keeps --fsdp on.
    expected, expected_losses = final_weights(run), losses(run)
    (run / "latest").write_text("step_000003\n")
    out = torchrun("train", "--out", run, "--resume")
    assert "sharded by FSDP" in out and "resuming at step 3" in out
    assert (run / "latest").read_text().strip() == "step_000006"
    assert losses(run) == expected_losses
    resumed = final_weights(run)
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)

def test_fine_tuning_a_transformers_checkpoint_loads_back_in_transformers(data: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    tokenizer = Tokenizer.from_pretrained(data)
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=tokenizer.n_vocab, n_positions=64, n_embd=32, n_layer=2, n_head=2
    )
    original = transformers.GPT2LMHeadModel(config)
    original.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    run = tmp_path / "run"
    result = train(
        load_config(data=str(data), out=str(run), init_from=str(tmp_path / "hf"), seq_len=64, micro_batch=8,
                    lr=3e-3, warmup_steps=2, max_steps=30, eval_interval=0, eval_tokens=2048, sample_tokens=0,
                    log_interval=0)
    )
    assert result.val_loss is not None and result.val_loss < losses(run)[0] - 0.5
    tuned = transformers.GPT2LMHeadModel.from_pretrained(result.checkpoint).eval()
    ours = GPT2.from_pretrained(run).eval()
    ids = torch.tensor([tokenizer.encode("To be, or not to be, that is the question:")])
    with torch.no_grad():
        assert torch.allclose(tuned(ids).logits, ours(ids), atol=1e-4)
        assert not torch.allclose(original.eval()(ids).logits, ours(ids), atol=1e-2)


def test_options_come_from_toml_or_yaml_and_the_command_line_wins(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text('data = "d"\nout = "r"\npreset = "tiny"\nmax_steps = 5\nlr = 1\n')
    (tmp_path / "a.yaml").write_text("data: d\nout: r\npreset: tiny\nmax_steps: 5\nlr: 1\n")
    for name in ("a.toml", "a.yaml"):
        cfg = load_config(tmp_path / name, max_steps=7)
        assert (cfg.preset, cfg.max_steps, cfg.lr) == ("tiny", 7, 1.0)
    (tmp_path / "b.toml").write_text('data = "d"\nout = "r"\npreset = "tiny"\nmax_step = 5\n')
    with pytest.raises(UserError, match="unknown option 'max_step'"):
        load_config(tmp_path / "b.toml")
    (tmp_path / "c.yaml").write_text("data: d\nout: r\npreset: tiny\nmax_steps: many\n")
    with pytest.raises(UserError, match="max_steps"):
        load_config(tmp_path / "c.yaml")


def test_bad_training_inputs_are_one_line_errors_and_nothing_is_overwritten(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    fresh = tmp_path / "fresh"
    code, _, err = run_cli(
        capsys, "train", "--data", data, "--out", fresh, "--preset", "huge", "--max-steps", 1
    )
    assert_one_line_error(code, err, "unknown preset 'huge'")
    code, _, err = run_cli(capsys, "train", "--data", data, "--out", fresh, "--resume")
    assert_one_line_error(code, err, "--resume", "no checkpoint")
    assert not fresh.exists()

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x_train_000000.bin").write_bytes(struct.pack("<256i", 1234, 1, 2, *([0] * 253)) + b"\0" * 4)
    code, _, err = run_cli(
        capsys, "train", "--data", bad, "--out", fresh, "--preset", "nano", "--max-steps", 1
    )
    assert_one_line_error(code, err, "x_train_000000.bin", "magic number 1234")
    assert not fresh.exists()

    run = tmp_path / "run"
    args = ["train", "--data", data, "--out", run, *NANO, "--max-steps", 2, "--eval-interval", 0]
    assert main([str(a) for a in args]) == 0
    capsys.readouterr()
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, _, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, str(run), "--resume", "--overwrite")
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert main([str(a) for a in [*args, "--overwrite", "--max-steps", 3]]) == 0
    assert (run / "latest").read_text().strip() == "step_000003" and not (run / "step_000002").exists()

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    code, _, err = run_cli(
        capsys, "train", "--data", data, "--out", tmp_path / "other", *NANO, "--max-steps", 1, "--overwrite"
    )
    assert_one_line_error(code, err, "holds no training run")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    assert math.isfinite(json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["val_loss"])
