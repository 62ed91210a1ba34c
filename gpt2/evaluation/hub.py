"""The evaluation sets by name from the Hugging Face hub, through the optional ``datasets`` library.

Rows come back in the schemas the local readers produce (a ``text`` line, a HellaSwag or LAMBADA
object, a CBT example with ``sentences``/``question``/``answer``/``options``), so every task reads
both sources the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from gpt2.util.errors import UserError


@dataclass(frozen=True)
class HubDataset:
    path: str
    config: str | None
    split: str
    text_field: str | None = None  # language-modelling sets: the field holding a line of text


HUB_DATASETS: dict[str, HubDataset] = {
    "wikitext2": HubDataset("Salesforce/wikitext", "wikitext-2-raw-v1", "test", "text"),
    "wikitext103": HubDataset("Salesforce/wikitext", "wikitext-103-raw-v1", "test", "text"),
    "ptb": HubDataset("ptb-text-only/ptb_text_only", "penn_treebank", "test", "sentence"),
    "lambada": HubDataset("EleutherAI/lambada_openai", "default", "test"),
    "hellaswag": HubDataset("Rowan/hellaswag", None, "validation"),
    "cbt-cn": HubDataset("cam-cst/cbt", "CN", "test"),
    "cbt-ne": HubDataset("cam-cst/cbt", "NE", "test"),
}


def hub_rows(name: str) -> Iterator[tuple[str, dict]]:
    """``(where, row)`` for each row of the named set, streamed; ``where`` names it in error messages."""
    if name not in HUB_DATASETS:
        raise UserError(
            f"no hub dataset is known as {name!r}; choose one of: {', '.join(HUB_DATASETS)}, "
            "or give the file with --file"
        )
    try:
        import datasets  # optional: only this way of getting the data needs it
    except ImportError:
        raise UserError(
            f"loading {name!r} by name needs the `datasets` library (pip install datasets); "
            "or download the file and give it with --file"
        ) from None
    spec = HUB_DATASETS[name]
    try:
        rows = datasets.load_dataset(spec.path, spec.config, split=spec.split, streaming=True)
        for i, row in enumerate(rows, 1):
            yield f"{spec.path} row {i}", dict(row)
    except (ConnectionError, OSError, ValueError) as e:
        raise UserError(f"could not load {spec.path} from the hub ({e}); give a local file with --file") \
            from None


def hub_lines(name: str) -> Iterator[str]:
    """The lines of a language-modelling set, each ending in a newline."""
    field = HUB_DATASETS[name].text_field if name in HUB_DATASETS else None
    if field is None:
        raise UserError(
            f"{name!r} is not a language-modelling set on the hub; choose one of: "
            + ", ".join(k for k, v in HUB_DATASETS.items() if v.text_field)
        )
    for _, row in hub_rows(name):
        line = row[field]
        if line:
            yield line if line.endswith("\n") else line + "\n"
