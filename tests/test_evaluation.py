"""Evaluation: perplexity against transformers, the tasks against a model that memorised the answers,
the report against the paper's Table 3, and the errors users can cause."""

from __future__ import annotations

import json
import math
import random
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import BYTES, random_model, random_words, saved_model_dir

from gpt2 import GPT2, GPT2Config, Tokenizer, UserError
from gpt2.cli import main
from gpt2.evaluation import (
    Request,
    Scorer,
    evaluate_cbt,
    evaluate_hellaswag,
    evaluate_lambada,
    evaluate_perplexity,
    load_suite,
    read_cbt,
    read_jsonl,
    read_text,
    run_suite,
    tokenize,
    write_report,
)
from gpt2.evaluation.benchmarks import hellaswag_example
from gpt2.evaluation.hub import hub_rows
from gpt2.evaluation.perplexity import moses_detokenize, ptb_detokenize, wikitext_detokenize
from gpt2.evaluation.report import BENCHMARKS, published_size
from gpt2.evaluation.scoring import sliding_windows

# The models are conftest's random_model: 2 layers, 2 heads, width 32, over BYTES (256 bytes and
# <|endoftext|>, no merges), so that tiny models stay tiny.

WORDS = ["the", "cat", "sat", "on", "mat", ",", ".", "é", "naïve", "日本", "42", "\n"]


def random_text(n_words: int, seed: int = 0) -> str:
    return random_words(WORDS, n_words, seed) + "\n"


# -- perplexity ---------------------------------------------------------------------------------------


def transformers_perplexity(hf_model, ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """The transformers perplexity guide's loop: labels of the overlapping context masked with -100.
    (Each window's mean loss is weighted by the number of labels it actually scores.)"""
    seq_len, nll, count, prev_end = ids.size(1), 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        x = ids[:, begin:end]
        labels = x.clone()
        labels[:, : -(end - prev_end)] = -100
        with torch.no_grad():
            loss = hf_model(x, labels=labels).loss
        scored = int((labels[:, 1:] != -100).sum())
        nll, count, prev_end = nll + loss.item() * scored, count + scored, end
        if end == seq_len:
            break
    return math.exp(nll / count), count


@pytest.mark.parametrize(("stride", "n_words", "n_embd"),
                         [(64, 200, 32), (32, 200, 32), (32, 10, 32), (32, 200, 256)],
                         ids=["disjoint", "half", "shorter-than-a-window", "wide-enough-for-onednn"])
def test_perplexity_equals_transformers(tmp_path, stride, n_words, n_embd):
    transformers = pytest.importorskip("transformers")
    model = random_model(n_embd=n_embd, tokenizer=BYTES)
    model.save_pretrained(tmp_path / "model")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "model").eval()
    text = random_text(n_words)
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    ids = torch.tensor([BYTES.encode(text)])
    assert n_words > 100 or ids.size(1) < 64  # the short case fits in one window

    scorer = Scorer(model, BYTES, batch_size=3)
    ours = evaluate_perplexity(scorer, read_text(tmp_path / "t.txt", block_bytes=50), stride=stride)
    expected, count = transformers_perplexity(hf, ids, 64, stride)
    assert ours.tokens == count
    assert ours.perplexity == pytest.approx(expected, rel=1e-4)


def test_bits_per_byte_and_char_count_the_scored_text(gpt2_ranks_file):
    """With multi-byte tokens and characters: bytes and characters are those the scored tokens stand for."""
    tokenizer = Tokenizer.from_file(gpt2_ranks_file)
    model = random_model(tokenizer.n_vocab)
    text = random_text(120)
    ids = tokenizer.encode(text)
    result = Scorer(model, tokenizer).perplexity([ids], context=32, stride=16)
    first = tokenizer.decode_bytes(ids[:1])
    assert result.tokens == len(ids) - 1
    assert result.bytes == len(text.encode()) - len(first)
    assert result.chars == len(text) - len(first.decode())
    assert result.bits_per_byte == pytest.approx(result.nll / math.log(2) / result.bytes)
    assert result.to_dict()["bits_per_char"] > result.to_dict()["bits_per_byte"]  # non-ASCII text


