"""Outputs that overlap inputs (issue 32). Every verb that writes refuses, in one ``error:`` line and
before it writes anything, an output that is, holds or lies inside one of its inputs, symbolic links
followed: ``prepare DOCS --out DOCS --overwrite`` deleted the corpus, ``train --data RUN/data --out RUN
--overwrite`` the shards. An output that is a symbolic link is replaced where it points, the link
kept and nothing left beside it (``--overwrite`` through one ended in a traceback and left a directory
behind). Each test runs the real ``gpt2`` command, in a process of its own, on real files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import assert_one_line_error, run_gpt2

TEXT = "the cat sat on the mat and the dog sat on the log. " * 60  # 3,060 tokens of bytes
TRAIN = ["--seq-len", 32, "--micro-batch", 2, "--max-steps", 1, "--warmup-steps", 0, "--eval-interval", 0,
         "--sample-tokens", 0, "--log-interval", 0, "--dtype", "float32"]


def corpus(directory: Path) -> dict[str, str]:
    """A corpus of three documents and an unrelated note beside them, in ``directory``; its files."""
    directory.mkdir(parents=True)
    for i in range(3):
        (directory / f"doc{i}.txt").write_text(TEXT, encoding="utf-8")
    (directory / "notes.md").write_text("not a document, but mine\n", encoding="utf-8")
    return snapshot(directory)


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` (relative path -> its bytes as hex), to see that nothing changed."""
    return {str(p.relative_to(directory)): p.read_bytes().hex() for p in sorted(directory.rglob("*"))
            if p.is_file()}


def prepared(tmp_path: Path, model_dir: Path, out: Path) -> Path:
    """``out``: shards of a small corpus in the model's byte tokenizer, made by ``gpt2 prepare``."""
    docs = tmp_path / f"docs-for-{out.relative_to(tmp_path)}".replace("/", "-")
    corpus(docs)
    code, _, err = run_gpt2("prepare", docs, "--tokenizer", model_dir, "--out", out, "--val-fraction", 0.1)
    assert code == 0, err
    return out


def fake_run(run: Path) -> None:
    """``run`` as a training run that ``--overwrite`` may replace (the files by which one is known)."""
    run.mkdir(parents=True, exist_ok=True)
    (run / "train.toml").write_text('preset = "tiny"\n', encoding="utf-8")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n', encoding="utf-8")


def assert_refused(result: tuple[int, str, str], *words: str) -> None:
    code, _, err = result
    assert "Traceback" not in err, err
    assert_one_line_error(code, err, *words)


# ----------------------------------------------------------------------------------------------------
# prepare


def test_prepare_refuses_to_write_over_or_inside_its_corpus(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    before = corpus(docs)
    (tmp_path / "link").symlink_to(docs)
    cases = {  # --out -> how it overlaps
        docs: "is the input",  # the example: it deleted the corpus and the note beside it
        docs / "shards": "lies inside the input",  # its tokenizer's merges.txt would be read as a document
        tmp_path: "holds the input",
        tmp_path / "link": "is the input",  # a symbolic link to the corpus is the corpus
    }
    for out, how in cases.items():
        result = run_gpt2("prepare", docs, "--vocab-size", 300, "--out", out, "--overwrite")
        assert_refused(result, f"--out {out} {how} {docs}", "choose an --out apart")
    result = run_gpt2("prepare", docs / "doc0.txt", "--vocab-size", 300, "--out", docs, "--overwrite")
    assert_refused(result, f"holds the input {docs / 'doc0.txt'}")
    assert snapshot(docs) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs", "link"]  # no temporary directory left


def test_prepare_refuses_an_out_that_is_its_tokenizer_or_chat_template(
    tmp_path: Path, model_dir: Path
) -> None:
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    before = snapshot(model)
    docs = tmp_path / "docs"
    corpus(docs)
    assert_refused(run_gpt2("prepare", docs, "--tokenizer", model, "--out", model, "--overwrite"),
                   f"--out {model} is the --tokenizer {model}")
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"prompt": "hi", "completion": "there"}) + "\n", encoding="utf-8")
    template = tmp_path / "templates" / "chat.jinja"
    template.parent.mkdir()
    template.write_text("{% generation %}x{% endgeneration %}", encoding="utf-8")
    assert_refused(run_gpt2("prepare", chat, "--tokenizer", model_dir, "--chat-template", template,
                            "--out", template.parent, "--overwrite"), f"holds the --chat-template {template}")
    assert snapshot(model) == before and template.is_file()


