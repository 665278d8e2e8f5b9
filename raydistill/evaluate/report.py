"""The evaluation report: report.md, a self-contained report.html, PNG plots, the summary table."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

SYSTEM_TITLES = {
    "teacher": "teacher (with prompt)",
    "base": "base (no prompt)",
    "student": "student (no prompt)",
}
SYSTEM_COLORS = {"teacher": "#4c72b0", "base": "#8c8c8c", "student": "#dd8452"}
COLUMNS = ("system", "accuracy", "parse rate", "input tokens/request", "latency p50 (s)", "latency p95 (s)",
           "latency p99 (s)", "requests/s", "errors")


def _fmt(value: Any, pct: bool = False, digits: int = 3) -> str:
    if value is None:
        return "-"
    if pct:
        return f"{100 * value:.1f}%"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def summary_rows(metrics: dict[str, dict[str, Any]]) -> list[list[str]]:
    rows = []
    for system in ("teacher", "base", "student"):
        if system not in metrics:
            continue
        m = metrics[system]
        rows.append([SYSTEM_TITLES[system], _fmt(m["accuracy"], pct=True), _fmt(m["parse_rate"], pct=True),
                     _fmt(m["mean_input_tokens"], digits=1), _fmt(m["latency_p50_s"]), _fmt(m["latency_p95_s"]),
                     _fmt(m["latency_p99_s"]), _fmt(m["throughput_rps"], digits=2), str(m["errors"])])
    return rows


def summary_table(metrics: dict[str, dict[str, Any]], agreement: float | None) -> str:
    """A markdown table: one line per system, then the agreement line."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in summary_rows(metrics)]
    lines += ["", f"Student–teacher agreement (same parsed label): {_fmt(agreement, pct=True)}"]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusions(matrices: dict[str, np.ndarray], labels: Sequence[str], path: Path) -> Path:
    plt = _pyplot()
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


def plot_accuracy_by_label(by_label: dict[str, dict[str, float | None]], labels: Sequence[str], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(labels) * max(1, len(by_label))), 4))
    width = 0.8 / max(1, len(by_label))
    x = np.arange(len(labels))
    for i, (system, accs) in enumerate(by_label.items()):
        values = [100 * (accs.get(label) or 0.0) for label in labels]
        ax.bar(x + i * width - 0.4 + width / 2, values, width, label=SYSTEM_TITLES.get(system, system),
               color=SYSTEM_COLORS.get(system))
    ax.set_xticks(x, labels)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Accuracy by gold label")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_latency(latencies: dict[str, list[float]], path: Path) -> Path:
    """Empirical CDF of request latency per system (a CDF keeps tails readable with few points)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for system, values in latencies.items():
        if not values:
            continue
        xs = np.sort(np.asarray(values, dtype=float))
        ax.step(xs, np.arange(1, len(xs) + 1) / len(xs), where="post", label=SYSTEM_TITLES.get(system, system),
                color=SYSTEM_COLORS.get(system))
    ax.set_xlabel("latency (s)")
    ax.set_ylabel("share of requests")
    ax.set_title("Request latency (CDF)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _confusion_md(matrix: np.ndarray, labels: Sequence[str]) -> list[str]:
    header = "| gold \\ pred | " + " | ".join([*labels, "?"]) + " |"
    rows = [f"| {g} | " + " | ".join(str(int(n)) for n in row) + " |" for g, row in zip(labels, matrix)]
    return [header, "|" + "---|" * (len(labels) + 2), *rows]


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def write_report(folder: Path, metrics: dict[str, dict[str, Any]], agreement: float | None,
                 matrices: dict[str, np.ndarray], labels: Sequence[str], stage_times: dict[str, float] | None,
                 by_label: dict[str, dict[str, float | None]], latencies: dict[str, list[float]]) -> Path:
    """Write report.md, report.html (no external resources: plots inlined) and the PNGs."""
    pngs = {
        "confusion": plot_confusions(matrices, labels, folder / "confusion.png"),
        "accuracy by label": plot_accuracy_by_label(by_label, labels, folder / "accuracy_by_label.png"),
        "latency": plot_latency(latencies, folder / "latency.png"),
    }
    md = ["# raydistill evaluation", "", summary_table(metrics, agreement), ""]
    if stage_times:
        md += ["## Wall time per stage", "", "| stage | seconds |", "|---|---|"]
        md += [f"| {k} | {v:.1f} |" for k, v in stage_times.items()] + [""]
    md += ["## Plots", ""] + [f"![{alt}]({p.name})" for alt, p in pngs.items()] + [""]
    md += ["## Confusion matrices (rows: gold, columns: predicted; `?` = unparsed)", ""]
    for system, matrix in matrices.items():
        md += [f"### {SYSTEM_TITLES.get(system, system)}", "", *_confusion_md(matrix, labels), ""]
    (folder / "report.md").write_text("\n".join(md))

    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
             "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}")
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>raydistill evaluation</title>"
             f"<style>{style}</style></head><body><h1>raydistill evaluation</h1>",
             _html_table(COLUMNS, summary_rows(metrics)),
             f"<p>Student–teacher agreement (same parsed label): <b>{_fmt(agreement, pct=True)}</b></p>"]
    if stage_times:
        parts += ["<h2>Wall time per stage</h2>", _html_table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in stage_times.items()])]
    parts += ["<h2>Plots</h2>"] + [f"<h3>{html.escape(alt)}</h3>{_img(p, alt)}" for alt, p in pngs.items()]
    parts.append("<h2>Confusion matrices</h2><p>Rows: gold; columns: predicted; ? = unparsed.</p>")
    for system, matrix in matrices.items():
        rows = [[g, *(str(int(n)) for n in row)] for g, row in zip(labels, matrix)]
        parts += [f"<h3>{html.escape(SYSTEM_TITLES.get(system, system))}</h3>", _html_table(["gold \\ pred", *labels, "?"], rows)]
    parts.append("</body></html>")
    path = folder / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
