"""The ``gpt2 generate``, ``gpt2 chat`` and ``gpt2 task`` commands, and the task prompts."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from conftest import BYTES, random_model, run_cli, saved_model_dir

from gpt2 import GPT2
from gpt2.generation import prompts
from gpt2.generation.sampling import GenerationConfig, generate_text


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random model of the tiny preset's shape with a 128-token window, saved with ``BYTES``."""
    model = random_model(n_layer=4, n_head=4, n_embd=256, n_positions=128, tokenizer=BYTES)
    return saved_model_dir(model, tmp_path_factory)


@pytest.fixture(scope="module")
def model(model_dir: Path) -> GPT2:
    return GPT2.from_pretrained(model_dir)


def test_generate_prints_the_completion(model_dir: Path, model: GPT2, capsys) -> None:
    status, out, _ = run_cli(capsys, "generate", "--model", model_dir, "--prompt", "Once upon a time",
                             "--max-new-tokens", 30, "--seed", 1, "--top-k", 40)
    assert status == 0
    (expected,) = generate_text(
        model, BYTES, "Once upon a time", GenerationConfig(max_new_tokens=30, seed=1, top_k=40)
    )
    assert out == expected + "\n"


def test_stream_and_no_stream_and_output_file_agree(model_dir: Path, tmp_path: Path, capsys) -> None:
    common = [
        "generate",
        "--model",
        model_dir,
        "--prompt",
        "日本語",
        "--max-new-tokens",
        25,
        "--seed",
        3,
        "--preset",
        "paper",
        "--temperature",
        1.3,
    ]
    _, streamed, _ = run_cli(capsys, *common, "--stream", "--output", tmp_path / "out.txt")
    _, printed, _ = run_cli(capsys, *common, "--no-stream")
    assert streamed == printed
    assert (tmp_path / "out.txt").read_bytes().decode("utf-8") == printed  # no newline translation


def test_several_samples(model_dir: Path, model: GPT2, capsys) -> None:
    status, out, _ = run_cli(
        capsys, "generate", "--model", model_dir, "--num-samples", 3, "--max-new-tokens", 8, "--seed", 0
    )
    assert status == 0
    assert [line for line in out.splitlines() if "==== sample" in line] == [
        f"{'=' * 20} sample {i} {'=' * 20}" for i in (1, 2, 3)
    ]
    texts = generate_text(
        model, BYTES, "", GenerationConfig(max_new_tokens=8, seed=0, num_samples=3, top_k=40)
    )
    for text in texts:
        assert text in out


def test_stop_string_and_greedy_preset(model_dir: Path, model: GPT2, capsys) -> None:
    (free,) = generate_text(model, BYTES, "abc", GenerationConfig(max_new_tokens=30, temperature=0))
    stop = free[5:7]
    _, out, _ = run_cli(capsys, "generate", "--model", model_dir, "--prompt", "abc", "--preset", "greedy",
                        "--max-new-tokens", 30, "--stop", stop.encode("unicode_escape").decode())
    assert out == free[: free.index(stop)] + "\n"


def test_penalty_options(model_dir: Path, model: GPT2, capsys) -> None:
    settings = dict(
        max_new_tokens=20, temperature=0, repetition_penalty=1.2, frequency_penalty=0.5, presence_penalty=0.5
    )
    (expected,) = generate_text(model, BYTES, "abcabc", GenerationConfig(**settings))
    for dropped in ("repetition_penalty", "frequency_penalty", "presence_penalty"):  # each one counts
        others = {k: v for k, v in settings.items() if k != dropped}
        assert expected != generate_text(model, BYTES, "abcabc", GenerationConfig(**others))[0]
    _, out, _ = run_cli(capsys, "generate", "--model", model_dir, "--prompt", "abcabc", "--preset", "greedy",
                        "--max-new-tokens", 20, "--repetition-penalty", 1.2, "--frequency-penalty", 0.5,
                        "--presence-penalty", 0.5)
    assert out == expected + "\n"