# ----------------------------------------------------------------------------------------------------
# train


def test_train_refuses_a_run_directory_that_holds_its_data_model_tokenizer_or_config(
    tmp_path: Path, model_dir: Path
) -> None:
    run = tmp_path / "run"
    inside = prepared(tmp_path, model_dir, run / "data")  # the example: --overwrite deleted it
    data = prepared(tmp_path, model_dir, tmp_path / "data")
    fake_run(run)
    shutil.copytree(model_dir, run / "model")
    config = run / "options.toml"
    config.write_text(f'data = "{data}"\n', encoding="utf-8")
    before = snapshot(run)
    base = ["train", *TRAIN, "--out", run, "--overwrite"]
    for argv, input in (
        (["--data", inside, "--init-from", model_dir], f"--data {inside}"),
        (["--data", inside, "--preset", "tiny"], f"--data {inside}"),
        (["--data", data, "--init-from", run / "model"], f"--init-from {run / 'model'}"),
        (["--data", data, "--preset", "tiny", "--tokenizer", run / "model"], f"--tokenizer {run / 'model'}"),
        (["--config", config, "--init-from", model_dir], f"--config {config}"),
    ):
        assert_refused(run_gpt2(*base, *argv), f"--out {run} holds the {input}:")
    assert snapshot(run) == before


def test_train_refuses_data_that_is_the_run_directory_through_a_link(tmp_path: Path, model_dir: Path) -> None:
    data = prepared(tmp_path, model_dir, tmp_path / "data")
    fake_run(data)
    (tmp_path / "run").symlink_to(data)
    before = snapshot(data)
    assert_refused(run_gpt2("train", *TRAIN, "--data", data, "--init-from", model_dir, "--out",
                            tmp_path / "run", "--overwrite"), f"is the --data {data}")
    assert snapshot(data) == before


@pytest.mark.slow  # one training step, about 15 s on a loaded 2-core machine
def test_train_overwrites_a_run_directory_that_is_a_symlink_where_it_points(
    tmp_path: Path, model_dir: Path
) -> None:
    data = prepared(tmp_path, model_dir, tmp_path / "data")
    runs = tmp_path / "runs"
    fake_run(runs / "real")
    (runs / "latest-run").symlink_to("real")
    code, _, err = run_gpt2("train", *TRAIN, "--data", data, "--init-from", model_dir, "--out",
                            runs / "latest-run", "--overwrite")
    assert code == 0 and "Traceback" not in err, err
    assert os.readlink(runs / "latest-run") == "real"
    assert (runs / "real" / "latest").is_file()
    assert (runs / "real" / "train.toml").read_text() != 'preset = "tiny"\n'  # the new run's
    assert sorted(p.name for p in runs.iterdir()) == ["latest-run", "real"]


# ----------------------------------------------------------------------------------------------------
# merge, export, tokenizer train, eval report, plot, generate --output


def test_merge_refuses_an_out_that_is_its_base_or_adapter(
    tmp_path: Path, model_dir: Path, adapter_dir: Path
) -> None:
    base = tmp_path / "base"
    shutil.copytree(model_dir, base)
    before = snapshot(base)
    merge = ["merge", "--adapter", adapter_dir, "--model", base]
    assert_refused(run_gpt2(*merge, "--out", base, "--overwrite"), f"--out {base} is the --model {base}")
    assert_refused(run_gpt2(*merge, "--out", adapter_dir / "merged"),
                   f"lies inside the --adapter {adapter_dir}")
    assert snapshot(base) == before and not (adapter_dir / "merged").exists()


def test_merge_overwrites_an_out_that_is_a_symlink_where_it_points(
    tmp_path: Path, model_dir: Path, adapter_dir: Path
) -> None:
    shutil.copytree(model_dir, tmp_path / "old-model")
    (tmp_path / "merged").symlink_to("old-model")
    code, _, err = run_gpt2("merge", "--adapter", adapter_dir, "--model", model_dir, "--out",
                            tmp_path / "merged", "--overwrite")
    assert code == 0 and "Traceback" not in err, err
    assert os.readlink(tmp_path / "merged") == "old-model"
    merged = (tmp_path / "old-model" / "model.safetensors").read_bytes()
    assert merged != (model_dir / "model.safetensors").read_bytes()  # the adapter is in it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "old-model"]  # no temporary directory


