"""The paper's Table 3 from one suite file: run the listed evaluations and write a markdown and a JSON
table, with GPT-2's published numbers beside ours when the model has one of the published shapes.

A suite (TOML or YAML) lists evaluations under ``eval``::

    [[eval]]
    benchmark = "wikitext2"            # a key of BENCHMARKS
    file = "wikitext-2-raw/wiki.test.raw"   # relative to the suite file; or dataset = "wikitext2"
    stride = 512                       # optional: perplexity's stride, context, detokenize, split;
                                       # tasks' limit; HellaSwag's style
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from gpt2.config import PRESETS, PUBLISHED_SIZES, GPT2Config, read_settings
from gpt2.evaluation.benchmarks import evaluate_cbt, evaluate_hellaswag, evaluate_lambada, task_rows
from gpt2.evaluation.perplexity import evaluate_perplexity, get_corpus, hub_text, read_text
from gpt2.evaluation.scoring import Scorer
from gpt2.util.atomic import write_atomic
from gpt2.util.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class Benchmark:
    """A row group of the table: which evaluation runs and which of its results fill which metric
    (result field, scale: 100 turns fractions into percent)."""

    kind: str  # perplexity | lambada | hellaswag | cbt
    metrics: dict[str, tuple[str, float]]


BENCHMARKS: dict[str, Benchmark] = {
    "lambada": Benchmark("lambada", {"lambada_ppl": ("perplexity", 1), "lambada_acc": ("accuracy", 100)}),
    "cbt-cn": Benchmark("cbt", {"cbt_cn_acc": ("accuracy", 100)}),
    "cbt-ne": Benchmark("cbt", {"cbt_ne_acc": ("accuracy", 100)}),
    "wikitext2": Benchmark("perplexity", {"wikitext2_ppl": ("word_perplexity", 1)}),
    "ptb": Benchmark("perplexity", {"ptb_ppl": ("word_perplexity", 1)}),
    "enwik8": Benchmark("perplexity", {"enwik8_bpb": ("bits_per_byte", 1)}),
    "text8": Benchmark("perplexity", {"text8_bpc": ("bits_per_char", 1)}),
    "wikitext103": Benchmark("perplexity", {"wikitext103_ppl": ("word_perplexity", 1)}),
    "1bw": Benchmark("perplexity", {"1bw_ppl": ("word_perplexity", 1)}),
    "hellaswag": Benchmark(
        "hellaswag", {"hellaswag_acc": ("accuracy", 100), "hellaswag_acc_norm": ("accuracy_norm", 100)}
    ),
}
OPTIONS = {"benchmark", "file", "dataset", "stride", "context", "detokenize", "split", "limit", "style"}


def published_results() -> dict:
    """The published figures (``published_results.toml``, shipped with the package)."""
    text = resources.files("gpt2.evaluation").joinpath("published_results.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


def published_size(config: GPT2Config) -> str | None:
    """The preset name (gpt2 ... gpt2-xl) whose shape ``config`` has, if any."""
    shape = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
    for name in PUBLISHED_SIZES:
        if all(getattr(config, f) == getattr(PRESETS[name], f) for f in shape):
            return name
    return None


def load_suite(path: str | Path) -> list[dict]:
    """The evaluations a suite file lists, checked."""
    path = Path(path)
    entries = read_settings(path, "suite file").get("eval")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise UserError(
            f"{path}: needs a non-empty list 'eval' of tables ([[eval]] benchmark = ..., file = ...)"
        )
    for i, entry in enumerate(entries, 1):
        unknown = set(entry) - OPTIONS
        if entry.get("benchmark") not in BENCHMARKS:
            raise UserError(
                f"{path}: eval {i} names benchmark {entry.get('benchmark')!r}; choose one of: "
                + ", ".join(BENCHMARKS)
            )
        if unknown:
            raise UserError(f"{path}: eval {i} has unknown keys {sorted(unknown)}; known: {sorted(OPTIONS)}")
        if ("file" in entry) == ("dataset" in entry):
            raise UserError(f"{path}: eval {i} needs exactly one of 'file' and 'dataset'")
        if "file" in entry:
            entry["file"] = str((path.parent / entry["file"]).resolve())
    return entries


def run_benchmark(scorer: Scorer, entry: dict) -> dict[str, object]:
    """Run one suite entry; the result object of its evaluation."""
    name = entry["benchmark"]
    kind = BENCHMARKS[name].kind
    file, dataset, limit = entry.get("file"), entry.get("dataset"), entry.get("limit")
    if kind == "perplexity":
        corpus = get_corpus(name)
        detokenizer = entry.get("detokenize", corpus.detokenizer)
        split = entry.get("split", "test" if corpus.standard_split else None)
        if dataset is not None:
            text = hub_text(dataset, detokenizer=detokenizer)
        else:
            text = read_text(file, detokenizer=detokenizer, split=split)
        result = evaluate_perplexity(
            scorer, text, context=entry.get("context"), stride=entry.get("stride"), words=True
        )
        return result.to_dict()
    rows = task_rows(kind, file=file, dataset=dataset)
    if kind == "lambada":
        return evaluate_lambada(scorer, rows, limit=limit).to_dict()
    if kind == "hellaswag":
        return evaluate_hellaswag(scorer, rows, style=entry.get("style", "harness"), limit=limit).to_dict()
    detokenizer = entry.get("detokenize", "cbt")
    return evaluate_cbt(scorer, rows, task=name, detokenizer=detokenizer, limit=limit).to_dict()


def run_suite(
    scorer: Scorer,
    entries: list[dict],
    *,
    model_name: str,
    published_as: str | None = None,
    on_result: Callable[[str, dict], None] | None = None,
) -> dict[str, object]:
    """Run every entry and build the report: ``rows`` (one per metric: ours and the published value
    for the model's size), ``runs`` (each evaluation's full result) and the published figures' sources.

    The published figures shown are those of ``published_as`` (gpt2 ... gpt2-xl), by default of the
    size whose shape the model has, if any.
    """
    if published_as is not None and published_as not in PUBLISHED_SIZES:
        raise UserError(
            f"no published figures for {published_as!r}; choose one of: {', '.join(PUBLISHED_SIZES)}"
        )
    published = published_results()
    size = published_as or published_size(scorer.model.config)
    ours: dict[str, float] = {}
    runs = []
    for entry in entries:
        tokens, seconds = scorer.throughput.tokens, scorer.throughput.seconds
        result = run_benchmark(scorer, entry)
        tokens, seconds = scorer.throughput.tokens - tokens, scorer.throughput.seconds - seconds
        result["model_tokens_per_second"] = tokens / seconds if seconds else 0.0
        for key, (field, scale) in BENCHMARKS[entry["benchmark"]].metrics.items():
            ours[key] = float(result[field]) * scale  # type: ignore[arg-type]
        source = entry.get("file") or entry.get("dataset")
        runs.append({"benchmark": entry["benchmark"], "source": source} | result)
        if on_result:
            on_result(entry["benchmark"], result)
    rows = []
    for metric in published["metric"]:
        if metric["key"] in ours:
            rows.append({
                "key": metric["key"],
                "benchmark": metric["benchmark"],
                "metric": metric["metric"],
                "better": metric["better"],
                "ours": ours[metric["key"]],
                "published": metric.get(size) if size else None,
                "source": published["sources"][metric["source"]] if size and size in metric else None,
            })
    return {
        "model": model_name,
        "published_size": published["models"][size] if size else None,
        "rows": rows,
        "runs": runs,
    }


def _number(value: float | None) -> str:
    """Two decimals, or as many as a published figure has (44.575)."""
    if value is None:
        return "–"
    text = f"{value:.2f}"
    return text if float(text) == value or value != round(value, 3) else f"{value:g}"


def markdown(report: dict) -> str:
    """The report as a markdown table in the paper's layout: one column per benchmark, one row per model."""
    rows = report["rows"]
    head = [f"{r['benchmark']} ({r['metric']})" for r in rows]
    lines = [
        f"# Zero-shot results: {report['model']}",
        "",
        "| Model | " + " | ".join(head) + " |",
        "|---|" + "---|" * len(rows),
        f"| {report['model']} (ours) | " + " | ".join(_number(r["ours"]) for r in rows) + " |",
    ]
    if report["published_size"]:
        lines.append(
            f"| GPT-2 {report['published_size']} (published) | "
            + " | ".join(_number(r["published"]) for r in rows)
            + " |"
        )
    lines += ["", "Lower is better for PPL, BPB and BPC; higher for ACC (percent)."]
    sources = sorted({r["source"] for r in rows if r["source"]})
    if sources:
        lines += ["", "Published figures: " + "; ".join(sources) + "."]
    lines += ["", "| Evaluation | Data | Tokens or examples | Seconds | Model tokens/s |"]
    lines += ["|---|---|---|---|---|"]
    for run in report["runs"]:
        count = run.get("tokens", run.get("examples"))
        lines.append(
            f"| {run['benchmark']} | {run['source']} | {count:,} | {run['seconds']:.1f} | "
            f"{run['model_tokens_per_second']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def report_files(directory: str | Path) -> tuple[Path, Path]:
    """The two files ``write_report`` writes into ``directory``: ``report.md`` and ``report.json``."""
    return Path(directory) / "report.md", Path(directory) / "report.json"


def write_report(report: dict, directory: str | Path) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.json`` into ``directory`` (atomically); their paths."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    md, js = report_files(directory)
    write_atomic(md, lambda p: p.write_text(markdown(report), encoding="utf-8"))
    write_atomic(js, lambda p: p.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8"))
    return md, js