def test_min_p_option(model_dir: Path, model: GPT2, capsys) -> None:
    (greedy,) = generate_text(model, BYTES, "abc", GenerationConfig(max_new_tokens=15, temperature=0))
    options = [
        "generate",
        "--model",
        model_dir,
        "--prompt",
        "abc",
        "--max-new-tokens",
        15,
        "--seed",
        2,
        "--temperature",
        1.0,
        "--top-k",
        0,
    ]
    assert run_cli(capsys, *options, "--min-p", 1.0)[1] == greedy + "\n"  # only the likeliest token is left
    assert run_cli(capsys, *options)[1] != greedy + "\n"


def test_window_stop_is_a_note(model_dir: Path, capsys) -> None:
    status, _, err = run_cli(capsys, "generate", "--model", model_dir, "--prompt", "x" * 100,
                             "--max-new-tokens", 50, "--at-window", "stop", "--seed", 0)
    assert status == 0
    assert err.startswith("note: stopped at the context window (128 tokens) after 28 new tokens")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--top-p", "0"], "top_p must be in (0, 1]"),
        (["--top-p", "1.01"], "top_p must be in (0, 1]"),
        (["--top-k", "-2"], "top_k must be >= 0"),
        (["--frequency-penalty", "3"], "frequency_penalty must be in [-2, 2]"),
        (["--min-p", "-0.1"], "min_p must be in [0, 1]"),
        (["--max-new-tokens", "0"], "max_new_tokens must be a positive integer"),
        (["--max-new-tokens", "200"], "exceeds the context window (128)"),
        (["--prompt", "y" * 200, "--max-new-tokens", "4"], "prompt of 200 tokens exceeds the context window"),
        (["--stream", "--num-samples", "2"], "--stream prints one sample at a time"),
    ],
)
def test_bad_options_are_one_line_errors(model_dir: Path, capsys, options: list[str], message: str) -> None:
    status, out, err = run_cli(capsys, "generate", "--model", model_dir, *options)
    assert status == 2 and out == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_truncation_makes_a_long_prompt_fit(model_dir: Path, model: GPT2, capsys) -> None:
    status, out, _ = run_cli(capsys, "generate", "--model", model_dir, "--prompt", "y" * 200, "--truncate",
                             "--max-new-tokens", 8, "--preset", "greedy")
    assert status == 0
    assert (
        out
        == generate_text(model, BYTES, "y" * 120, GenerationConfig(max_new_tokens=8, temperature=0))[0] + "\n"
    )


def test_unknown_model_and_missing_tokenizer(tmp_path: Path, model: GPT2, capsys) -> None:
    status, _, err = run_cli(capsys, "generate", "--model", tmp_path / "nowhere", "--prompt", "hi")
    assert status == 2 and err.startswith("error: ") and "nowhere" in err and err.count("\n") == 1
    bare = GPT2(model.config)
    bare.load_state_dict(model.state_dict())
    bare.save_pretrained(tmp_path / "bare")  # no tokenizer files
    status, _, err = run_cli(capsys, "generate", "--model", tmp_path / "bare", "--max-new-tokens", 4)
    assert status == 2 and "--tokenizer" in err
    BYTES.save_pretrained(tmp_path / "tok")
    status, out, _ = run_cli(capsys, "generate", "--model", tmp_path / "bare", "--tokenizer",
                             tmp_path / "tok", "--max-new-tokens", 6, "--seed", 2)
    assert status == 0
    assert (
        out == generate_text(model, BYTES, "", GenerationConfig(max_new_tokens=6, seed=2, top_k=40))[0] + "\n"
    )


def test_speed_options_run(model_dir: Path, capsys) -> None:
    for precision in ("bf16", "int8"):
        status, out, _ = run_cli(
            capsys, "generate", "--model", model_dir, "--precision", precision, "--max-new-tokens", 5
        )
        assert status == 0 and out.endswith("\n")


# ----------------------------------------------------------------------------------------------------
# The paper's tasks


def test_task_prompts_follow_the_paper() -> None:
    assert prompts.summarize_prompt("  An article.\n") == "An article.\nTL;DR:"
    assert prompts.translate_prompt("Good morning.", [("Hello.", "Bonjour."), ("Yes.", "Oui.")]) == (
        "Hello. = Bonjour.\nYes. = Oui.\nGood morning. ="
    )
    assert prompts.answer_prompt("Doc.", "Why?", [("Who?", "Tom."), ("Where?", "Here.")]) == (
        "Doc.\n\nQ: Who?\nA: Tom.\nQ: Where?\nA: Here.\nQ: Why?\nA:"
    )
    assert prompts.first_sentences("One. Two!  Three?\nFour. Five.", 3) == "One. Two! Three?"


