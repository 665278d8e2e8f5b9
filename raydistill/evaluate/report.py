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
AGREEMENT_TITLE = "Student–teacher agreement (same parsed label)"
PAYOFF_TITLE = "Can the student replace the teacher?"


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


def summary_table(metrics: dict[str, dict[str, Any]], agreement: float | None,
                  comparison: dict[str, Any] | None = None, payoff: dict[str, Any] | None = None) -> str:
    """A markdown table: one line per system; then the payoff block (or just the agreement line)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in summary_rows(metrics)]
    if comparison is not None and payoff is not None and {"teacher", "student"} <= metrics.keys():
        title, bullets = payoff_lines(metrics, comparison, payoff)
        lines += ["", title, *(f"- {b}" for b in bullets)]
    else:
        lines += ["", f"{AGREEMENT_TITLE}: {_fmt(agreement, pct=True)}"]
    return "\n".join(lines)


def payoff_lines(metrics: dict[str, dict[str, Any]], comparison: dict[str, Any],
                 payoff: dict[str, Any]) -> tuple[str, list[str]]:
    """The payoff block in words: a title and one line per number (for the terminal and the report)."""
    teacher, student, tokens = metrics["teacher"], metrics["student"], comparison["tokens"]
    n_t, n_s = teacher.get("scored"), student.get("scored")
    acc_n = f"n={n_t} each" if n_t == n_s else f"n={n_t} and {n_s}"
    ratio, saved = tokens["teacher_over_student"], tokens["saved_per_million_requests"]
    fewer = "" if ratio is None else f" = {_times(ratio)} fewer" if ratio >= 1 else f" = {_times(1 / ratio)} more"
    per_million = "" if saved is None else (f"; {_num(saved)} tokens saved per million requests" if saved >= 0
                                            else f"; {_num(-saved)} more tokens per million requests")
    return PAYOFF_TITLE, [
        f"{AGREEMENT_TITLE}: {_fmt(comparison['agreement'], pct=True)} {_ci(comparison['agreement_ci95'])} "
        f"(95% Wilson, n={comparison['n']})",
        f"accuracy: teacher {_fmt(teacher['accuracy'], pct=True)} {_ci(teacher.get('accuracy_ci95'))} vs student "
        f"{_fmt(student['accuracy'], pct=True)} {_ci(student.get('accuracy_ci95'))} (95% Wilson, {acc_n}); "
        f"student/teacher = {_times(payoff['accuracy_student_over_teacher'])}",
        f"input tokens per request: teacher {_num(tokens['teacher_input_tokens'])} vs student "
        f"{_num(tokens['student_input_tokens'])}{fewer}{per_million}",
        f"teacher parse rate: {_fmt(payoff['teacher_parse_rate'], pct=True)} (an unparsed teacher answer never agrees)",
        f"requests/s, each system in its own pass: teacher {_fmt(teacher['throughput_rps'], digits=2)} vs student "
        f"{_fmt(student['throughput_rps'], digits=2)}; student/teacher = {_times(payoff['rps_student_over_teacher'])}",
    ]


def _num(value: float | None) -> str:
    """Counts for people: 1,412 / 92.5 / 24.0 M / 1.32 B."""
    if value is None:
        return "-"
    size = abs(value)
    if size >= 1e9:
        return f"{value / 1e9:.2f} B"
    if size >= 1e6:
        return f"{value / 1e6:.2f} M"
    return f"{value:,.0f}" if size >= 100 else f"{value:.1f}"


def _times(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}x" if value >= 10 else f"{value:.2f}x"


def _ci(interval: Sequence[float] | None) -> str:
    return "-" if interval is None else f"[{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def _answer(text: str | None, label: str | None) -> str:
    return f"{text or ''} ({label or 'unparsed'})"


Section = tuple[str, list[str], list[list[str]]]  # title, table header, table rows


def comparison_sections(metrics: dict[str, dict[str, Any]], comparison: dict[str, Any],
                        payoff: dict[str, Any]) -> list[Section]:
    """The teacher-vs-student tables of the report, shared by report.md and report.html."""
    sections: list[Section] = [("Payoff (the numbers also kept by the benchmarks)", ["measure", "value"], [
        ["input_tokens_teacher_over_student", _times(payoff["input_tokens_teacher_over_student"])],
        ["accuracy_student_over_teacher", _times(payoff["accuracy_student_over_teacher"])],
        ["agreement", _fmt(payoff["agreement"], pct=True)],
        ["agreement_ci95", _ci(payoff["agreement_ci95"])],
        ["teacher_parse_rate", _fmt(payoff["teacher_parse_rate"], pct=True)],
        ["rps_student_over_teacher", _times(payoff["rps_student_over_teacher"])],
    ])]
    rows = [[f"accuracy, {SYSTEM_TITLES[s]}", _fmt(metrics[s]["accuracy"], pct=True), _ci(metrics[s].get("accuracy_ci95")),
             str(metrics[s].get("scored", "-"))] for s in SYSTEM_TITLES if s in metrics]
    rows.append(["student–teacher agreement", _fmt(comparison["agreement"], pct=True),
                 _ci(comparison["agreement_ci95"]), str(comparison["n"])])
    sections.append(("Accuracy and agreement (95% Wilson score intervals)", ["measure", "value", "95% interval", "n"],
                     rows))
    labels = comparison["matrix_labels"]
    sections.append(("Agreement matrix (rows: the teacher's label, columns: the student's; queries both answered)",
                     ["teacher \\ student", *labels],
                     [[label, *(str(n) for n in row)] for label, row in zip(labels, comparison["matrix"])]))
    sections.append(("Agreement per teacher label (share of the teacher's answers the student repeated)",
                     ["teacher label", "queries", "student agrees", "95% interval"],
                     [[label, str(v["n"]), _fmt(v["agreement"], pct=True), _ci(v["ci95"])]
                      for label, v in comparison["by_teacher_label"].items() if v["n"]]))
    tokens = comparison["tokens"]
    sections.append(("Token savings (mean input tokens per request)", ["measure", "value"], [
        ["teacher (with prompt)", _num(tokens["teacher_input_tokens"])],
        ["student (no prompt)", _num(tokens["student_input_tokens"])],
        ["teacher / student", _times(tokens["teacher_over_student"])],
        ["saved per request", _num(tokens["saved_per_request"])],
        ["saved per million requests", _num(tokens["saved_per_million_requests"])],
    ]))
    examples = comparison["disagreements"]
    sections.append((f"Disagreements (showing {len(examples)} of {comparison['n'] - comparison['agreed']}; "
                     f"those the teacher got right first)", ["query", "gold", "teacher answer", "student answer"],
                     [[e["query"] or "", e["gold"] or "-", _answer(e["teacher_answer"], e["teacher_label"]),
                       _answer(e["student_answer"], e["student_label"])] for e in examples]))
    return sections


def _md_cell(text: str) -> str:
    """A cell of a markdown table: a pipe would end the cell and a newline the row."""
    text = text.replace("\\", "\\\\").replace("|", "\\|")
    return text.replace("\r\n", " ⏎ ").replace("\n", " ⏎ ").replace("\r", " ⏎ ")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out, write as PNG and free a report figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


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
    return save_figure(fig, path)


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
    return save_figure(fig, path)


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
    return save_figure(fig, path)


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
                 by_label: dict[str, dict[str, float | None]], latencies: dict[str, list[float]],
                 comparison: dict[str, Any] | None = None, payoff: dict[str, Any] | None = None,
                 fidelity: dict[str, Any] | None = None) -> Path:
    """Write report.md, report.html (no external resources: plots inlined) and the PNGs.

    With ``comparison`` and ``payoff`` (and both teacher and student evaluated) the report also
    answers whether the student can replace the teacher, with intervals, matrix and examples. A
    free-form task's (``fidelity`` given) is ``free_report.write_free_report``: no labels to count.
    """
    if fidelity is not None:
        from raydistill.evaluate.free_report import write_free_report

        return write_free_report(folder, metrics, fidelity, payoff or {}, latencies, stage_times)
    pngs = {
        "confusion": plot_confusions(matrices, labels, folder / "confusion.png"),
        "accuracy by label": plot_accuracy_by_label(by_label, labels, folder / "accuracy_by_label.png"),
        "latency": plot_latency(latencies, folder / "latency.png"),
    }
    sections: list[Section] = []
    block: tuple[str, list[str]] | None = None  # the payoff block: title, bullets
    if comparison is not None and payoff is not None and {"teacher", "student"} <= metrics.keys():
        sections = comparison_sections(metrics, comparison, payoff)
        block = payoff_lines(metrics, comparison, payoff)
    md = ["# raydistill evaluation", "", summary_table(metrics, agreement, comparison, payoff), ""]
    for title, header, rows in sections:
        md += [f"## {title}", "", *_md_table(header, rows), ""]
    if stage_times:
        md += ["## Wall time per stage", "", "| stage | seconds |", "|---|---|"]
        md += [f"| {k} | {v:.1f} |" for k, v in stage_times.items()] + [""]
    md += ["## Plots", ""] + [f"![{alt}]({p.name})" for alt, p in pngs.items()] + [""]
    md += ["## Confusion matrices (rows: gold, columns: predicted; `?` = unparsed)", ""]
    for system, matrix in matrices.items():
        md += [f"### {SYSTEM_TITLES.get(system, system)}", "", *_confusion_md(matrix, labels), ""]
    (folder / "report.md").write_text("\n".join(md), encoding="utf-8")

    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
             "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}")
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>raydistill evaluation</title>"
             f"<style>{style}</style></head><body><h1>raydistill evaluation</h1>",
             _html_table(COLUMNS, summary_rows(metrics))]
    if block is not None:
        title, bullets = block
        parts.append(f"<h2>{html.escape(title)}</h2><ul>" + "".join(f"<li>{html.escape(b)}</li>" for b in bullets)
                     + "</ul>")
        for title, header, rows in sections:
            parts += [f"<h2>{html.escape(title)}</h2>", _html_table(header, rows)]
    else:
        parts.append(f"<p>{AGREEMENT_TITLE}: <b>{_fmt(agreement, pct=True)}</b></p>")
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


TASK_COLUMNS = ("task", "queries", "teacher accuracy", "student accuracy", "agreement [95% CI]", "teacher parse rate",
                "student parse rate", "input tokens teacher → student")


def task_rows(per_task: dict[str, dict[str, Any]]) -> list[list[str]]:
    """One row per task of a multi-task run: its accuracy, agreement and tokens, teacher vs student."""
    rows = []
    for key, part in per_task.items():
        teacher, student = part["systems"].get("teacher", {}), part["systems"].get("student", {})
        comparison = part["student_vs_teacher"]
        tokens = f"{_fmt(teacher.get('mean_input_tokens'), digits=0)} → {_fmt(student.get('mean_input_tokens'), digits=0)}"
        ratio = part["payoff"].get("input_tokens_teacher_over_student")
        rows.append([key, str(max((m["requests"] for m in part["systems"].values()), default=0)),
                     _fmt(teacher.get("accuracy"), pct=True), _fmt(student.get("accuracy"), pct=True),
                     f"{_fmt(comparison['agreement'], pct=True)} {_ci(comparison['agreement_ci95'])}",
                     _fmt(teacher.get("parse_rate"), pct=True), _fmt(student.get("parse_rate"), pct=True),
                     f"{tokens} ({_times(ratio)})"])
    return rows


def task_table(per_task: dict[str, dict[str, Any]]) -> str:
    """The per-task table as markdown (the terminal prints it after the overall table)."""
    return "\n".join(["Per task:", *_md_table(TASK_COLUMNS, task_rows(per_task))])


def write_task_index(folder: Path, summary: dict[str, Any], stage_times: dict[str, float] | None) -> Path:
    """A multi-task run's top report: the overall table, the per-task table and links to each
    task's own full report (``tasks/<tag>/report.html``)."""
    tasks = summary["tasks"]
    md = ["# raydistill evaluation (several tasks)", "",
          summary_table(summary["systems"], summary["student_teacher_agreement"], summary["student_vs_teacher"],
                        summary["payoff"]), "", "## Per task", "", *_md_table(TASK_COLUMNS, task_rows(tasks)), "",
          *(f"- [{key}](tasks/{key}/report.md)" for key in tasks), ""]
    if stage_times:
        md += ["## Wall time per stage", "", "| stage | seconds |", "|---|---|"]
        md += [f"| {k} | {v:.1f} |" for k, v in stage_times.items()] + [""]
    (folder / "report.md").write_text("\n".join(md), encoding="utf-8")
    links = "".join(f'<li><a href="tasks/{html.escape(k)}/report.html">{html.escape(k)}</a></li>' for k in tasks)
    parts = ["<!doctype html><html lang=en><head><meta charset=utf-8><title>raydistill evaluation</title></head><body>",
             "<h1>raydistill evaluation (several tasks)</h1>", _html_table(COLUMNS, summary_rows(summary["systems"])),
             "<h2>Per task</h2>", _html_table(TASK_COLUMNS, task_rows(tasks)), f"<ul>{links}</ul></body></html>"]
    path = folder / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