@pytest.mark.parametrize(
    ("context", "stride", "n"), [(8, 8, 30), (8, 3, 30), (8, 1, 12), (8, 5, 6), (4, 2, 4)]
)
def test_windows_score_every_token_once(context, stride, n):
    chunks = [list(range(i, min(i + 5, n))) for i in range(0, n, 5)]
    scored = []
    for i, (tokens, count) in enumerate(sliding_windows(chunks, context, stride)):
        assert len(tokens) <= context and tokens == list(range(tokens[0], tokens[0] + len(tokens)))
        if i > 0:  # context - stride tokens of earlier context (one, the unscored first, when disjoint)
            assert len(tokens) - count == max(context - stride, 1)
        scored += tokens[-count:]
    window_starts = set(range(0, n, stride)) if stride == context else {0}
    assert scored == [t for t in range(n) if t not in window_starts]


def test_streamed_tokens_and_words_equal_the_whole_text(tmp_path, gpt2_ranks_file):
    tokenizer = Tokenizer.from_file(gpt2_ranks_file)
    text = random_text(3000, seed=1).replace(" 42", "  @-@ 42 ,")
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    for name, detokenize in [(None, None), ("wikitext", wikitext_detokenize), ("ptb", ptb_detokenize)]:
        streamed = read_text(tmp_path / "t.txt", detokenizer=name, block_bytes=97)
        ids = [i for chunk in tokenize(streamed.blocks, tokenizer) for i in chunk]
        whole = detokenize(text) if detokenize else text
        assert ids == tokenizer.encode(whole), name
        assert streamed.words == len(text.split())


def test_detokenizers():
    raw = " = = Early life = = \n The 2 @,@ 000 @-@ year old ( see below ) , he said . \n"
    assert wikitext_detokenize(raw) == "== Early life ==\nThe 2,000-year old (see below), he said.\n"
    assert ptb_detokenize(" it is n't N years ' old $ N \n") == "it isn't 1 years' old $1\n"
    assert moses_detokenize("`` Yes , '' he said ; it 's ( fine ) .\n") == '"Yes," he said; it\'s (fine).\n'


# -- the tasks, with a model that memorised the answers --------------------------------------------------

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "pe", "da", "zu", "fi"]


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 2)))


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(_word(rng) for _ in range(n))


@pytest.fixture(scope="module")
def task_data():
    """Small files' worth of LAMBADA, HellaSwag and CBT examples, as objects of the official formats."""
    rng = random.Random(0)
    lambada = [{"text": _sentence(rng, 6) + " " + last + "xo"} for last in rng.sample(SYLLABLES, 4)]
    hellaswag = []
    for i in range(4):
        ctx_a, ctx_b = _sentence(rng, 3), _sentence(rng, 2)
        hellaswag.append({
            "ind": i, "activity_label": "Test", "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": f"{ctx_a} {ctx_b}",
            # distinct first words: an ending that is a prefix of the right one would outscore it
            "endings": [f"{w} {_sentence(rng, rng.randint(0, 2))}".strip() for w in rng.sample(SYLLABLES, 4)],
            "label": rng.randrange(4),
            "split": "val", "split_type": "indomain", "source_id": f"test~{i}",
        })
    cbt = []
    for _ in range(3):
        options = sorted({_word(rng) + "x" for _ in range(30)})[:10]
        cbt.append({
            "sentences": [_sentence(rng, 1) for _ in range(20)],
            "question": f"{_sentence(rng, 2)} XXXXX {_sentence(rng, 1)}",
            "answer": rng.choice(options),
            "options": options,
        })
    return {"lambada": lambada, "hellaswag": hellaswag, "cbt": cbt}


def write_jsonl(path, objects) -> None:
    path.write_text("".join(json.dumps(o) + "\n" for o in objects), encoding="utf-8")