def test_summarize_is_top_k_2_for_100_tokens_cut_to_3_sentences(model_dir: Path, model: GPT2, capsys) -> None:
    article = "The council met on Monday. It voted to build a new bridge."
    status, out, _ = run_cli(
        capsys, "task", "summarize", "--model", model_dir, "--text", article, "--seed", 4
    )
    assert status == 0
    # The 128-token window leaves room for the article's last 28 tokens: summarize truncates the start.
    (raw,) = generate_text(
        model, BYTES, article[-21:] + "\nTL;DR:", GenerationConfig(top_k=2, max_new_tokens=100, seed=4)
    )
    assert out == prompts.first_sentences(raw, 3) + "\n"


def test_translate_and_answer_are_greedy(model_dir: Path, model: GPT2, tmp_path: Path, capsys) -> None:
    (tmp_path / "pairs.txt").write_text("Hello. = Bonjour.\n\nYes. = Oui.\n", encoding="utf-8")
    _, out, _ = run_cli(capsys, "task", "translate", "--model", model_dir, "--text", "Thanks.", "--examples",
                        tmp_path / "pairs.txt")
    prompt = "Hello. = Bonjour.\nYes. = Oui.\nThanks. ="
    (raw,) = generate_text(
        model, BYTES, prompt, GenerationConfig(temperature=0, max_new_tokens=64, stop_strings=["\n"])
    )
    assert out == prompts.first_sentences(raw, 1) + "\n"
    _, out, _ = run_cli(
        capsys, "task", "answer", "--model", model_dir, "--text", "Tom is here.", "--question", "Who?"
    )
    (raw,) = generate_text(model, BYTES, "Tom is here.\n\nQ: Who?\nA:",
                           GenerationConfig(temperature=0, max_new_tokens=48, stop_strings=["\n"]))
    assert out == raw.strip() + "\n"
    (tmp_path / "bad.txt").write_text("no separator here\n", encoding="utf-8")
    status, _, err = run_cli(capsys, "task", "answer", "--model", model_dir, "--text", "x", "--question", "q",
                             "--history", tmp_path / "bad.txt")
    assert status == 2 and "bad.txt:1" in err and "question = answer" in err


# ----------------------------------------------------------------------------------------------------
# Chat


def test_chat_history_is_trimmed_to_the_window() -> None:
    chat = prompts.Chat(turns=[("first " * 10, "one"), ("second", "two"), ("third", "three")])
    full = chat.prompt("now?", BYTES, budget=10_000)
    assert full.startswith(prompts.CHAT_HEADER) and full.endswith("User: now?\nAssistant:")
    assert "User: first" in full and "Assistant: three\n" in full
    budget = len(BYTES.encode(full)) - 1
    trimmed = chat.prompt("now?", BYTES, budget=budget)
    assert "first" not in trimmed and "User: second\nAssistant: two\n" in trimmed
    assert trimmed.startswith(prompts.CHAT_HEADER)
    with pytest.raises(prompts.UserError, match="too long for the context window"):
        chat.prompt("x" * 100, BYTES, budget=50)


def test_chat_loop_replies_and_remembers(model_dir: Path, model: GPT2, capsys, monkeypatch) -> None:
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"hello\nand you?\n\n")))
    status, out, _ = run_cli(capsys, "chat", "--model", model_dir, "--seed", 0, "--max-new-tokens", 12)
    assert status == 0
    replies = [line.removeprefix("gpt2> ") for line in out.split("\n")[:-1]]  # (splitlines cuts at \x1d)
    expected = prompts.Chat()
    for message, reply in zip(["hello", "and you?"], replies, strict=True):
        assert reply == expected.reply(
            model, BYTES, message, GenerationConfig(seed=0, max_new_tokens=12, top_k=40, temperature=1.0)
        )
    assert len(expected.turns) == 2
