"""What chat data means, as the `gpt2` command reads it (issue 32): OpenAI's ``"weight": 0`` leaves an
assistant message out of training; the message shapes the server takes (the ``developer`` role, content
as text parts) prepare as their plain forms; data that would train on every token (a loss mask gone)
or on none (all weight 0, an all-zero mask) is refused in one line, at prepare or at train time; and
a chat file that is not UTF-8 is named as such, with its line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import test_chat_data
from conftest import assert_one_line_error, run_cli
from test_chat_data import EXAMPLES, SEQ, TRAIN, write_jsonl

from gpt2 import Tokenizer
from gpt2.data.shards import LOSS, START, find_shards, mask_path, read_mask, read_shard, write_mask

base = test_chat_data.base  # the fixture: a random tiny model over GPT-2's vocabulary, saved

CONVERSATION = {"messages": [
    {"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello there."}, {"role": "user", "content": "Café?"},
    {"role": "assistant", "content": "Oui, un café."}]}


def gpt2(*args: object) -> subprocess.CompletedProcess:
    """The `gpt2` command in a process of its own, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "gpt2", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def prepared(
    capsys: pytest.CaptureFixture, records: list[object], out: Path, base: Path
) -> tuple[np.ndarray, np.ndarray]:
    """The tokens and mask of the one training shard ``gpt2 prepare`` makes of ``records``."""
    code, _, err = run_cli(capsys, "prepare", write_jsonl(out.with_suffix(".jsonl"), records), "--tokenizer",
                           base, "--out", out, "--seq-len", SEQ, "--val-fraction", 0)
    assert code == 0, err
    (shard,) = find_shards(out, "train")
    tokens = np.asarray(read_shard(shard))
    return tokens, np.asarray(read_mask(shard, len(tokens)))


def with_weights(record: dict, *weights: int) -> dict:
    """``record`` with its assistant messages given these weights, in order."""
    record = json.loads(json.dumps(record))
    assistants = [m for m in record["messages"] if m["role"] == "assistant"]
    for message, weight in zip(assistants, weights, strict=True):
        message["weight"] = weight
    return record


def test_an_assistant_message_of_weight_0_is_not_trained_on(
    capsys: pytest.CaptureFixture, base: Path, tmp_path: Path, gpt2_tokenizer: Tokenizer
) -> None:
    tokens, mask = prepared(capsys, [CONVERSATION], tmp_path / "all", base)
    weighted_tokens, weighted = prepared(capsys, [with_weights(CONVERSATION, 0, 1)], tmp_path / "w", base)
    ones, _ = prepared(capsys, [with_weights(CONVERSATION, 1, 1)], tmp_path / "ones", base)
    assert np.array_equal(tokens, weighted_tokens) and np.array_equal(tokens, ones)
    left_out = (mask & LOSS).astype(bool) & ~(weighted & LOSS).astype(bool)
    assert gpt2_tokenizer.decode(tokens[left_out].tolist()) == " Hello there.<|endoftext|>"
    trained = (weighted & LOSS).astype(bool)
    assert gpt2_tokenizer.decode(tokens[trained].tolist()) == " Oui, un café.<|endoftext|>"


@pytest.mark.parametrize("weight", [2, 0.5, "0", True, None])
def test_a_weight_other_than_0_or_1_is_one_error_line(
    weight: object, capsys: pytest.CaptureFixture, base: Path, tmp_path: Path
) -> None:
    data = write_jsonl(tmp_path / "bad.jsonl", [EXAMPLES[1], with_weights(CONVERSATION, 1, weight)])
    code, _, err = run_cli(capsys, "prepare", data, "--tokenizer", base, "--out", tmp_path / "out")
    assert_one_line_error(code, err, "bad.jsonl:2", "weight", "0", "1")
    assert not (tmp_path / "out").exists()


def test_data_with_no_token_to_train_on_is_refused_at_prepare(
    capsys: pytest.CaptureFixture, base: Path, tmp_path: Path
) -> None:
    data = write_jsonl(tmp_path / "silent.jsonl", [with_weights(CONVERSATION, 0, 0)] * 3)
    result = gpt2("prepare", data, "--tokenizer", base, "--out", tmp_path / "out")
    assert_one_line_error(result.returncode, result.stderr, "silent.jsonl", "no example has a token to train "
                          "on", '"weight": 0', "weight 1")
    assert not (tmp_path / "out").exists()


