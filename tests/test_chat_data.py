"""Chat and instruction data: the three JSONL formats to masked, packed shards, and supervised
fine-tuning on them (the loss over the assistant's tokens only, per trained token, across
micro-batches and processes), and the one-line errors for bad examples."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_one_line_error, random_model, run_cli
from safetensors.torch import load_file

from gpt2 import GPT2, Tokenizer
from gpt2.data.chat import example_messages, read_chat_info
from gpt2.data.loader import ShardLoader
from gpt2.data.shards import LOSS, START, find_shards, read_mask, read_shard
from gpt2.loss import IGNORE
from gpt2.tokenizer.chat_template import GPT2_CHAT_TEMPLATE, ChatTemplate
from gpt2.training.metrics import read_metrics

EXAMPLES = [
    {"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi!"},
                  {"role": "assistant", "content": "Hello there."}, {"role": "user", "content": "Café?"},
                  {"role": "assistant", "content": "Oui, un café."}]},
    {"prompt": "What is 2 + 3?", "completion": "5"},
    {"instruction": "Reverse the word.", "input": "stone", "output": "enots"},
    {"instruction": "Say yes.", "output": "yes"},
]
SEQ = 48
TRAIN = ["--seq-len", SEQ, "--micro-batch", 2, "--max-steps", 1, "--warmup-steps", 0, "--lr", 1e-2,
         "--eval-interval", 0, "--sample-tokens", 0, "--log-interval", 0, "--dropout", 0,
         "--dtype", "float32"]


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def base(gpt2_tokenizer: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny model over GPT-2's real vocabulary, saved with its tokenizer (no template)."""
    directory = tmp_path_factory.mktemp("base")
    random_model(gpt2_tokenizer.n_vocab, n_positions=SEQ, tokenizer=gpt2_tokenizer).save_pretrained(directory)
    return directory


def prepare(
    capsys: pytest.CaptureFixture, records: list[object], out: Path, base: Path, *options: object
) -> str:
    code, stdout, err = run_cli(capsys, "prepare", write_jsonl(out.with_suffix(".jsonl"), records),
                                "--tokenizer", base, "--out", out, "--seq-len", SEQ, *options)
    assert code == 0, err
    return stdout


def test_the_three_formats_train_on_the_replies_only_as_transformers_marks_them(
    capsys: pytest.CaptureFixture, base: Path, tmp_path: Path
) -> None:
    transformers = pytest.importorskip("transformers")
    out = prepare(capsys, EXAMPLES, tmp_path / "chat", base, "--val-fraction", 0)
    assert "wrote 4 training and 0 validation examples" in out
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "chat")  # the template is saved with it
    expected_ids, expected_mask = [], []
    for record in EXAMPLES:
        encoded = hf.apply_chat_template(example_messages(record, "test"), tokenize=True, return_dict=True,
                                         return_assistant_tokens_mask=True)
        expected_ids.append(encoded["input_ids"])
        expected_mask.append(encoded["assistant_masks"])
    (shard,) = find_shards(tmp_path / "chat", "train")
    tokens, mask = np.asarray(read_shard(shard)), np.asarray(read_mask(shard, len(read_shard(shard))))
    starts = np.flatnonzero(mask & START)
    found = [(tokens[a:b].tolist(), (mask[a:b] & LOSS).astype(bool).astype(int).tolist())
             for a, b in zip(starts, [*starts[1:], len(tokens)], strict=True)]
    real = [f for f in found if f[0][0] == hf.eos_token_id and len(f[0]) > 1 and any(f[1])]
    assert [ids for ids, _ in real] == expected_ids  # packed whole, in order, between padding
    assert [m for _, m in real] == expected_mask
    # What the trainer is asked to predict: the replies and their end-of-turn markers, nothing else.
    tokenizer = Tokenizer.from_pretrained(tmp_path / "chat")
    loader = ShardLoader([shard], batch_size=1, seq_len=SEQ, shuffle=False)
    learnt = []
    for _ in range(loader.num_samples):
        targets = loader.next_batch().targets[0]
        learnt.append(tokenizer.decode(targets[targets != IGNORE].tolist()))
    replies = ["Hello there.", "Oui, un café.", "5", "enots", "yes"]
    assert "".join(learnt) == "".join(f" {reply}<|endoftext|>" for reply in replies)


