"""The report of a free-form task: fidelity to the teacher instead of labels, accuracy and confusion.

Shares the system table, the latency plot and the table/HTML helpers with ``report.py``; what
differs is the payoff (how close the student answers to the teacher, per the prompted teacher and
on the surface), the side-by-side examples of the largest gaps, and two distributions as plots.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from raydistill.evaluate.report import (
    COLUMNS,
    SYSTEM_COLORS,
    SYSTEM_TITLES,
    Section,
    _ci,
    _fmt,
    _html_table,
    _img,
    _md_table,
    _num,
    _pyplot,
    _times,
    plot_latency,
    save_figure,
    summary_rows,
)

FREE_TITLE = "How close does the student answer to the teacher? (free-form task)"


def free_payoff(metrics: dict[str, dict[str, Any]], comparison: dict[str, Any], fidelity: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of a free-form distillation (keys shared with bench/results/freeform.json)."""
    student = fidelity.get("student", {})
    teacher_m, student_m = metrics.get("teacher", {}), metrics.get("student", {})
    return {
        "input_tokens_teacher_over_student": comparison["tokens"]["teacher_over_student"],
        "teacher_logprob_gap": student.get("teacher_logprob_gap"),
        "teacher_logprob_gap_ci95": student.get("teacher_logprob_gap_ci95"),
        "at_least_teacher": student.get("at_least_teacher"),
        "chrf_student_vs_teacher": student.get("chrf"),
        "fidelity_student_over_base": fidelity.get("fidelity_student_over_base"),
        "teacher_parse_rate": teacher_m.get("parse_rate"),
        "rps_student_over_teacher": _ratio(student_m.get("throughput_rps"), teacher_m.get("throughput_rps")),
    }


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def _gap(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} nats/token"


def _interval(interval: Sequence[float] | None, digits: int = 3) -> str:
    return "-" if interval is None else f"[{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"


def free_lines(metrics: dict[str, dict[str, Any]], fidelity: dict[str, Any], payoff: dict[str, Any]) -> list[str]:
    """The payoff in words, one line per number (terminal and report)."""
    systems = fidelity["systems"]
    lines = []
    for name in ("student", "base"):
        part = fidelity.get(name)
        if part is None:
            continue
        lines.append(
            f"{name}: the prompted teacher gives its answers {_gap(part['teacher_logprob_gap'])} less log-prob than its "
            f"own {_interval(part['teacher_logprob_gap_ci95'])} (95%, n={part['scored']}); as likely or more on "
            f"{_fmt(part['at_least_teacher'], pct=True)} {_ci(part['at_least_teacher_ci95'])} of queries; chrF vs the "
            f"teacher's answer {_fmt(part['chrf'], digits=1)}, exact {_fmt(part['exact_match'], pct=True)}, "
            f"length {_times(part['length_ratio'])} the teacher's")
    per_token = {s: v.get("per_token_prob") for s, v in systems.items()}
    lines.append("per-token probability under the prompted teacher: "
                 + ", ".join(f"{s} {_fmt(p, digits=3)}" for s, p in per_token.items()))
    if payoff.get("fidelity_student_over_base") is not None:
        lines.append(f"student over base (per-token probability ratio): {_times(payoff['fidelity_student_over_base'])}")
    ratio = payoff["input_tokens_teacher_over_student"]
    teacher_in = metrics.get("teacher", {}).get("mean_input_tokens")
    student_in = metrics.get("student", {}).get("mean_input_tokens")
    lines.append(f"input tokens per request: teacher {_num(teacher_in)} vs student {_num(student_in)} = "
                 f"{_times(ratio)} fewer")
    lines.append(f"requests/s, each system in its own pass: student/teacher = {_times(payoff['rps_student_over_teacher'])}")
    if fidelity.get("unscored"):
        lines.append(f"{fidelity['unscored']} answers could not be scored (see the log)")
    return lines


def free_summary_table(metrics: dict[str, dict[str, Any]], fidelity: dict[str, Any], payoff: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in summary_rows(metrics)]
    return "\n".join([*lines, "", FREE_TITLE, *(f"- {line}" for line in free_lines(metrics, fidelity, payoff))])


