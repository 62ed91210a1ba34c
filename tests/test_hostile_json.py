"""JSON that is valid but hostile (issue 32): nesting deeper than Python's stack, numbers beyond a float
(1e999999 parses as inf) or with more digits than int() converts, NaN, escapes that are no Unicode
character (a lone surrogate, which fails only when the text is encoded), and config fields of the
wrong type. Every file and line we parse as JSON (``gpt2.util.jsonfile`` reads them all) gives one
``error:`` line naming the file (and the line, in JSON lines), never a traceback. Each test runs the
real ``gpt2`` command, in a process of its own, on real files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import (
    assert_one_line_error,
    run_cli,
    run_gpt2,
)

# payload (the JSON text of a value) -> words its error holds
PAYLOADS = {
    "deep": ("[" * 100_000 + "]" * 100_000, "nested too deeply"),  # RecursionError
    "long-int": ("1" + "0" * 100_000, "number too long"),  # ValueError: int's limit of 4300 digits
    "1e999999": ("1e999999", "beyond a float's range"),  # inf
    "NaN": ("NaN", "NaN is not JSON"),
    "lone-surrogate": ('"\\ud800"', "lone surrogate"),  # UnicodeEncodeError once encoded
}
TEXT = "the cat sat on the mat and the dog sat on the log. " * 60


def with_extra(good: dict, payload: str, key: str = "extra") -> str:
    """The JSON of ``good`` with one more field, ``key``, whose value is the JSON text ``payload``."""
    return json.dumps(good)[:-1] + f', {json.dumps(key)}: {payload}}}'


def write_lines(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def assert_refused(result: tuple[int, str, str], *words: str) -> None:
    code, _, err = result
    assert "Traceback" not in err, err
    assert_one_line_error(code, err, *words)


def copy_of(directory: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(directory, tmp_path / directory.name))


# ----------------------------------------------------------------------------------------------------
# Every payload, in the JSON read without torch (quick): JSON lines of text and chat, tokenizer files


@pytest.mark.parametrize("payload", PAYLOADS, ids=list(PAYLOADS))
def test_hostile_values_in_text_and_chat_jsonl_name_the_file_and_line(
    tmp_path: Path, model_dir: Path, payload: str
) -> None:
    value, words = PAYLOADS[payload]
    document = {"text": TEXT}
    text = write_lines(tmp_path / "text.jsonl", json.dumps(document), with_extra(document, value))
    assert_refused(run_gpt2("prepare", text, "--vocab-size", 300, "--out", tmp_path / "a"), f"{text}:2",
                   words)
    example = {"prompt": "What is 2 + 3?", "completion": "5"}
    chat = write_lines(tmp_path / "chat.jsonl", json.dumps(example), with_extra(example, value))
    assert_refused(run_gpt2("prepare", chat, "--tokenizer", model_dir, "--out", tmp_path / "b"), f"{chat}:2",
                   words)
    # A first line that cannot be read: the file is not taken for chat data, and its reading names it.
    first = write_lines(tmp_path / "first.jsonl", with_extra(example, value), json.dumps(example))
    assert_refused(run_gpt2("prepare", first, "--tokenizer", model_dir, "--out", tmp_path / "c"),
                   f"{first}:1", words)
    assert not any((tmp_path / out).exists() for out in "abc")


@pytest.mark.parametrize("payload", PAYLOADS, ids=list(PAYLOADS))
@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_hostile_values_in_tokenizer_files_name_the_file(
    tmp_path: Path, model_dir: Path, name: str, payload: str
) -> None:
    value, words = PAYLOADS[payload]
    tokenizer = copy_of(model_dir, tmp_path)
    file = tokenizer / name
    file.write_text(with_extra(json.loads(file.read_text(encoding="utf-8")), value), encoding="utf-8")
    assert_refused(run_gpt2("tokenizer", "encode", "--tokenizer", tokenizer, "hello"), str(file), words)


def test_a_lone_surrogate_as_a_key_of_vocab_json_names_the_file(tmp_path: Path, model_dir: Path) -> None:
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(model_dir / name, tokenizer / name)
    vocab = tokenizer / "vocab.json"
    vocab.write_text(with_extra(json.loads(vocab.read_text(encoding="utf-8")), "300", key="\udc80"),
                     encoding="utf-8")
    assert_refused(run_gpt2("tokenizer", "encode", "--tokenizer", tokenizer, "hello"), str(vocab),
                   "lone surrogate")


# ----------------------------------------------------------------------------------------------------
# One payload in each file read by a verb that loads torch (a process of a few seconds each): config.json,
# a shard index, adapter_config.json, a prepared folder's chat.json, evaluation data, a run's metrics


def prepared_chat_folder(tmp_path: Path, model_dir: Path, info: str) -> Path:
    """Shards made by ``gpt2 prepare``, with ``info`` as the chat.json that marks chat data."""
    (tmp_path / "docs.txt").write_text(TEXT, encoding="utf-8")
    code, _, err = run_gpt2("prepare", tmp_path / "docs.txt", "--tokenizer", model_dir, "--out",
                            tmp_path / "data", "--val-fraction", 0)
    assert code == 0, err
    (tmp_path / "data" / "chat.json").write_text(info, encoding="utf-8")
    return tmp_path / "data"


def test_hostile_json_in_a_models_config_and_shard_index(tmp_path: Path, model_dir: Path) -> None:
    model = copy_of(model_dir, tmp_path)
    config = model / "config.json"
    good = json.loads(config.read_text(encoding="utf-8"))
    config.write_text(with_extra(good, PAYLOADS["deep"][0]), encoding="utf-8")
    assert_refused(run_gpt2("info", model), str(config), "nested too deeply")
    config.write_text(json.dumps(good), encoding="utf-8")

    (model / "model.safetensors").rename(model / "model-00001-of-00001.safetensors")
    index = model / "model.safetensors.index.json"
    shards = {"weight_map": {"transformer.wte.weight": "model-00001-of-00001.safetensors"}}
    index.write_text(with_extra(shards, "NaN", key="metadata"), encoding="utf-8")
    assert_refused(run_gpt2("info", model), str(index), "NaN is not JSON")


def test_hostile_json_in_an_adapter_config(tmp_path: Path, adapter_dir: Path) -> None:
    adapter = copy_of(adapter_dir, tmp_path)
    file = adapter / "adapter_config.json"
    file.write_text(with_extra(json.loads(file.read_text(encoding="utf-8")), PAYLOADS["long-int"][0]),
                    encoding="utf-8")
    assert_refused(run_gpt2("merge", "--adapter", adapter, "--out", tmp_path / "merged"), str(file),
                   "number too long")
    assert not (tmp_path / "merged").exists()


def test_hostile_json_in_a_prepared_folders_chat_json(tmp_path: Path, model_dir: Path) -> None:
    data = prepared_chat_folder(tmp_path, model_dir, '{"format": "chat", "seq_len": 32, "note": "\\udfff"}')
    assert_refused(run_gpt2("train", "--data", data, "--init-from", model_dir, "--out", tmp_path / "run",
                            "--max-steps", 1), str(data / "chat.json"), "lone surrogate")
    assert not (tmp_path / "run").exists()


def test_hostile_json_in_evaluation_data(tmp_path: Path, model_dir: Path) -> None:
    lambada = write_lines(tmp_path / "lambada.jsonl", json.dumps({"text": "the cat sat on the mat"}),
                          with_extra({"text": "the dog sat on the log"}, "1e999999"))
    assert_refused(run_gpt2("eval", "lambada", "--model", model_dir, "--file", lambada, "--no-progress"),
                   f"{lambada}: line 2", "beyond a float's range")


# ----------------------------------------------------------------------------------------------------
# Fields of the wrong type: one line naming the field and the type it must have. In this process (the
# same command, ``gpt2.cli.main``; an exception escaping it fails the test): milliseconds each.


@pytest.mark.parametrize(("change", "words"), [
    ({"layer_norm_epsilon": "x"}, ["layer_norm_epsilon must be a number, found 'x'"]),
    ({"resid_pdrop": [1]}, ["resid_pdrop must be a number, found [1]"]),
    ({"n_layer": "12"}, ["n_layer must be an integer, found '12'"]),
], ids=["epsilon-string", "dropout-list", "n_layer-string"])
def test_config_json_fields_of_the_wrong_type(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture, change: dict, words: list[str]
) -> None:
    model = copy_of(model_dir, tmp_path)
    config = model / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text(encoding="utf-8")), **change}),
                      encoding="utf-8")
    code, _, err = run_cli(capsys, "info", model)
    assert_one_line_error(code, err, str(config), *words)


@pytest.mark.parametrize(("change", "words"), [
    ({"r": [1]}, ["r must be an integer, found [1]"]),
    ({"lora_alpha": "16"}, ["lora_alpha must be a number, found '16'"]),
    ({"base_model_name_or_path": [1]}, ["base_model_name_or_path must be a string or null, found [1]"]),
], ids=["r-list", "alpha-string", "base-list"])
def test_adapter_config_fields_of_the_wrong_type(
    tmp_path: Path, adapter_dir: Path, capsys: pytest.CaptureFixture, change: dict, words: list[str]
) -> None:
    adapter = copy_of(adapter_dir, tmp_path)
    file = adapter / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text(encoding="utf-8")), **change}), encoding="utf-8")
    code, _, err = run_cli(capsys, "merge", "--adapter", adapter, "--out", tmp_path / "merged")
    assert_one_line_error(code, err, str(file), *words)
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize(("info", "words"), [
    ('{"format": "chat", "seq_len": "32"}', ["seq_len must be an integer, found '32'"]),
    ('{"format": "chat", "seq_len": -3}', ["seq_len must be a positive integer"]),
], ids=["seq_len-string", "seq_len-negative"])
def test_chat_json_fields_of_the_wrong_type(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture, info: str, words: list[str]
) -> None:
    data = prepared_chat_folder(tmp_path, model_dir, info)
    code, _, err = run_cli(capsys, "train", "--data", data, "--init-from", model_dir, "--out",
                           tmp_path / "run", "--max-steps", 1)
    assert_one_line_error(code, err, str(data / "chat.json"), *words)


def test_a_metrics_log_too_deep_to_read_names_the_file_and_line(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    deep = with_extra({"step": 2, "loss": 4.0}, PAYLOADS["deep"][0])
    write_lines(run / "metrics.jsonl", '{"step": 1, "loss": 5.0}', deep, '{"step": 3, "loss": 4.0}')
    assert_refused(run_gpt2("plot", run), f"{run / 'metrics.jsonl'}, line 2", "nested too deeply")
    # A diverged loss is kept, and a last line cut short by a kill skipped, as before.
    write_lines(run / "metrics.jsonl", '{"step": 1, "loss": 5.0}', '{"step": 3, "loss": NaN}',
                '{"step": 4, "lo')
    code, _, err = run_gpt2("plot", run)
    assert code == 0 and (run / "loss.png").is_file(), err
