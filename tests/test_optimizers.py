"""The loss without the full logits, Muon beside AdamW, and the warm-up-stable-decay schedule:
equal losses and gradients, which parameters each optimiser holds, the schedule's shape, extending a
run from its decay's start, and the errors a user can cause. (Bit-exact resume and DDP with Muon:
tests/test_training.py runs those for both optimisers.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_one_line_error, run_cli
from test_training import NANO, data, losses  # noqa: F401  (data: the fixture)

from gpt2 import GPT2, GPT2Config
from gpt2.cli import main
from gpt2.loss import GPU_CHUNKING, IGNORE, _ChunkedLoss
from gpt2.training.config import TrainConfig
from gpt2.training.optimizers import build_optimizers, lr_factor, muon_parameters
from gpt2.training.trainer import DECAY_START_FILE

# GPT-2's own vocabulary on a tiny network: the LM head is nearly all of it.
WIDE = GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2)


def plain_and_chunked(model: GPT2, idx: torch.Tensor, targets: torch.Tensor, **kwargs: object):
    """(loss, gradients) of the plain loss on the full logits, then of the model's chunked one."""
    results = []
    for chunked in (False, True):
        model.zero_grad()
        if chunked:
            loss = model(idx, targets=targets, **kwargs)
        else:
            logits = model(idx, **kwargs).float()
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                                   reduction="sum")
        (loss * 0.01).backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    return results