def test_export_refuses_to_write_into_its_model(tmp_path: Path, model_dir: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    before = snapshot(model)
    for out in (model / "model.safetensors", model / "model.gguf"):  # the first replaced its weights
        assert_refused(run_gpt2("export", "--format", "gguf", "--model", model, "--out", out, "--overwrite"),
                       f"--out {out} lies inside the --model {model}")
    assert snapshot(model) == before


def test_tokenizer_train_refuses_an_out_that_holds_its_text(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    before = corpus(docs)
    for out in (docs, docs / "doc0.txt"):
        assert_refused(run_gpt2("tokenizer", "train", docs / "doc0.txt", "--vocab-size", 300, "--out", out,
                                "--overwrite"), f"--out {out}", f"the input {docs / 'doc0.txt'}")
    assert snapshot(docs) == before


def report_suite(tmp_path: Path) -> tuple[Path, Path]:
    """A suite of one LAMBADA example, read from data/report.md (the name of a report file); the suite
    and that file."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "report.md").write_text('{"text": "the cat sat on the mat"}\n', encoding="utf-8")
    suite = tmp_path / "suite.toml"
    suite.write_text('[[eval]]\nbenchmark = "lambada"\nfile = "data/report.md"\nlimit = 1\n',
                     encoding="utf-8")
    return suite, data / "report.md"


def test_eval_report_refuses_to_write_over_its_data(tmp_path: Path, model_dir: Path) -> None:
    suite, data = report_suite(tmp_path)
    before = snapshot(tmp_path)
    assert_refused(run_gpt2("eval", "report", "--suite", suite, "--model", model_dir, "--out", data.parent),
                   f"--out {data} is the suite's data {data}")
    assert snapshot(tmp_path) == before


@pytest.mark.slow  # an evaluation, about 15 s on a loaded 2-core machine
def test_eval_report_writes_into_the_default_out_that_holds_its_suite_but_not_into_its_model(
    tmp_path: Path, model_dir: Path
) -> None:
    suite, _ = report_suite(tmp_path)
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    common = ["eval", "report", "--suite", suite, "--model", model, "--no-progress"]
    assert_refused(run_gpt2(*common, "--out", model),
                   f"--out {model / 'report.md'} lies inside the --model {model}")
    assert not (model / "report.md").exists()
    code, _, err = run_gpt2(*common, cwd=tmp_path)  # --out ".": its report files are checked, not "."
    assert code == 0, err
    assert (tmp_path / "report.json").is_file() and (tmp_path / "report.md").is_file()


def test_plot_refuses_to_draw_over_the_metrics(tmp_path: Path) -> None:
    fake_run(tmp_path / "run")
    before = snapshot(tmp_path / "run")
    for out in (tmp_path / "run" / "metrics.jsonl", tmp_path / "run"):
        assert_refused(run_gpt2("plot", tmp_path / "run", "--out", out), "the metrics log", "metrics.jsonl")
    assert snapshot(tmp_path / "run") == before


def test_generate_refuses_an_output_over_its_prompt_or_model(tmp_path: Path, model_dir: Path) -> None:
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Once upon a time", encoding="utf-8")
    common = ["generate", "--model", model_dir, "--max-new-tokens", 2, "--prompt-file", prompt]
    assert_refused(run_gpt2(*common, "--output", prompt), f"--output {prompt} is the --prompt-file {prompt}")
    assert_refused(run_gpt2(*common, "--output", model_dir / "config.json"),
                   f"lies inside the --model {model_dir}")
    assert prompt.read_text(encoding="utf-8") == "Once upon a time"
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "latest.txt").write_text("old", encoding="utf-8")
    (tmp_path / "out.txt").symlink_to(Path("samples") / "latest.txt")
    code, out, err = run_gpt2(*common, "--output", tmp_path / "out.txt")
    assert code == 0, err
    assert os.readlink(tmp_path / "out.txt") == str(Path("samples") / "latest.txt")  # the link is kept
    assert (tmp_path / "samples" / "latest.txt").read_text(encoding="utf-8") == out