def write_cbt(path, examples) -> None:
    """The official CBT text format."""
    lines = []
    for ex in examples:
        lines += [f"{i} {s}" for i, s in enumerate(ex["sentences"], 1)]
        lines += [f"21 {ex['question']}\t{ex['answer']}\t\t{'|'.join(ex['options'])}", ""]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def memorizer(task_data) -> GPT2:
    """A tiny model trained on the right answers of ``task_data`` until it knows them by heart (seconds
    of training: the tests that use it are marked slow)."""
    texts = [ex["text"] for ex in task_data["lambada"]]
    texts += [f"{ex['ctx']} {ex['endings'][ex['label']]}" for ex in task_data["hellaswag"]]
    texts += [
        " ".join(ex["sentences"]) + " " + ex["question"].replace("XXXXX", ex["answer"])
        for ex in task_data["cbt"]
    ]
    ids = [BYTES.encode(t) for t in texts]
    model = random_model(n_positions=160, seed=1)
    x = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)
    y = torch.full_like(x, -100)
    for i, row in enumerate(ids):
        x[i, : len(row)] = torch.tensor(row)
        y[i, : len(row) - 1] = torch.tensor(row[1:])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    torch.set_flush_denormal(True)  # the tiny gradients near convergence are 3x slower as denormals
    try:
        for _ in range(300):
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if loss.item() < 0.02:
                break
    finally:
        torch.set_flush_denormal(False)
    return model.eval()


def direct_logprob(model: GPT2, context: list[int], continuation: list[int]) -> float:
    ids = torch.tensor([(context + continuation)[:-1]])
    with torch.no_grad():
        logprobs = model(ids)[0].log_softmax(-1)
    return sum(logprobs[len(context) + i - 1, t].item() for i, t in enumerate(continuation))


@pytest.mark.slow
def test_lambada(tmp_path, task_data, memorizer):
    scorer = Scorer(memorizer, BYTES, batch_size=3)
    write_jsonl(tmp_path / "lambada.jsonl", task_data["lambada"])
    result = evaluate_lambada(scorer, read_jsonl(tmp_path / "lambada.jsonl"))
    assert result.metrics["accuracy"] == 1.0
    for ex, detail in zip(task_data["lambada"], result.details, strict=True):
        context, word = ex["text"].rsplit(" ", 1)
        lp = direct_logprob(memorizer, BYTES.encode(context), BYTES.encode(" " + word))
        assert detail["logprob"] == pytest.approx(lp, abs=1e-4)
    logprobs = [d["logprob"] for d in result.details]
    assert result.metrics["perplexity"] == pytest.approx(math.exp(-sum(logprobs) / len(logprobs)))

    words = [ex["text"].rsplit(" ", 1)[1] for ex in task_data["lambada"]]
    shuffled = [{"text": ex["text"].rsplit(" ", 1)[0] + " " + words[(i + 1) % len(words)]}
                for i, ex in enumerate(task_data["lambada"])]
    write_jsonl(tmp_path / "shuffled.jsonl", shuffled)
    assert evaluate_lambada(scorer, read_jsonl(tmp_path / "shuffled.jsonl")).metrics["accuracy"] == 0.0


def _shuffle_labels(examples: list[dict], key: str, choices: str, seed: int = 1) -> tuple[list[dict], float]:
    """Examples with random labels, and the fraction of them that happen to stay right (chance)."""
    rng = random.Random(seed)
    out = []
    for ex in examples:
        out.append(ex | {key: rng.randrange(len(ex[choices])) if key == "label" else rng.choice(ex[choices])})
    same = sum(a[key] == b[key] for a, b in zip(examples, out, strict=True)) / len(examples)
    return out, same


@pytest.mark.slow
def test_hellaswag(tmp_path, task_data, memorizer):
    scorer = Scorer(memorizer, BYTES, batch_size=5)
    write_jsonl(tmp_path / "hs.jsonl", task_data["hellaswag"])
    result = evaluate_hellaswag(scorer, read_jsonl(tmp_path / "hs.jsonl"), style="llmc")
    assert result.metrics == {"accuracy": 1.0, "accuracy_norm": 1.0}
    for ex, detail in zip(task_data["hellaswag"], result.details, strict=True):
        context = BYTES.encode(ex["ctx"])
        expected = [direct_logprob(memorizer, context, BYTES.encode(" " + e)) for e in ex["endings"]]
        assert detail["logprobs"] == pytest.approx(expected, abs=1e-4)

    shuffled, chance = _shuffle_labels(task_data["hellaswag"], "label", "endings")
    write_jsonl(tmp_path / "shuffled.jsonl", shuffled)
    result = evaluate_hellaswag(scorer, read_jsonl(tmp_path / "shuffled.jsonl"), style="llmc")
    assert result.metrics["accuracy"] == chance < 1.0


