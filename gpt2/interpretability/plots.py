"""Heat maps of analysis results (``gpt2 inspect --plot``): a PNG drawn by matplotlib, or an HTML page
that is one file (tables of coloured cells and their values, no script, nothing fetched).

Free of torch: values are rows of numbers (``tensor.tolist()``). NaN cells are grey.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gpt2.util.atomic import write_atomic
from gpt2.util.errors import UserError

SUFFIXES = (".png", ".html")
ANNOTATED_CELLS = 600  # a PNG writes each cell's label into it up to this many cells


@dataclass
class Panel:
    """One heat map: ``values`` (rows of numbers) with a label per row and column; ``labels``, the text of
    each cell (default: its value); ``signed`` values are coloured blue below 0 and red above it,
    others from white to blue."""

    title: str
    values: Sequence[Sequence[float]]
    rows: Sequence[str]
    columns: Sequence[str]
    labels: Sequence[Sequence[str]] | None = None
    signed: bool = False
    xlabel: str = ""
    ylabel: str = ""


def check_plot_path(path: str | Path) -> Path:
    """``path`` if it names a PNG or an HTML file, else a one-line error."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise UserError(f"--plot {path}: name a .png or an .html file")
    return path


def save_heatmaps(path: str | Path, panels: Sequence[Panel], title: str) -> Path:
    """Write ``panels`` as one PNG (one above the other) or one HTML page, by ``path``'s suffix."""
    path = check_plot_path(path)
    if path.suffix.lower() == ".html":
        page = _html(panels, title)
        write_atomic(path, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    else:
        _png(path, panels, title)
    return path


def _png(path: Path, panels: Sequence[Panel], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    sizes = [(len(p.rows), len(p.columns)) for p in panels]
    width = min(max(4.0, 0.55 * max(c for _, c in sizes) + 2.5), 40.0)
    heights = [min(max(2.0, 0.4 * r + 1.5), 30.0) for r, _ in sizes]
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, sum(heights)), dpi=100, squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, panel in zip(axes[:, 0], panels, strict=True):
        values = [[_finite_or_nan(v) for v in row] for row in panel.values]
        low, high = _range(values, panel.signed)
        cmap = matplotlib.colormaps["RdBu_r" if panel.signed else "Blues"].with_extremes(bad="#cccccc")
        image = ax.imshow(values, cmap=cmap, vmin=low, vmax=high, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(panel.columns)), panel.columns, rotation=90 if len(panel.columns) > 8 else 0)
        ax.set_yticks(range(len(panel.rows)), panel.rows)
        ax.set_title(panel.title)
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        fig.colorbar(image, ax=ax)
        if len(panel.rows) * len(panel.columns) <= ANNOTATED_CELLS:
            _annotate(ax, panel, values, low, high)
    fig.suptitle(title)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))
    plt.close(fig)


def _annotate(ax: object, panel: Panel, values: list[list[float]], low: float, high: float) -> None:
    """Each cell's label in it, white on the darker colours."""
    zero = 0.0 if panel.signed else low
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            dark = not math.isnan(value) and abs(value - zero) > 0.6 * (high - low)
            ax.text(j, i, _label(panel, i, j), ha="center", va="center", fontsize=7,
                    color="white" if dark else "black")


def _html(panels: Sequence[Panel], title: str) -> str:
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:1em}table{border-collapse:collapse;margin-bottom:2em}"
        "td,th{border:1px solid #ddd;padding:2px 5px;font-size:12px;text-align:center;white-space:pre}"
        "th{background:#f4f4f4}caption{font-weight:bold;text-align:left;padding:4px 0}</style>",
        f"</head><body><h1>{html.escape(title)}</h1>",
    ]
    for panel in panels:
        values = [[_finite_or_nan(v) for v in row] for row in panel.values]
        low, high = _range(values, panel.signed)
        corner = html.escape(f"{panel.ylabel} \\ {panel.xlabel}" if panel.xlabel else panel.ylabel)
        parts.append(f"<table><caption>{html.escape(panel.title)}</caption><tr><th>{corner}</th>"
                     + "".join(f"<th>{html.escape(c)}</th>" for c in panel.columns) + "</tr>")
        for i, (name, row) in enumerate(zip(panel.rows, values, strict=True)):
            cells = []
            for j, value in enumerate(row):
                tip = html.escape(f"{name}, {panel.columns[j]}: {value:.6g}", quote=True)
                colour, text = _colour(value, low, high, panel.signed), html.escape(_label(panel, i, j))
                cells.append(f'<td style="background:{colour}" title="{tip}">{text}</td>')
            parts.append(f"<tr><th>{html.escape(name)}</th>{''.join(cells)}</tr>")
        parts.append("</table>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _finite_or_nan(value: float) -> float:
    value = float(value)
    return value if math.isfinite(value) else math.nan


def _range(values: list[list[float]], signed: bool) -> tuple[float, float]:
    """The colour scale's ends: symmetric around 0 when signed, else from min(0, lowest) to the highest."""
    finite = [v for row in values for v in row if not math.isnan(v)] or [0.0]
    if signed:
        top = max(abs(v) for v in finite) or 1.0
        return -top, top
    low, high = min(0.0, *finite), max(finite)
    return low, high if high > low else low + 1.0


def _label(panel: Panel, i: int, j: int) -> str:
    if panel.labels is not None:
        return panel.labels[i][j]
    value = float(panel.values[i][j])
    return "" if math.isnan(value) else f"{value:.2f}"


def _colour(value: float, low: float, high: float, signed: bool) -> str:
    """The cell's background: white to red (above 0) or blue (below) when signed, else white to blue."""
    if math.isnan(value):
        return "#cccccc"
    if signed:
        share = min(abs(value) / high, 1.0)
        end = (178, 24, 43) if value > 0 else (33, 102, 172)
    else:
        share = min(max((value - low) / (high - low), 0.0), 1.0)
        end = (8, 81, 156)
    red, green, blue = (round(255 + (e - 255) * share) for e in end)
    return f"#{red:02x}{green:02x}{blue:02x}"
