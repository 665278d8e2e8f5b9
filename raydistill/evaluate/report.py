"""The evaluation report: report.md, confusion-matrix PNGs, and the summary table."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

SYSTEM_TITLES = {
    "teacher": "teacher (with prompt)",
    "base": "base (no prompt)",
    "student": "student (no prompt)",
}


def _fmt(value: Any, pct: bool = False, digits: int = 3) -> str:
    if value is None:
        return "-"
    if pct:
        return f"{100 * value:.1f}%"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def summary_table(metrics: dict[str, dict[str, Any]], agreement: float | None) -> str:
    """A markdown table: one line per system."""
    lines = [
        "| system | accuracy | parse rate | input tokens/request | latency p50 (s) | latency p99 (s) | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for system in ("teacher", "base", "student"):
        if system not in metrics:
            continue
        m = metrics[system]
        lines.append(
            f"| {SYSTEM_TITLES[system]} | {_fmt(m['accuracy'], pct=True)} | {_fmt(m['parse_rate'], pct=True)} | "
            f"{_fmt(m['mean_input_tokens'], digits=1)} | {_fmt(m['latency_p50_s'])} | {_fmt(m['latency_p99_s'])} | "
            f"{m['errors']} |"
        )
    lines.append("")
    lines.append(f"Student–teacher agreement (same parsed label): {_fmt(agreement, pct=True)}")
    return "\n".join(lines)


def plot_confusions(matrices: dict[str, np.ndarray], labels: Sequence[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(matrices), figsize=(5.2 * len(matrices), 5), squeeze=False)
    cols = [*labels, "?"]
    for ax, (system, matrix) in zip(axes[0], matrices.items()):
        ax.imshow(matrix, cmap="Blues")
        ax.set_title(SYSTEM_TITLES.get(system, system))
        ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("gold")
        for (i, j), n in np.ndenumerate(matrix):
            if n:
                ax.text(j, i, str(n), ha="center", va="center", fontsize=6,
                        color="white" if n > matrix.max() / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(folder: Path, metrics: dict[str, dict[str, Any]], agreement: float | None,
                 matrices: dict[str, np.ndarray], labels: Sequence[str], stage_times: dict[str, float] | None) -> Path:
    png = plot_confusions(matrices, labels, folder / "confusion.png")
    parts = ["# raydistill evaluation", "", summary_table(metrics, agreement), ""]
    if stage_times:
        parts += ["## Wall time per stage", "", "| stage | seconds |", "|---|---|"]
        parts += [f"| {k} | {v:.1f} |" for k, v in stage_times.items()]
        parts.append("")
    parts += ["## Confusion matrices (rows: gold, columns: predicted; `?` = unparsed)", "", f"![confusion]({png.name})", ""]
    for system, matrix in matrices.items():
        header = "| gold \\ pred | " + " | ".join([*labels, "?"]) + " |"
        parts += [f"### {SYSTEM_TITLES.get(system, system)}", "", header, "|" + "---|" * (len(labels) + 2)]
        parts += [f"| {g} | " + " | ".join(str(int(n)) for n in row) + " |" for g, row in zip(labels, matrix)]
        parts.append("")
    path = folder / "report.md"
    path.write_text("\n".join(parts))
    return path