def test_hellaswag_harness_prompt():
    obj = {"activity_label": "Baking cookies", "ctx_a": "A woman [title] mixes flour.", "ctx_b": "she",
           "endings": ["pours it [header] out.", "sings."], "label": 1}
    choice = hellaswag_example(obj, "line 1")
    assert choice.context == "Baking cookies: A woman. mixes flour. She"
    assert choice.continuations == [" pours it out.", " sings."]
    assert choice.lengths == [len("pours it out."), len("sings.")]


@pytest.mark.slow
def test_cbt(tmp_path, task_data, memorizer):
    scorer = Scorer(memorizer, BYTES, batch_size=8)
    write_cbt(tmp_path / "cbt.txt", task_data["cbt"])
    result = evaluate_cbt(scorer, read_cbt(tmp_path / "cbt.txt"), detokenizer=None)
    assert result.metrics == {"accuracy": 1.0}
    for ex, detail in zip(task_data["cbt"], result.details, strict=True):
        before, after = ex["question"].split(" XXXXX")
        context = BYTES.encode(" ".join(ex["sentences"]) + " " + before)
        filled = [BYTES.encode(f" {option}{after}") for option in ex["options"]]
        expected = [direct_logprob(memorizer, context, continuation) for continuation in filled]
        assert detail["logprobs"] == pytest.approx(expected, abs=1e-4)

    shuffled, chance = _shuffle_labels(task_data["cbt"], "answer", "options")
    write_cbt(tmp_path / "shuffled.txt", shuffled)
    result = evaluate_cbt(scorer, read_cbt(tmp_path / "shuffled.txt"), detokenizer=None)
    assert result.metrics["accuracy"] == chance < 1.0


# -- the report ------------------------------------------------------------------------------------------

# The paper's Table 3, 117M row, typed from ../shared/reference/gpt2-facts.md.
TABLE3_117M = {
    ("LAMBADA", "PPL"): 35.13, ("LAMBADA", "ACC"): 45.99, ("CBT-CN", "ACC"): 87.65, ("CBT-NE", "ACC"): 83.4,
    ("WikiText2", "PPL"): 29.41, ("PTB", "PPL"): 65.85, ("enwik8", "BPB"): 1.16, ("text8", "BPC"): 1.17,
    ("WikiText103", "PPL"): 37.50, ("1BW", "PPL"): 75.20,
}


@pytest.mark.slow
def test_report_writes_table3_with_the_published_numbers(tmp_path, task_data, memorizer):
    write_jsonl(tmp_path / "lambada.jsonl", task_data["lambada"])
    write_cbt(tmp_path / "cbt.txt", task_data["cbt"][:1])
    (tmp_path / "text.txt").write_text(" = Title = \n A line @-@ of text , here . \n", encoding="utf-8")
    files = {"lambada": "lambada.jsonl", "cbt-cn": "cbt.txt", "cbt-ne": "cbt.txt"}
    suite = tmp_path / "suite.toml"
    suite.write_text(
        "".join(
            f'[[eval]]\nbenchmark = "{b}"\nfile = "{files.get(b, "text.txt")}"\n'
            + ('split = "all"\n' if b in ("enwik8", "text8") else "")
            + ('detokenize = "none"\n' if b.startswith("cbt") else "")
            for b in ["lambada", "cbt-cn", "cbt-ne", "wikitext2", "ptb", "enwik8", "text8", "wikitext103",
                      "1bw"]
        ),
        encoding="utf-8",
    )
    scorer = Scorer(memorizer, BYTES)
    report = run_suite(scorer, load_suite(suite), model_name="tiny", published_as="gpt2")
    md, js = write_report(report, tmp_path / "out")

    table = json.loads(js.read_text())
    assert table["published_size"] == "117M"
    assert {(r["benchmark"], r["metric"]): r["published"] for r in table["rows"]} == TABLE3_117M
    lines = md.read_text().splitlines()
    header = next(line for line in lines if line.startswith("| Model |"))
    paper = next(line for line in lines if line.startswith("| GPT-2 117M (published) |"))
    ours = next(line for line in lines if line.startswith("| tiny (ours) |"))
    cells = dict(zip(_cells(header), _cells(paper), strict=True))
    assert {k: float(cells[f"{k[0]} ({k[1]})"]) for k in TABLE3_117M} == TABLE3_117M
    assert _cells(ours)[1:3] == [f"{table['rows'][0]['ours']:.2f}", "100.00"]  # LAMBADA PPL, ACC (memorised)
    assert [r["ours"] for r in table["rows"]][2:4] == [100.0, 100.0]  # CBT-CN, CBT-NE
    assert {run["benchmark"] for run in table["runs"]} == set(BENCHMARKS) - {"hellaswag"}


