"""Training metrics: the JSON-lines log in a run directory, and its loss-curve plot.

One record per line: ``{"step", "loss", "lr", "tokens", "elapsed", "tokens_per_s", ...}`` for a
training step and ``{"step", "val_loss"}`` for a validation. ``loss`` and ``val_loss`` are the data's
cross-entropy (nats per trained token); a distilled run's steps (``--distill-from``) add ``soft_loss``,
the soft loss per trained token (T^2 times the KL divergence from the teacher's distribution to the
student's, both at temperature T).
"""

from __future__ import annotations

import json
from pathlib import Path

from gpt2.util.atomic import check_apart, write_atomic
from gpt2.util.errors import UserError
from gpt2.util.jsonfile import NotJSON, parse_json

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class MetricsLog:
    """Appends records to ``RUN/metrics.jsonl``, one JSON object per line, flushed as written."""

    def __init__(self, run_dir: Path) -> None:
        self.file = (run_dir / METRICS_FILE).open("a", encoding="utf-8")

    def write(self, record: dict[str, object]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of a run; a line cut short by a kill is skipped."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise UserError(f"{path} not found; give a training run directory (`gpt2 train --out RUN`)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); it is not a metrics log") from None
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        try:  # a diverged run logs NaN losses: kept, and drawn as gaps
            record = parse_json(line, f"{path}, line {number}", finite=False)
        except NotJSON:  # a line cut short by a kill
            continue
        if not _is_record(record):
            raise UserError(f"{path}, line {number}: not a metrics record (a JSON object with a numeric "
                            f"step and losses); fix or delete that line")
        records.append(record)
    return records


def _is_record(record: object) -> bool:
    """A JSON object whose step and losses, where present, are numbers."""
    if not isinstance(record, dict):
        return False
    numbers = [record.get(key, 0) for key in ("step", "loss", "val_loss", "soft_loss")]
    return all(isinstance(n, int | float) and not isinstance(n, bool) for n in numbers)


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop the records after ``step``: a resumed run logs those steps again."""
    if (run_dir / METRICS_FILE).is_file():
        kept = [json.dumps(r) + "\n" for r in read_metrics(run_dir) if r.get("step", 0) <= step]
        write_atomic(run_dir / METRICS_FILE, lambda tmp: tmp.write_text("".join(kept), encoding="utf-8"))


def plot_metrics(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw training loss (raw and smoothed) and validation loss against steps into ``RUN/loss.png``
    (or ``out``); returns the path."""
    path = Path(out) if out else Path(run_dir) / PLOT_FILE
    check_apart(path, {"metrics log": Path(run_dir) / METRICS_FILE})
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        raise UserError(f"{run_dir / METRICS_FILE} holds no losses yet; plot after some training steps")
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    if train:
        steps, losses = zip(*train, strict=True)
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8)
        ax.plot(steps, _smooth(list(losses)), color="tab:blue", label="train")
    if val:
        steps, losses = zip(*val, strict=True)
        ax.plot(steps, losses, "o-", color="tab:orange", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(run_dir.resolve().name)
    ax.grid(alpha=0.3)
    ax.legend()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))
    plt.close(fig)
    return path


def _smooth(values: list[float], alpha: float = 0.1) -> list[float]:
    """Exponential moving average, bias-corrected so the first points are not pulled to zero."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = (1 - alpha) * avg + alpha * v
        out.append(avg / (1 - (1 - alpha) ** i))
    return out