def test_the_servers_message_shapes_prepare_as_their_plain_forms(
    capsys: pytest.CaptureFixture, base: Path, tmp_path: Path
) -> None:
    def parts(*texts: str) -> list[dict]:
        return [{"type": "text", "text": text} for text in texts]

    given = {"messages": [{"role": "developer", "content": parts("Answer", "briefly.")},
                          {"role": "user", "content": parts("Hi!")},
                          {"role": "assistant", "content": parts("Hello there.")}]}
    plain = {"messages": [{"role": "system", "content": "Answer\nbriefly."},
                          {"role": "user", "content": "Hi!"},
                          {"role": "assistant", "content": "Hello there."}]}
    tokens, mask = prepared(capsys, [given], tmp_path / "given", base)
    expected_tokens, expected_mask = prepared(capsys, [plain], tmp_path / "plain", base)
    assert np.array_equal(tokens, expected_tokens) and np.array_equal(mask, expected_mask)


def test_parts_that_are_not_text_are_one_error_line(
    capsys: pytest.CaptureFixture, base: Path, tmp_path: Path
) -> None:
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                          {"role": "assistant", "content": "y"}]}
    data = write_jsonl(tmp_path / "image.jsonl", [image])
    code, _, err = run_cli(capsys, "prepare", data, "--tokenizer", base, "--out", tmp_path / "out")
    assert_one_line_error(code, err, "image.jsonl:1", "message 0", '{"type": "text", "text": "..."}')


@pytest.fixture
def chat_data(capsys: pytest.CaptureFixture, base: Path, tmp_path: Path) -> Path:
    """Chat shards of the three formats' examples, training and validation."""
    out = tmp_path / "chat"
    code, _, err = run_cli(capsys, "prepare", write_jsonl(tmp_path / "chat.jsonl", EXAMPLES * 4),
                           "--tokenizer", base, "--out", out, "--seq-len", SEQ, "--val-fraction", 0.25)
    assert code == 0, err
    return out


def train(base: Path, data: Path, out: Path) -> subprocess.CompletedProcess:
    return gpt2("train", "--init-from", base, "--data", data, "--out", out, *TRAIN, "--device", "cpu")


def test_train_refuses_chat_shards_whose_mask_is_missing(
    base: Path, chat_data: Path, tmp_path: Path
) -> None:
    shards = find_shards(chat_data, "train") + find_shards(chat_data, "val")
    for shard in shards:  # the shards copied without their masks
        mask_path(shard).unlink()
    result = train(base, chat_data, tmp_path / "run")
    assert_one_line_error(result.returncode, result.stderr, str(mask_path(shards[0])), "missing",
                          "copy the .mask.npy files", "gpt2 prepare")
    assert not (tmp_path / "run").exists()


def test_train_refuses_a_mask_with_no_token_to_train_on(
    base: Path, chat_data: Path, tmp_path: Path
) -> None:
    (shard,) = find_shards(chat_data, "train")
    write_mask(shard, read_mask(shard, len(read_shard(shard))) & START)  # examples kept, targets gone
    result = train(base, chat_data, tmp_path / "run")
    assert_one_line_error(result.returncode, result.stderr, str(mask_path(shard)), "no token to train on")


@pytest.mark.parametrize("line", [1, 3])
def test_a_chat_file_that_is_not_utf8_is_named_so_with_its_line(
    line: int, base: Path, tmp_path: Path
) -> None:
    lines = [json.dumps(record, ensure_ascii=False).encode() for record in EXAMPLES]
    lines[line - 1] = lines[line - 1].replace(b'"}', b' caf\xe9"}', 1)  # Latin-1's é, a lone byte
    (tmp_path / "latin1.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    result = gpt2("prepare", tmp_path / "latin1.jsonl", "--tokenizer", base, "--out", tmp_path / "out")
    assert_one_line_error(result.returncode, result.stderr, f"latin1.jsonl:{line}", "not UTF-8",
                          "save the file as UTF-8")