def test_published_size_is_recognised_by_shape():
    assert published_size(GPT2Config.from_preset("gpt2")) == "gpt2"
    assert published_size(GPT2Config.from_preset("gpt2-xl")) == "gpt2-xl"
    assert published_size(GPT2Config.from_preset("gpt2", vocab_size=50304)) is None
    assert published_size(GPT2Config.from_preset("tiny")) is None


def _cells(row: str) -> list[str]:
    return [cell.strip() for cell in row.strip().strip("|").split("|")]


@pytest.mark.slow
def test_report_without_a_published_size(tmp_path, task_data, memorizer):
    write_jsonl(tmp_path / "hs.jsonl", task_data["hellaswag"])
    suite = tmp_path / "suite.yaml"  # YAML works as well as TOML
    suite.write_text("eval:\n  - benchmark: hellaswag\n    file: hs.jsonl\n    style: llmc\n")
    report = run_suite(Scorer(memorizer, BYTES), load_suite(suite), model_name="tiny")
    md, _ = write_report(report, tmp_path)
    assert report["published_size"] is None
    assert [(r["metric"], r["ours"]) for r in report["rows"]] == [("ACC", 100.0), ("ACC-norm", 100.0)]
    assert "published" not in md.read_text().split("Lower is better")[0]


# -- the command line and the errors users can cause ----------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return saved_model_dir(random_model(tokenizer=BYTES), tmp_path_factory)


