"""Zero-shot evaluation as in the GPT-2 paper: perplexity of language-modelling corpora (``perplexity``),
LAMBADA, HellaSwag and the Children's Book Test (``benchmarks``), and the paper's Table 3 (``report``), all
scored by one ``Scorer`` (``scoring``)."""

from gpt2.evaluation.benchmarks import (
    TaskResult,
    evaluate_cbt,
    evaluate_hellaswag,
    evaluate_lambada,
    read_cbt,
    read_jsonl,
    task_rows,
)
from gpt2.evaluation.perplexity import (
    CORPORA,
    DETOKENIZERS,
    evaluate_perplexity,
    hub_text,
    read_text,
    tokenize,
)
from gpt2.evaluation.report import (
    BENCHMARKS,
    load_suite,
    markdown,
    published_results,
    run_suite,
    write_report,
)
from gpt2.evaluation.scoring import Loglikelihood, PerplexityResult, Request, Scorer, check_vocabulary

__all__ = [
    "BENCHMARKS",
    "CORPORA",
    "DETOKENIZERS",
    "Loglikelihood",
    "PerplexityResult",
    "Request",
    "Scorer",
    "TaskResult",
    "check_vocabulary",
    "evaluate_cbt",
    "evaluate_hellaswag",
    "evaluate_lambada",
    "evaluate_perplexity",
    "hub_text",
    "load_suite",
    "markdown",
    "published_results",
    "read_cbt",
    "read_jsonl",
    "read_text",
    "run_suite",
    "task_rows",
    "tokenize",
    "write_report",
]