def test_packed_examples_are_computed_as_if_each_were_alone(
    capsys: pytest.CaptureFixture, base: Path, tmp_path: Path
) -> None:
    prepare(capsys, EXAMPLES[1:], tmp_path / "chat", base, "--val-fraction", 0)
    (shard,) = find_shards(tmp_path / "chat", "train")
    batch = ShardLoader([shard], batch_size=1, seq_len=SEQ, shuffle=False).next_batch()
    assert batch.segments is not None and batch.segments[0].unique().numel() >= 4  # 3 examples + padding
    model = GPT2.from_pretrained(base)
    packed = model(batch.inputs, segments=batch.segments)[0]
    alone = []
    for segment in batch.segments[0].unique():
        where = batch.segments[0] == segment
        alone.append(model(batch.inputs[:, where])[0])
    assert torch.allclose(packed, torch.cat(alone), atol=1e-5)


def test_an_example_longer_than_the_window_is_truncated_or_dropped_and_counted(
    capsys: pytest.CaptureFixture, base: Path, tmp_path: Path
) -> None:
    long = {"prompt": "word " * 30, "completion": "reply " * 30}
    out = prepare(capsys, [*EXAMPLES[1:], long], tmp_path / "cut", base, "--val-fraction", 0)
    assert "1 truncated, 0 dropped" in out
    assert read_chat_info(tmp_path / "cut")["examples"]["train"] == 4
    out = prepare(capsys, [*EXAMPLES[1:], long], tmp_path / "drop", base, "--val-fraction", 0,
                  "--too-long", "drop")
    assert "0 truncated, 1 dropped" in out and "wrote 3 training" in out
    # A reply that starts beyond the window leaves nothing to learn: dropped even when truncating.
    hidden = {"prompt": "word " * 60, "completion": "x"}
    out = prepare(capsys, [hidden, *EXAMPLES[1:]], tmp_path / "none", base, "--val-fraction", 0)
    assert "0 truncated, 1 dropped" in out or "1 truncated, 1 dropped" in out


def test_validation_holds_whole_held_out_examples(
    capsys: pytest.CaptureFixture, base: Path, tmp_path: Path
) -> None:
    records = [{"prompt": f"Number {i}?", "completion": f"It is {i}."} for i in range(20)]
    out = prepare(capsys, records, tmp_path / "chat", base, "--val-fraction", 0.25)
    assert "wrote 15 training and 5 validation examples" in out
    tokenizer = Tokenizer.from_pretrained(tmp_path / "chat")
    texts = {}
    for split in ("train", "val"):
        shards = find_shards(tmp_path / "chat", split)
        texts[split] = tokenizer.decode(np.concatenate([read_shard(s) for s in shards]).tolist())
    held_out = [i for i in range(20) if f"Number {i}?" in texts["val"]]
    assert len(held_out) == 5 and all(f"It is {i}." in texts["val"] for i in held_out)
    assert not any(f"Number {i}?" in texts["train"] for i in held_out)


def train_once(capsys: pytest.CaptureFixture, data: Path, run: Path, base: Path, *options: object) -> float:
    code, _, err = run_cli(capsys, "train", "--init-from", base, "--data", data, "--out", run, *TRAIN,
                           *options)
    assert code == 0, err
    return read_metrics(run)[0]["loss"]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / (run / "latest").read_text().strip() / "model.safetensors")