def test_cli_perplexity_json(tmp_path, model_dir, capsys):
    (tmp_path / "t.txt").write_text(random_text(100), encoding="utf-8")
    args = ["eval", "perplexity", "--model", str(model_dir), "--file", str(tmp_path / "t.txt"),
            "--stride", "32", "--words", "--json", "--no-progress", "--device", "cpu"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    scorer = Scorer(GPT2.from_pretrained(model_dir), BYTES)
    expected = evaluate_perplexity(scorer, read_text(tmp_path / "t.txt"), stride=32, words=True)
    assert out["perplexity"] == pytest.approx(expected.perplexity, rel=1e-6)
    assert out["bits_per_byte"] == pytest.approx(expected.bits_per_byte, rel=1e-6)
    assert out["tokens"] == expected.tokens and out["words"] == len(random_text(100).split())


@pytest.mark.parametrize(
    ("task", "content", "message"),
    [
        ("lambada", '{"text": "a b c"}\n{"text": "d e f"}\n{"text": oops}\n', r"line 3 is not valid JSON"),
        ("lambada", "", r"is empty"),
        ("hellaswag", '{"ctx": "a", "endings": ["b", "c"], "label": 2}', r"line 1: label 2 is out of range"),
        ("cbt", "1 a b\n21 c XXXXX d\tz\t\tx|y\n", r"answer 'z' is not among the candidates"),
    ],
    ids=["malformed-jsonl", "empty", "label-out-of-range", "cbt-answer-not-a-candidate"],
)
def test_bad_inputs_are_one_line_errors(tmp_path, model_dir, capsys, task, content, message):
    (tmp_path / "data").write_text(content, encoding="utf-8")
    code = main(["eval", task, "--model", str(model_dir), "--file", str(tmp_path / "data"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: ") and re.search(message, err[-1])
    assert not any("Traceback" in line for line in err)


def test_vocabulary_mismatch_is_an_error(tmp_path, model_dir, gpt2_ranks_file, capsys):
    (tmp_path / "t.txt").write_text("some text to score\n", encoding="utf-8")
    code = main(["eval", "perplexity", "--model", str(model_dir), "--file", str(tmp_path / "t.txt"),
                 "--tokenizer", str(gpt2_ranks_file)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "vocabulary (257 ids)" in err and "\n" not in err
    with pytest.raises(UserError, match="does not match the tokenizer"):
        Scorer(random_model(50257), BYTES)


def test_continuations_are_scored_in_any_batch_order():
    model = random_model(n_positions=16)
    rng = random.Random(0)
    def tokens(low: int, high: int) -> list[int]:
        return [rng.randrange(256) for _ in range(rng.randint(low, high))]

    requests = [Request(tokens(1, 30), tokens(1, 4)) for _ in range(9)]
    one = Scorer(model, BYTES, batch_size=1).loglikelihoods(requests)
    many = Scorer(model, BYTES, batch_size=4).loglikelihoods(requests)
    for r, a, b in zip(requests, one, many, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        window = (r.context + r.continuation)[-17:]  # contexts longer than the window lose their start
        cut = len(window) - len(r.continuation)
        assert a.logprob == pytest.approx(direct_logprob(model, window[:cut], window[cut:]), abs=1e-4)


def test_bfloat16_scores_close_to_float32():
    model = random_model()
    ids = [BYTES.encode(random_text(60))]
    fp32 = Scorer(model, BYTES).perplexity(ids, stride=32)
    bf16_model = random_model().to(torch.bfloat16)  # the same weights, rounded
    bf16 = Scorer(bf16_model, BYTES).perplexity(ids, stride=32)
    assert bf16.tokens == fp32.tokens
    assert bf16.perplexity == pytest.approx(fp32.perplexity, rel=2e-2)


def test_cli_tasks_and_report(tmp_path, task_data, model_dir, capsys):
    write_jsonl(tmp_path / "lambada.jsonl", task_data["lambada"])
    write_jsonl(tmp_path / "hs.jsonl", task_data["hellaswag"])
    write_cbt(tmp_path / "cbt.txt", task_data["cbt"])
    common = ["--model", str(model_dir), "--no-progress", "--json", "--batch-size", "3"]
    for task, file, keys, n in [("lambada", "lambada.jsonl", {"accuracy", "perplexity"}, 4),
                                ("hellaswag", "hs.jsonl", {"accuracy", "accuracy_norm"}, 4),
                                ("cbt", "cbt.txt", {"accuracy"}, 2)]:
        assert main(["eval", task, "--file", str(tmp_path / file), "--limit", str(n), *common]) == 0
        out = json.loads(capsys.readouterr().out)
        assert keys <= set(out) and out["examples"] == n and all(out[k] >= 0 for k in keys)
    suite = '[[eval]]\nbenchmark = "lambada"\nfile = "lambada.jsonl"\nlimit = 2\n'
    (tmp_path / "suite.toml").write_text(suite)
    args = ["eval", "report", "--suite", str(tmp_path / "suite.toml"), "--out", str(tmp_path / "out"),
            "--compare-with", "gpt2-xl", *common[:3]]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| GPT-2 1542M (published) | 8.63 | 63.24 |" in printed
    assert printed == (tmp_path / "out" / "report.md").read_text()
    assert json.loads((tmp_path / "out" / "report.json").read_text())["runs"][0]["examples"] == 2


def test_standard_split_needs_the_original_file(tmp_path):
    (tmp_path / "enwik8").write_bytes(b"<mediawiki>\n")
    with pytest.raises(UserError, match=r"needs the original 100,000,000-byte file.*split 'all'"):
        read_text(tmp_path / "enwik8", split="test")
    assert "".join(read_text(tmp_path / "enwik8", split="all").blocks) == "<mediawiki>\n"


def test_hub_datasets_without_the_library_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(UserError, match="needs the `datasets` library"):
        next(hub_rows("lambada"))
    with pytest.raises(UserError, match="no hub dataset is known as 'nope'"):
        next(hub_rows("nope"))


def test_the_shipped_table3_suite_lists_every_benchmark() -> None:
    from gpt2.evaluation.report import BENCHMARKS, load_suite

    suite = Path(__file__).resolve().parents[1] / "configs" / "table3.toml"
    entries = load_suite(suite)
    assert sorted(e["benchmark"] for e in entries) == sorted(BENCHMARKS)
    assert all(Path(e["file"]).is_absolute() for e in entries)