@pytest.fixture(scope="module")
def wide() -> tuple[GPT2, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = GPT2(WIDE)
    idx = torch.randint(0, WIDE.vocab_size, (3, 64))
    targets = torch.randint(0, WIDE.vocab_size, (3, 64))
    targets[0, :20] = IGNORE  # untrained positions count for nothing
    return model, idx, targets


def test_the_chunked_loss_equals_the_plain_one_with_its_gradients(wide) -> None:
    model, idx, targets = wide
    (plain, plain_grads), (chunked, chunked_grads) = plain_and_chunked(model, idx, targets)
    assert torch.allclose(plain, chunked, rtol=1e-6, atol=1e-5)
    for name, grad in plain_grads.items():
        assert torch.allclose(grad, chunked_grads[name], rtol=0, atol=1e-5), name
    # Packed chat examples go through the same loss.
    segments = torch.arange(64).div(20, rounding_mode="floor").expand(3, 64)
    (plain, plain_grads), (chunked, chunked_grads) = plain_and_chunked(model, idx, targets, segments=segments)
    assert torch.allclose(plain, chunked, rtol=1e-6, atol=1e-5)
    assert all(torch.allclose(g, chunked_grads[n], rtol=0, atol=1e-5) for n, g in plain_grads.items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_gpus_way_of_cutting_the_loss_padded_head_rows_gives_the_same_loss_and_gradients(dtype) -> None:
    # A GPU pads the head's 50,257 rows to a multiple of 64 for cuBLAS's fast kernels: here on the CPU
    # with that padding and chunks that do not divide the batch, against the plain loss.
    _, pad_to = GPU_CHUNKING
    torch.manual_seed(0)
    hidden = torch.randn(70, 16, requires_grad=True)
    weight = torch.randn(WIDE.vocab_size, 16, requires_grad=True)
    targets = torch.randint(0, WIDE.vocab_size, (70,))
    targets[:9] = IGNORE
    plain = F.cross_entropy((hidden.to(dtype) @ weight.to(dtype).T).float(), targets, ignore_index=IGNORE,
                            reduction="sum")
    plain_grads = torch.autograd.grad(plain, (hidden, weight))
    cut = _ChunkedLoss.apply(hidden, weight, targets, dtype, 32, pad_to)
    cut_grads = torch.autograd.grad(cut, (hidden, weight))
    rtol = 1e-5 if dtype == torch.float32 else 4e-3
    assert cut.dtype == torch.float32 and torch.allclose(plain, cut, rtol=rtol)
    for p, c in zip(plain_grads, cut_grads, strict=True):
        assert c.shape == p.shape and c.dtype == p.dtype
        # float32: sums of 50,257 terms in another order (chunks, threads) differ by ~1e-5 of the largest
        assert (p - c).abs().max() < (5e-5 if dtype == torch.float32 else 0.02) * p.abs().max()


def test_under_bfloat16_autocast_the_chunked_loss_is_within_its_rounding(wide) -> None:
    model, idx, targets = wide
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (plain, plain_grads), (chunked, chunked_grads) = plain_and_chunked(model, idx, targets)
    assert torch.allclose(plain, chunked, rtol=2e-3)  # bfloat16 keeps 8 bits: 4e-3 per value
    head = "transformer.wte.weight"
    scale = plain_grads[head].abs().max()
    assert (plain_grads[head] - chunked_grads[head]).abs().max() < 0.02 * scale


def test_muon_holds_exactly_the_blocks_weight_matrices(wide) -> None:
    model, _, _ = wide
    cfg = TrainConfig(optimizer="muon")
    adamw, muon = build_optimizers(model, cfg, torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    in_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    assert in_muon == set(muon_parameters(model))
    blocks = {n for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2}
    assert in_muon == blocks
    assert in_muon.isdisjoint(in_adamw) and in_muon | in_adamw == set(names.values())
    assert "transformer.wte.weight" in in_adamw and "transformer.wpe.weight" in in_adamw
    assert all(g["lr"] == cfg.muon_settings()[0] for g in muon.param_groups)
    (only,) = build_optimizers(model, TrainConfig(), torch.device("cpu"))
    assert isinstance(only, torch.optim.AdamW)


def test_wsd_holds_the_peak_then_decays_linearly_over_the_last_fraction() -> None:
    cfg = TrainConfig(lr_schedule="wsd", decay_fraction=0.25, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(cfg, 4, 0.005) == pytest.approx(0.5)  # warming up
    assert lr_factor(cfg, 200, 0.2) == lr_factor(cfg, 700, 0.75) == 1.0  # stable
    assert lr_factor(cfg, 875, 0.875) == pytest.approx(0.55)  # half-way down the line to 0.1
    assert lr_factor(cfg, 1000, 1.0) == pytest.approx(0.1)
    cosine = TrainConfig(warmup_steps=0)  # the default: a cosine over the whole run, as nanoGPT's
    assert lr_factor(cosine, 500, 0.5) == pytest.approx(0.55)
    assert lr_factor(cosine, 250, 0.25) == pytest.approx(0.1 + 0.9 * (0.5 + 0.5 * 2**-0.5))


def test_a_wsd_run_keeps_its_decay_start_and_extends_from_it(data: Path, tmp_path: Path) -> None:  # noqa: F811
    run = tmp_path / "wsd"
    args = ["train", "--data", data, "--out", run, *NANO, "--optimizer", "muon", "--lr-schedule", "wsd",
            "--decay-fraction", "0.5", "--max-steps", "20", "--eval-interval", "0", "--keep-checkpoints", "1",
            "--checkpoint-interval", "4"]
    assert main([str(a) for a in args]) == 0
    kept = sorted(p.name for p in run.glob("step_*"))
    # Steps 1-11 ran at the peak (the 11th at progress 10/20, the decay's start): kept past pruning.
    assert kept == ["step_000011", "step_000020"] and (run / "step_000011" / DECAY_START_FILE).is_file()
    lrs = losses(run, "lr")
    assert lrs[5:11] == [3e-3] * 6 and lrs[11] < 3e-3 and lrs[-1] == pytest.approx(3e-3 * (0.1 + 0.9 * 0.1))
    # Twice as long, from the stable phase's end: the rate stays at its peak to step 21, then decays.
    (run / "latest").write_text("step_000011\n")
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "40"]) == 0
    lrs = losses(run, "lr")
    assert len(lrs) == 40 and lrs[11:21] == [3e-3] * 10 and lrs[21] < 3e-3
    assert (run / "step_000021" / DECAY_START_FILE).is_file() and (run / "step_000040").is_dir()


@pytest.mark.parametrize("options, words", [
    (["--optimizer", "sgd"], ["optimizer must be adamw or muon", "'sgd'"]),
    (["--lr-schedule", "linear"], ["lr_schedule must be cosine or wsd"]),
    (["--decay-fraction", "0"], ["decay_fraction must be in (0, 1]"]),
    (["--lr-schedule", "wsd", "--decay-fraction", "1.5"], ["decay_fraction must be in (0, 1]"]),
    (["--muon-lr", "0.02"], ["muon_lr is an option of Muon", "--optimizer muon"]),
    (["--muon-momentum", "0.9"], ["muon_momentum is an option of Muon"]),
    (["--optimizer", "muon", "--muon-momentum", "1.5"], ["muon_momentum in [0, 1)"]),
    (["--optimizer", "muon", "--fsdp"], ["--optimizer muon with --fsdp", "drop --fsdp"]),
])
def test_bad_optimizer_and_schedule_options_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture, options: list[str], words: list[str]
) -> None:
    code, _, err = run_cli(capsys, "train", "--data", tmp_path, "--out", tmp_path / "run", "--preset", "nano",
                           "--max-steps", 1, *options)
    assert_one_line_error(code, err, *words)
    assert not (tmp_path / "run").exists()
