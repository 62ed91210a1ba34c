"""Knowledge distillation (``gpt2 train --distill-from TEACHER``): the loss against a direct
computation, in value and gradient; a student that ends nearer its teacher; bit-exact resume; the
teachers and options that are refused in one line.

The runs use tiny models over bytes (``BYTES``) on a few kilobytes of Hamlet: a step takes
milliseconds. The teacher is a random model whose LM head is scaled up, so that its next-token
distributions are sharp and depend on the context: far from a new student's near-uniform ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import BYTES, assert_one_line_error, random_model, run_cli, saved_model_dir
from safetensors.torch import load_file

from gpt2 import GPT2, Tokenizer
from gpt2 import loss as loss_module
from gpt2.cli import main
from gpt2.data.loader import ShardLoader
from gpt2.data.shards import find_shards, write_shard
from gpt2.loss import IGNORE, SoftTargets, distillation_loss, lm_loss
from gpt2.training.metrics import read_metrics

SEQ = 64
TINY = ["--seq-len", SEQ, "--micro-batch", 8, "--lr", "3e-3", "--warmup-steps", 5, "--eval-tokens", 1024,
        "--sample-tokens", 0, "--log-interval", 0]


def direct_losses(hidden: torch.Tensor, weight: torch.Tensor, soft: SoftTargets) -> tuple[torch.Tensor, ...]:
    """The mean soft loss ``T^2 KL(softmax(u/T) || softmax(z/T))`` and cross-entropy over the trained
    positions, from the whole logits, by torch's own functions."""
    t = soft.temperature
    student, teacher = hidden @ weight.T, soft.teacher_hidden @ soft.teacher_weight.T
    kl = F.kl_div(F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1), log_target=True,
                  reduction="none").sum(dim=-1)
    trained = soft.targets != IGNORE
    soft_loss = t**2 * kl[trained].mean()
    hard_loss = F.cross_entropy(student.flatten(0, -2), soft.targets.flatten(), ignore_index=IGNORE)
    return soft.soft_weight * soft_loss + (1 - soft.soft_weight) * hard_loss, soft_loss, hard_loss


