"""The zero-shot tasks: LAMBADA (last-word prediction), HellaSwag (sentence completion) and the
Children's Book Test (cloze), read from their official files or the hub and scored by log-likelihood.

Examples are read lazily and scored in groups of ``GROUP`` examples, so files of any size run in
bounded memory.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from gpt2.evaluation.hub import hub_rows
from gpt2.evaluation.perplexity import get_detokenizer
from gpt2.evaluation.scoring import Request, Scorer
from gpt2.util.errors import UserError
from gpt2.util.jsonfile import parse_json

GROUP = 1024  # examples scored together: sorting by length within a group keeps padding low

Rows = Iterable[tuple[str, dict]]  # (where, object): ``where`` names the line in error messages


@dataclass
class TaskResult:
    """A task's metrics (accuracies as fractions), the number of examples, and per-example details."""

    task: str
    metrics: dict[str, float]
    examples: int
    seconds: float
    details: list[dict] = field(default_factory=list)

    def to_dict(self, details: bool = False) -> dict[str, object]:
        out = {"task": self.task, **self.metrics, "examples": self.examples, "seconds": self.seconds}
        return out | ({"details": self.details} if details else {})


# -- reading ------------------------------------------------------------------------------------------


def read_jsonl(path: str | Path) -> Iterator[tuple[str, dict]]:
    """``(where, object)`` for each line of a JSON-lines file (blank lines skipped), streamed."""
    path = Path(path)
    found = False
    with _open_text(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            obj = parse_json(line, f"{path}: line {number}")
            if not isinstance(obj, dict):
                raise UserError(f"{path}: line {number} is not a JSON object; each line must be one {{...}}")
            found = True
            yield f"{path}: line {number}", obj
    if not found:
        raise UserError(f"{path}: the file holds no examples")


def read_cbt(path: str | Path) -> Iterator[tuple[str, dict]]:
    """The Children's Book Test's text format, as rows of the hub's schema.

    Each example: 20 numbered context lines, then line 21 "question with XXXXX<TAB>answer<TAB><TAB>
    candidate|candidate|...", then a blank line.
    """
    path = Path(path)
    sentences: list[str] = []
    found = False
    with _open_text(path) as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            index, _, rest = line.partition(" ")
            if not index.isdigit():
                raise UserError(
                    f"{path}: line {number} does not start with a line number; is this a CBT file?"
                )
            if index == "1":
                sentences = []
            if "\t" not in rest:
                sentences.append(rest)
                continue
            fields = rest.split("\t")
            if len(fields) != 4 or "XXXXX" not in fields[0]:
                raise UserError(
                    f"{path}: line {number} is not 'question with XXXXX<TAB>answer<TAB><TAB>candidates'"
                )
            found = True
            yield f"{path}: line {number}", {
                "sentences": sentences,
                "question": fields[0],
                "answer": fields[1],
                "options": fields[3].split("|"),
            }
    if not found:
        raise UserError(f"{path}: the file holds no CBT questions")


@contextlib.contextmanager
def _open_text(path: Path) -> Iterator[TextIO]:
    """The file for reading as UTF-8 text; problems with it become ``UserError``s."""
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the file is empty; give the task's data file")
    try:
        with open(path, encoding="utf-8") as f:
            yield f
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; give the task's data file as published") from None


def _field(obj: dict, key: str, kind: type, where: str) -> object:
    value = obj.get(key)
    if not isinstance(value, kind):
        raise UserError(
            f"{where}: needs a {kind.__name__} field {key!r}; is this the right file for the task?"
        )
    return value


# -- LAMBADA ------------------------------------------------------------------------------------------


def lambada_example(obj: dict, where: str) -> tuple[str, str]:
    """Context and final word (with its leading space) of a LAMBADA passage {"text": ...}."""
    text = str(_field(obj, "text", str, where)).strip()
    context, _, word = text.rpartition(" ")
    if not context:
        raise UserError(f"{where}: the text has no final word after a context")
    return context, " " + word


def evaluate_lambada(scorer: Scorer, rows: Rows, *, limit: int | None = None) -> TaskResult:
    """Accuracy: greedy decoding predicts every token of the final word. Perplexity: exp of the mean
    negative log-probability of the final word (all its tokens)."""
    started = time.perf_counter()
    details: list[dict] = []
    for group in _groups(rows, limit):
        examples = [lambada_example(obj, where) for where, obj in group]
        contexts, words = _encode(scorer, [c for c, _ in examples]), _encode(scorer, [w for _, w in examples])
        requests = [Request(c, w) for c, w in zip(contexts, words, strict=True)]
        scores = scorer.loglikelihoods(requests, "lambada")
        details += [{"logprob": s.logprob, "tokens": s.tokens, "correct": s.greedy} for s in scores]
    n = len(details)
    metrics = {
        "accuracy": sum(d["correct"] for d in details) / n,
        "perplexity": math.exp(-sum(d["logprob"] for d in details) / n),
    }
    return TaskResult("lambada", metrics, n, time.perf_counter() - started, details)


# -- multiple choice: HellaSwag, CBT -------------------------------------------------------------------


@dataclass
class Choice:
    """A multiple-choice example: the context, the continuations to compare (each with its leading
    space), the index of the right one, and each continuation's length for length normalisation."""

    context: str
    continuations: list[str]
    label: int
    lengths: list[int] | None = None  # None: normalise by tokens


def _hellaswag_clean(text: str) -> str:
    """lm-evaluation-harness's HellaSwag preprocessing (WikiHow's " [title]" markers and brackets)."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def hellaswag_example(obj: dict, where: str, style: str = "harness") -> Choice:
    """A HellaSwag line {ctx, endings, label, ...}.

    ``style="harness"`` (lm-evaluation-harness): context "activity_label: ctx_a Ctx_b", cleaned, and
    acc_norm divides by the ending's length in characters. ``style="llmc"`` (llm.c): the raw ``ctx``,
    and acc_norm divides by the ending's length in tokens.
    """
    endings = _field(obj, "endings", list, where)
    label = obj.get("label")
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)  # the hub's copy stores labels as strings
    if not isinstance(label, int) or isinstance(label, bool):
        raise UserError(f"{where}: needs an integer field 'label'")
    if not 0 <= label < len(endings):
        raise UserError(
            f"{where}: label {label} is out of range for {len(endings)} endings (0..{len(endings) - 1})"
        )
    if style == "llmc":
        context = str(_field(obj, "ctx", str, where))
        return Choice(context, [" " + str(e) for e in endings], label)
    if style != "harness":
        raise UserError(f"unknown HellaSwag style {style!r}; choose harness or llmc")
    if isinstance(obj.get("ctx_a"), str) and isinstance(obj.get("ctx_b"), str):
        context = obj["ctx_a"] + " " + obj["ctx_b"].capitalize()
    else:
        context = str(_field(obj, "ctx", str, where))
    context = _hellaswag_clean(f"{obj.get('activity_label', '')}: {context}".removeprefix(": "))
    cleaned = [_hellaswag_clean(str(e)) for e in endings]
    return Choice(context, [" " + e for e in cleaned], label, [len(e) for e in cleaned])


def cbt_example(obj: dict, where: str, detokenize: Callable[[str], str] | None = None) -> Choice:
    """A CBT example: the 20 sentences and the question up to XXXXX are the context; each candidate
    fills the gap and is scored with the rest of the question, as in the GPT-2 paper."""
    sentences = _field(obj, "sentences", list, where)
    question = str(_field(obj, "question", str, where))
    options = [str(o) for o in _field(obj, "options", list, where)]
    answer = str(_field(obj, "answer", str, where))
    if answer not in options:
        raise UserError(f"{where}: the answer {answer!r} is not among the candidates {options}")
    before, _, after = question.partition("XXXXX")
    clean = detokenize or (lambda s: s)
    context = clean(" ".join(str(s) for s in sentences))
    if before.strip():
        context += " " + clean(before.strip())
    return Choice(context, [" " + clean(f"{o}{after}".rstrip()) for o in options], options.index(answer))


def evaluate_choices(scorer: Scorer, task: str, examples: Iterable[tuple[str, Choice]]) -> TaskResult:
    """``accuracy``: the continuation with the highest log-likelihood is the labelled one.
    ``accuracy_norm``: the same with log-likelihoods divided by the continuations' lengths."""
    started = time.perf_counter()
    details: list[dict] = []
    for group in _groups(examples, None):
        choices = [c for _, c in group]
        contexts = _encode(scorer, [c.context for c in choices])
        continuations = _encode(scorer, [k for c in choices for k in c.continuations])
        requests, spans = [], []
        for choice, context in zip(choices, contexts, strict=True):
            start = len(requests)
            requests += [Request(context, continuations[start + j]) for j in range(len(choice.continuations))]
            spans.append(slice(start, len(requests)))
        scores = scorer.loglikelihoods(requests, task)
        for choice, span in zip(choices, spans, strict=True):
            row = scores[span]
            logprobs = [s.logprob for s in row]
            lengths = choice.lengths or [s.tokens for s in row]
            normed = [lp / max(n, 1) for lp, n in zip(logprobs, lengths, strict=True)]
            details.append({
                "label": choice.label,
                "logprobs": logprobs,
                "prediction": max(range(len(row)), key=logprobs.__getitem__),
                "prediction_norm": max(range(len(row)), key=normed.__getitem__),
            })
    n = len(details)
    metrics = {
        "accuracy": sum(d["prediction"] == d["label"] for d in details) / n,
        "accuracy_norm": sum(d["prediction_norm"] == d["label"] for d in details) / n,
    }
    return TaskResult(task, metrics, n, time.perf_counter() - started, details)


def evaluate_hellaswag(
    scorer: Scorer, rows: Rows, *, style: str = "harness", limit: int | None = None
) -> TaskResult:
    examples = ((where, hellaswag_example(obj, where, style)) for where, obj in _limited(rows, limit))
    return evaluate_choices(scorer, "hellaswag", examples)


def evaluate_cbt(
    scorer: Scorer,
    rows: Rows,
    *,
    task: str = "cbt",
    detokenizer: str | None = "cbt",
    limit: int | None = None,
) -> TaskResult:
    detokenize = get_detokenizer(detokenizer)
    examples = ((where, cbt_example(obj, where, detokenize)) for where, obj in _limited(rows, limit))
    result = evaluate_choices(scorer, task, examples)
    del result.metrics["accuracy_norm"]  # the paper compares candidates by their plain log-likelihood
    return result


# -- sources and helpers ------------------------------------------------------------------------------


def task_rows(task: str, *, file: str | Path | None = None, dataset: str | None = None) -> Rows:
    """The rows of a task from a local file (its official format) or a hub dataset by name."""
    if (file is None) == (dataset is None):
        raise UserError("give either a file (--file) or a hub dataset name (--dataset)")
    if dataset is not None:
        return hub_rows(dataset)
    return read_cbt(file) if task.startswith("cbt") else read_jsonl(file)  # type: ignore[arg-type]


def _limited(rows: Rows, limit: int | None) -> Iterator[tuple[str, dict]]:
    if limit is not None and limit < 1:
        raise UserError(f"the limit must be at least 1 example, got {limit}")
    return itertools.islice(rows, limit)


def _groups(items: Iterable, limit: int | None) -> Iterator[list]:
    it = _limited(items, limit)
    while group := list(itertools.islice(it, GROUP)):
        yield group


def _encode(scorer: Scorer, texts: list[str]) -> list[list[int]]:
    return scorer.tokenizer.encode_batch(texts)
