"""Zero-shot evaluation as in the GPT-2 paper: perplexity of language-modelling corpora (``perplexity``),
LAMBADA, HellaSwag and the Children's Book Test (``benchmarks``), and the paper's Table 3 (``report``), all
scored by one ``Scorer`` (``scoring``)."""

from __future__ import annotations

import importlib

# Each name's module, imported when the name is first used (the command line describes the
# corpora without loading torch).
_MODULES = {
    "BENCHMARKS": "report",
    "CORPORA": "perplexity",
    "DETOKENIZERS": "perplexity",
    "Loglikelihood": "scoring",
    "PerplexityResult": "scoring",
    "Request": "scoring",
    "Scorer": "scoring",
    "TaskResult": "benchmarks",
    "check_vocabulary": "scoring",
    "evaluate_cbt": "benchmarks",
    "evaluate_hellaswag": "benchmarks",
    "evaluate_lambada": "benchmarks",
    "evaluate_perplexity": "perplexity",
    "hub_text": "perplexity",
    "load_suite": "report",
    "markdown": "report",
    "published_results": "report",
    "read_cbt": "benchmarks",
    "read_jsonl": "benchmarks",
    "read_text": "perplexity",
    "run_suite": "report",
    "task_rows": "benchmarks",
    "tokenize": "perplexity",
    "write_report": "report",
}

__all__ = list(_MODULES)


def __getattr__(name: str) -> object:
    if name in _MODULES:
        return getattr(importlib.import_module(f"gpt2.evaluation.{_MODULES[name]}"), name)
    raise AttributeError(f"module 'gpt2.evaluation' has no attribute {name!r}")