@pytest.mark.parametrize("temperature, soft_weight, chunking", [
    (2.0, 1.0, None),  # the defaults, one chunk
    (0.7, 0.3, (37 * 4 * 5, 8)),  # 5 positions a chunk, the head padded to 40 rows
    (3.0, 0.0, (37 * 4 * 2, 64)),
])
def test_the_loss_and_its_gradient_equal_a_direct_computation(
    monkeypatch: pytest.MonkeyPatch, temperature: float, soft_weight: float, chunking: tuple | None
) -> None:
    if chunking is not None:
        monkeypatch.setitem(loss_module.CHUNKING, "cpu", chunking)
    g = torch.Generator().manual_seed(0)
    vocab, width, teacher_width = 37, 16, 24
    hidden = torch.randn(3, 11, width, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, width, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(vocab, (3, 11), generator=g)
    targets[0, :4] = targets[2, -3:] = IGNORE  # a prompt and padding: no loss of either kind there
    soft = SoftTargets(targets, 2 * torch.randn(3, 11, teacher_width, generator=g, dtype=torch.float64),
                       torch.randn(vocab, teacher_width, generator=g, dtype=torch.float64), temperature,
                       soft_weight)
    n = (targets != IGNORE).sum()
    total, soft_sum, hard_sum = distillation_loss(hidden, weight, soft)
    expected = direct_losses(hidden, weight, soft)
    for got, want in zip((total / n, soft_sum / n, hard_sum / n), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    grads = torch.autograd.grad(total / n, (hidden, weight))
    for got, want in zip(grads, torch.autograd.grad(expected[0], (hidden, weight)), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert not soft_sum.requires_grad and not hard_sum.requires_grad
    # Given as the targets of lm_loss (as the model's forward passes them on): the same loss, its parts
    # set on the targets for the log.
    torch.testing.assert_close(lm_loss(hidden, weight, soft), total, rtol=0, atol=0)
    assert torch.equal(soft.soft, soft_sum) and torch.equal(soft.hard, hard_sum)


# ---------------------------------------------------------------------------------------------
# Training runs


@pytest.fixture(scope="module")
def data(shakespeare_files: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Hamlet's first 40 KB as bytes: 36 KB to train on, 4 KB held out; BYTES beside the shards."""
    hamlet = next(p for p in shakespeare_files if p.name == "hamlet_gut.txt").read_bytes()[:40_000]
    tokens = np.frombuffer(hamlet, dtype=np.uint8).astype(np.uint16)
    root = tmp_path_factory.mktemp("data")
    write_shard(root / "hamlet_train_000000.bin", tokens[:36_000])
    write_shard(root / "hamlet_val_000000.bin", tokens[36_000:])
    BYTES.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random model over BYTES whose logits are 25 times a new model's (sharp distributions), saved
    with dropout in its config, which a teacher never uses."""
    model = random_model(seed=1, tokenizer=BYTES)
    with torch.no_grad():
        model.lm_head.weight.mul_(25)
    model.set_dropout(0.1)
    return saved_model_dir(model, tmp_path_factory)


@pytest.fixture(scope="module")
def student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new draft-sized model: one layer, to the teacher's two."""
    return saved_model_dir(random_model(n_layer=1, seed=2, tokenizer=BYTES), tmp_path_factory)


def held_out_kl(student: GPT2, teacher: GPT2, data: Path) -> float:
    """The mean KL divergence from the teacher's next-token distribution to the student's (T = 1)
    over the held-out tokens, in windows of SEQ."""
    tokens = np.fromfile(data / "hamlet_val_000000.bin", dtype="<u2", offset=1024).astype(np.int64)
    ids = torch.from_numpy(tokens[: len(tokens) // SEQ * SEQ]).view(-1, SEQ)
    with torch.no_grad():
        p, q = F.log_softmax(student.eval()(ids), dim=-1), F.log_softmax(teacher.eval()(ids), dim=-1)
    return F.kl_div(p, q, log_target=True, reduction="none").sum(-1).mean().item()


def test_a_distilled_student_ends_nearer_its_teacher(data: Path, student: Path, teacher: Path,
                                                      tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    code, out, _ = run_cli(capsys, "train", "--data", data, "--out", run, "--init-from", student,
                           "--distill-from", teacher, *TINY, "--max-steps", 40, "--eval-interval", 0)
    assert code == 0 and f"distilled from {teacher}" in out
    the_teacher = GPT2.from_pretrained(teacher)
    before = held_out_kl(GPT2.from_pretrained(student), the_teacher, data)
    after = held_out_kl(GPT2.from_pretrained(run), the_teacher, data)
    assert after < 0.6 * before, (before, after)  # measured: 5.13 -> 2.53 nats
    steps = [r for r in read_metrics(run) if "loss" in r]
    assert len(steps) == 40 and all("soft_loss" in r for r in steps)
    first, last = np.mean([r["soft_loss"] for r in steps[:5]]), np.mean([r["soft_loss"] for r in steps[-5:]])
    assert last < 0.8 * first, (first, last)  # measured: 14.7 -> 10.8 (T = 2)


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / (run / "latest").read_text().strip() / "model.safetensors")


def test_resume_is_bit_exact_and_reloads_the_teacher(data: Path, student: Path, teacher: Path,
                                                     tmp_path: Path) -> None:
    """A run with gradient accumulation, dropout and half the loss from the teacher; then the same
    run from its middle checkpoint, resumed with --resume alone (the teacher comes from train.toml)."""
    run = tmp_path / "run"
    args = ["train", "--data", data, "--out", run, "--init-from", student, "--distill-from", teacher,
            "--distill-temperature", 1.5, "--distill-weight", 0.5, "--dropout", 0.1, *TINY,
            "--batch-tokens", 2 * 8 * SEQ, "--max-steps", 8, "--checkpoint-interval", 4, "--eval-interval", 4,
            "--keep-checkpoints", 0]
    assert main([str(a) for a in args]) == 0
    expected, records = final_weights(run), read_metrics(run)
    (run / "latest").write_text("step_000004\n")  # as if killed after the middle checkpoint
    for path in (run / "step_000008").iterdir():
        path.unlink()
    (run / "step_000008").rmdir()
    assert main(["train", "--out", str(run), "--resume"]) == 0
    resumed = final_weights(run)
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
    assert read_metrics(run) == [{**r, **{k: v for k, v in new.items() if k in ("elapsed", "tokens_per_s")}}
                                 for r, new in zip(records, read_metrics(run), strict=True)]


def test_on_chat_data_the_soft_loss_is_over_the_replies_of_each_example_alone(
    student: Path, teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The first step's logged soft loss, against the models run on its two micro-batches here: each
    packed example attends only within itself (the teacher too), and only the replies count."""
    records = [{"prompt": "Hi" * (k % 3 + 1), "completion": "ok " * (k % 4 + 1)} for k in range(30)]
    jsonl = tmp_path / "chat.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    code, _, err = run_cli(capsys, "prepare", jsonl, "--tokenizer", student, "--out", tmp_path / "chat",
                           "--seq-len", SEQ)
    assert code == 0, err
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--data", tmp_path / "chat", "--out", run, "--init-from", student,
                           "--distill-from", teacher, *TINY, "--micro-batch", 2, "--batch-tokens", 4 * SEQ,
                           "--max-steps", 1, "--eval-interval", 0, "--dropout", 0, "--dtype", "float32",
                           "--seed", 3)
    assert code == 0, err
    (logged,) = [r["soft_loss"] for r in read_metrics(run) if "soft_loss" in r]
    the_student, the_teacher = GPT2.from_pretrained(student).eval(), GPT2.from_pretrained(teacher).eval()
    loader = ShardLoader(find_shards(tmp_path / "chat", "train"), 2, SEQ, seed=3, masked=True)
    kls = []
    for _ in range(2):
        batch = loader.next_batch()
        assert batch.segments is not None  # trained tokens in a window's second example:
        assert ((batch.segments > batch.segments[:, :1]) & (batch.targets != IGNORE)).any()
        with torch.no_grad():
            p = F.log_softmax(the_student(batch.inputs, segments=batch.segments) / 2, dim=-1)
            q = F.log_softmax(the_teacher(batch.inputs, segments=batch.segments) / 2, dim=-1)
        kl = F.kl_div(p, q, log_target=True, reduction="none").sum(dim=-1)
        kls.append(kl[batch.targets != IGNORE])
    assert 0 < sum(len(k) for k in kls) < 4 * SEQ / 2  # the prompts are not trained
    assert logged == pytest.approx(4 * torch.cat(kls).mean().item(), rel=1e-5)


def test_teachers_and_options_that_cannot_work_are_one_line_errors(
    data: Path, student: Path, teacher: Path, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path,
    capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    base = ["train", "--data", data, "--out", out, "--init-from", student, *TINY, "--max-steps", 1]
    reversed_bytes = Tokenizer({bytes([255 - i]): i for i in range(256)})  # 257 tokens, other ids
    cases = [
        (random_model(300, tokenizer=None), ["vocabulary of 300", "the student 257", "--tokenizer"]),
        (random_model(tokenizer=reversed_bytes), ["another tokenizer", "--tokenizer"]),
        (random_model(n_positions=32, tokenizer=BYTES), ["context of 32", "--seq-len 32"]),
    ]
    for model, words in cases:
        code, _, err = run_cli(capsys, *base, "--distill-from", saved_model_dir(model, tmp_path_factory))
        assert_one_line_error(code, err, "--distill-from", *words)
    for option, value, words in [
        ("--distill-temperature", 0, ["distill_temperature", "positive"]),
        ("--distill-temperature", "nan", ["distill_temperature", "positive"]),
        ("--distill-temperature", "inf", ["distill_temperature", "finite"]),
        ("--distill-weight", 1.5, ["distill_weight", "[0, 1]"]),
        ("--distill-weight", -0.1, ["distill_weight", "[0, 1]"]),
    ]:
        code, _, err = run_cli(capsys, *base, "--distill-from", teacher, option, value)
        assert_one_line_error(code, err, *words)
    code, _, err = run_cli(capsys, *base, "--distill-temperature", 3)
    assert_one_line_error(code, err, "distill_temperature", "give --distill-from TEACHER")
    assert not out.exists()


def test_help_describes_the_options(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        run_cli(capsys, "train", "--help")
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for words in ("--distill-from FROM", "teacher's next-token distribution", "--distill-temperature",
                  "multiplied by T^2", "(default 2.0)", "--distill-weight", "(default 1.0)"):
        assert words in text, words