def free_sections(fidelity: dict[str, Any], payoff: dict[str, Any]) -> list[Section]:
    systems = fidelity["systems"]
    sections: list[Section] = [("Payoff (the numbers also kept by the benchmarks)", ["measure", "value"], [
        [key, _fmt(value) if not isinstance(value, list) else _interval(value)] for key, value in payoff.items()])]
    sections.append(("Mean log-prob per answer token under the prompted teacher (95% normal intervals)",
                     ["system", "log-prob/token", "95% interval", "per-token probability", "answers scored",
                      "output tokens"],
                     [[SYSTEM_TITLES.get(s, s), _fmt(v["teacher_logprob"]), _interval(v["teacher_logprob_ci95"]),
                       _fmt(v["per_token_prob"]), str(v["n"]), _fmt(v["mean_output_tokens"], digits=1)]
                      for s, v in systems.items()]))
    rows = []
    for name in ("student", "base"):
        part = fidelity.get(name)
        if part:
            rows.append([SYSTEM_TITLES.get(name, name), _fmt(part["teacher_logprob_gap"]),
                         _interval(part["teacher_logprob_gap_ci95"]), _fmt(part["at_least_teacher"], pct=True),
                         _fmt(part["chrf"], digits=1), _fmt(part["exact_match"], pct=True),
                         _fmt(part["normalized_match"], pct=True), _times(part["length_ratio"])])
    sections.append(("Against the teacher's answer to the same query", ["system", "log-prob gap", "95% interval",
                     "as likely or more", "chrF", "exact", "normalized", "length ratio"], rows))
    student = fidelity.get("student")
    if student:
        sections.append((f"Largest gaps (the {len(student['largest_gaps'])} answers the teacher finds least like its own)",
                         ["query", "teacher answer", "student answer", "log-prob teacher / student"],
                         [[e["query"] or "", e["teacher_answer"] or "", e["answer"] or "",
                           f"{e['teacher_logprob']:.2f} / {e['logprob']:.2f}"] for e in student["largest_gaps"]]))
    return sections


def plot_distributions(fidelity: dict[str, Any], path: Path) -> Path:
    """Per-query log-prob gap and chrF against the teacher, student (and base) side by side."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in ("base", "student"):
        part = fidelity.get(name)
        if not part:
            continue
        for ax, key in zip(axes, ("gaps", "chrfs")):
            values = np.asarray(part[key], dtype=float)
            if len(values):
                ax.hist(values, bins=30, alpha=0.6, label=SYSTEM_TITLES.get(name, name), color=SYSTEM_COLORS.get(name))
    axes[0].set_xlabel("teacher's log-prob/token of its answer minus of this one (0: as likely)")
    axes[0].set_title("Gap under the prompted teacher, per query")
    axes[1].set_xlabel("chrF against the teacher's answer (100: identical)")
    axes[1].set_title("Surface similarity, per query")
    for ax in axes:
        ax.set_ylabel("queries")
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def write_free_report(folder: Path, metrics: dict[str, dict[str, Any]], fidelity: dict[str, Any],
                      payoff: dict[str, Any], latencies: dict[str, list[float]],
                      stage_times: dict[str, float] | None) -> Path:
    """report.md, a self-contained report.html and the PNGs of a free-form task."""
    pngs = {"fidelity": plot_distributions(fidelity, folder / "fidelity.png"),
            "latency": plot_latency(latencies, folder / "latency.png")}
    sections = free_sections(fidelity, payoff)
    if stage_times:
        sections.append(("Wall time per stage", ["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in stage_times.items()]))
    lines = free_lines(metrics, fidelity, payoff)
    md = ["# raydistill evaluation", "", *_md_table(COLUMNS, summary_rows(metrics)), "", f"## {FREE_TITLE}", "",
          *(f"- {line}" for line in lines), ""]
    for title, header, rows in sections:
        md += [f"## {title}", "", *_md_table(header, rows), ""]
    md += ["## Plots", ""] + [f"![{alt}]({p.name})" for alt, p in pngs.items()] + [""]
    (folder / "report.md").write_text("\n".join(md), encoding="utf-8")
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;"
             "vertical-align:top}th{background:#f3f3f3}img{max-width:100%}")
    parts = ["<!doctype html><html lang=en><head><meta charset=utf-8><title>raydistill evaluation</title>"
             f"<style>{style}</style></head><body><h1>raydistill evaluation</h1>",
             _html_table(COLUMNS, summary_rows(metrics)), f"<h2>{html.escape(FREE_TITLE)}</h2><ul>",
             *(f"<li>{html.escape(line)}</li>" for line in lines), "</ul>"]
    for title, header, rows in sections:
        parts += [f"<h2>{html.escape(title)}</h2>", _html_table(header, rows)]
    parts += ["<h2>Plots</h2>"] + [f"<h3>{html.escape(alt)}</h3>{_img(p, alt)}" for alt, p in pngs.items()]
    parts.append("</body></html>")
    path = folder / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