def test_the_mask_by_its_effect_only_the_replies_move_the_loss_and_gradients(
    capsys: pytest.CaptureFixture, base: Path, tmp_path: Path
) -> None:
    def conversation(user_after: str, system_after: str, reply: str) -> list[dict]:
        turns = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": reply},
                 {"role": "user", "content": user_after}, {"role": "system", "content": system_after}]
        return [{"messages": turns}, EXAMPLES[1]]

    results = {}
    variants = {"a": ("cat", "dog", "Red."), "b": ("sun", "hat", "Red."), "c": ("cat", "dog", "Blue.")}
    for name, parts in variants.items():
        prepare(capsys, conversation(*parts), tmp_path / name, base, "--val-fraction", 0)
        loss = train_once(capsys, tmp_path / name, tmp_path / f"run_{name}", base)
        results[name] = (loss, weights(tmp_path / f"run_{name}"))
    # Other user and system tokens (same lengths): the same loss and the same step, to the bit.
    assert results["a"][0] == results["b"][0]
    assert all(torch.equal(results["a"][1][k], results["b"][1][k]) for k in results["a"][1])
    # Another reply token: another loss and another step.
    assert results["a"][0] != results["c"][0]
    assert any(not torch.equal(results["a"][1][k], results["c"][1][k]) for k in results["a"][1])


def test_the_reported_loss_is_the_mean_over_trained_tokens_of_all_micro_batches(
    capsys: pytest.CaptureFixture, base: Path, tmp_path: Path
) -> None:
    records = [{"prompt": "Hello " * k, "completion": "ok " * (1 + 3 * k)} for k in range(1, 9)]
    prepare(capsys, records, tmp_path / "chat", base, "--val-fraction", 0)
    loss = train_once(capsys, tmp_path / "chat", tmp_path / "run", base, "--micro-batch", 1, "--batch-tokens",
                      4 * SEQ, "--seed", 3)
    # Independently: each example alone through the untrained model, the replies' tokens as
    # transformers' assistant mask marks them, over the 4 windows the first step reads.
    model, template = GPT2.from_pretrained(base), ChatTemplate(GPT2_CHAT_TEMPLATE)
    tokenizer = Tokenizer.from_pretrained(tmp_path / "chat")
    loader = ShardLoader(find_shards(tmp_path / "chat", "train"), 1, SEQ, seed=3)
    windows = [loader.next_batch().inputs[0] for _ in range(4)]
    losses = []
    for record in records:
        ids, trained = template.encode(example_messages(record, "test"), tokenizer)
        if any(ids == w[: len(ids)].tolist() for w in windows):
            logits = model(torch.tensor([ids]))[0, :-1]
            targets = torch.tensor(ids[1:])
            picked = torch.tensor(trained[1:])
            losses.append(F.cross_entropy(logits[picked], targets[picked], reduction="none"))
    assert losses
    assert loss == pytest.approx(torch.cat(losses).mean().item(), abs=1e-5)


def test_fine_tuning_on_chat_data_resumes_exactly(
    capsys: pytest.CaptureFixture, base: Path, tmp_path: Path
) -> None:
    records = [{"prompt": "Hello " * (k % 5 + 1), "completion": "ok " * (k % 7 + 1)} for k in range(30)]
    prepare(capsys, records, tmp_path / "chat", base)
    run = tmp_path / "run"
    train_once(capsys, tmp_path / "chat", run, base, "--max-steps", 4, "--checkpoint-interval", 2,
               "--keep-checkpoints", 0, "--eval-interval", 2)
    expected, expected_log = weights(run), read_metrics(run)
    (run / "latest").write_text("step_000002\n")  # as if stopped after step 2
    code, out, err = run_cli(capsys, "train", "--out", run, "--resume")
    assert code == 0 and "resuming at step 2" in out, err
    resumed = weights(run)
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
    def log(records: list[dict]) -> list[tuple]:
        return [(r["step"], r.get("loss"), r.get("val_loss"), r.get("grad_norm")) for r in records]

    assert log(read_metrics(run)) == log(expected_log)  # training and validation losses, step by step


@pytest.mark.slow
def test_two_processes_match_one_on_chat_data(
    capsys: pytest.CaptureFixture, base: Path, tmp_path: Path
) -> None:
    records = [{"prompt": "Hello " * (k % 5 + 1), "completion": "ok " * (k % 7 + 1)} for k in range(40)]
    prepare(capsys, records, tmp_path / "chat", base, "--val-fraction", 0.1)
    args = ["train", "--init-from", base, "--data", tmp_path / "chat", *TRAIN, "--max-steps", 3,
            "--micro-batch", 2, "--batch-tokens", 8 * SEQ, "--eval-interval", 3]
    cmd = [sys.executable, "-m", "gpt2", *map(str, args)]
    env = {"OMP_NUM_THREADS": "1", "PATH": ""}
    subprocess.run([*cmd, "--out", str(tmp_path / "one")], check=True, capture_output=True, env=env,
                   timeout=300)
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2", "-m",
                "gpt2"]
    subprocess.run([*torchrun, *map(str, args), "--out", str(tmp_path / "two")], check=True,
                   capture_output=True, env=env, timeout=300)
    for key in ("loss", "val_loss"):
        one = [r[key] for r in read_metrics(tmp_path / "one") if key in r]
        two = [r[key] for r in read_metrics(tmp_path / "two") if key in r]
        assert len(one) == len(two) > 0 and np.allclose(one, two, rtol=0, atol=1e-5), (key, one, two)
    # The checkpoint carries the data's chat template.
    assert GPT2.from_pretrained(tmp_path / "two").tokenizer.chat_template == GPT2_CHAT_TEMPLATE


BAD_EXAMPLES = {
    "unknown role": ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
                     ["robot", "system, developer, user or assistant", ":1"]),
    "no assistant turn": ({"messages": [{"role": "user", "content": "x"}]}, ["no assistant turn", ":1"]),
    "non-string content": ({"messages": [{"role": "user", "content": ["x"]},
                                         {"role": "assistant", "content": "y"}]}, ["content", "string"]),
    "non-string completion": ({"prompt": "x", "completion": 5}, ["'completion'", "string"]),
}


@pytest.mark.parametrize("case", list(BAD_EXAMPLES))
def test_bad_examples_are_one_line_errors_naming_the_line(
    case: str, capsys: pytest.CaptureFixture, base: Path, tmp_path: Path
) -> None:
    record, words = BAD_EXAMPLES[case]
    data = write_jsonl(tmp_path / "bad.jsonl", [record])
    code, _, err = run_cli(capsys, "prepare", data, "--tokenizer", base, "--out", tmp_path / "out")
    assert_one_line_error(code, err, *words)
    assert not (tmp_path / "out").exists()


def test_bad_files_and_templates_are_one_line_errors(
    capsys: pytest.CaptureFixture, base: Path, tmp_path: Path
) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", EXAMPLES)
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "broken.jsonl").write_text('{"messages": [\n')
    for name, words in (("empty.jsonl", ["empty"]), ("broken.jsonl", ["not valid JSON", ":1"])):
        code, _, err = run_cli(capsys, "prepare", tmp_path / name, "--tokenizer", base, "--out",
                               tmp_path / "o")
        assert_one_line_error(code, err, *words)
    templates = {"fails.jinja": ("{{ raise_exception('no such turn') }}{% generation %}x{% endgeneration %}",
                                 ["fails.jinja", "failed to render", "no such turn", "good.jsonl:1"]),
                 "syntax.jinja": ("{% for m in messages %}", ["syntax.jinja", "not a valid Jinja template"]),
                 "unmarked.jinja": ("{{ messages[0]['content'] }}", ["unmarked.jinja", "{% generation %}"])}
    for name, (source, words) in templates.items():
        (tmp_path / name).write_text(source)
        code, _, err = run_cli(capsys, "prepare", good, "--tokenizer", base, "--out", tmp_path / "o",
                               "--chat-template", tmp_path / name)
        assert_one_line_error(code, err, *words)
    code, _, err = run_cli(capsys, "prepare", good, "--vocab-size", 300, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "--tokenizer")
    prepare(capsys, EXAMPLES, tmp_path / "chat", base)
    code, _, err = run_cli(capsys, "train", "--init-from", base, "--data", tmp_path / "chat", "--out",
                           tmp_path / "run", *TRAIN[2:], "--seq-len", 32)
    assert_one_line_error(code, err, f"windows of {SEQ} tokens", f"--seq-len {SEQ}")
    assert not (tmp_path / "o").exists()
