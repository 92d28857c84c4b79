"""The evaluation JSON as Markdown: the paper's Table 1 (one column per set, plus the reader)
and Table 2 (the reader's fourfold table), then the figures and what was excluded.

Percentages are rounded half up to whole numbers as the paper prints them, so 66/70 reads 94%,
67/70 reads 96% and 133/140 reads 95%.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["markdown_report", "percent"]


def percent(value: float | None) -> str:
    """A rate as a whole percentage, rounded half up (not to even); '-' when undefined."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return str(math.floor(value * 100.0 + 0.5 + 1e-9))


def _auc_cell(auc: Mapping[str, Any] | None) -> str:
    if auc is None:
        return "-"
    if auc["low"] is None or auc["high"] is None:
        return f"{auc['auc']:.3f} (n/a)"
    return f"{auc['auc']:.3f} ({auc['low']:.3f}-{auc['high']:.3f})"


def _table1(document: Mapping[str, Any]) -> list[str]:
    sets: Mapping[str, Mapping[str, Any]] = document["sets"]
    reader: Mapping[str, Any] | None = document.get("reader")
    header = ["Parameter", *(f"{name} (n={s['studies']})" for name, s in sets.items())]
    if reader is not None:
        header.append(f"Reader (n={reader['tp'] + reader['fn'] + reader['tn'] + reader['fp']})")
    rows = [["AUC (95% CI)", *(_auc_cell(s["auc"]) for s in sets.values())]]
    for label, key in (
        ("Accuracy (%)", "accuracy"),
        ("Sensitivity (%)", "sensitivity"),
        ("Specificity (%)", "specificity"),
        ("F1 score (%)", "f1"),
    ):
        rows.append([label, *(percent(s["at_threshold"][key]) for s in sets.values())])
    pointing = ["Pointing game (%)"]
    for s in sets.values():
        game = s["pointing_game"]
        pointing.append(
            "-"
            if game["rate"] is None
            else f"{percent(game['rate'])} ({game['hits']}/{game['slices']})"
        )
    rows.append(pointing)
    rows.append(
        ["COVID-19 / healthy", *(f"{s['positives']} / {s['negatives']}" for s in sets.values())]
    )
    if reader is not None:
        values = [
            "-",
            percent(reader["accuracy"]),
            percent(reader["sensitivity"]),
            percent(reader["specificity"]),
            percent(reader["f1"]),
            "-",
            f"{reader['tp'] + reader['fn']} / {reader['tn'] + reader['fp']}",
        ]
        for row, value in zip(rows, values, strict=True):
            row.append(value)
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _table2(reader: Mapping[str, Any]) -> list[str]:
    tp, fn, tn, fp = reader["tp"], reader["fn"], reader["tn"], reader["fp"]
    return [
        "| | COVID-19 patients | Healthy persons |",
        "| --- | --- | --- |",
        f"| Reader positive | {tp} | {fp} |",
        f"| Reader negative | {fn} | {tn} |",
        "",
        f"Sensitivity = {tp}/{tp + fn} ({percent(reader['sensitivity'])}%); "
        f"specificity = {tn}/{tn + fp} ({percent(reader['specificity'])}%); "
        f"accuracy = ({tp}+{tn})/{tp + fn + tn + fp} ({percent(reader['accuracy'])}%).",
    ]


def markdown_report(document: Mapping[str, Any]) -> str:
    """Render the evaluation JSON as Markdown."""
    model = document["model"]
    ci = document["ci"]
    method = (
        "DeLong (AUC +/- z*SE)"
        if ci["method"] == "delong"
        else f"stratified percentile bootstrap, {ci['bootstrap_replicates']} replicates"
    )
    lines = [
        f"# Evaluation of {model['name']} {model['version']}",
        "",
        f"- Checkpoint: `{document['checkpoint']}` (SHA-256 `{model['sha256']}`)",
        f"- Trained on: {model['trained_on']}",
        f"- Labels: `{document['labels']}`",
        f"- Subject level: lung slices in table order, {model['trim_fraction'] * 100:g}% dropped "
        f"at each end, mean of the rest; positive when >= {document['threshold']:g}",
        f"- AUC confidence interval: {ci['confidence'] * 100:g}%, {method}",
        f"- Pointing game: CAM peak within {document['pointing_tolerance_mm']:g} mm of the lesion "
        "mask, over the lesion slices of COVID-19 studies",
        "",
        f"## Table 1: performance at threshold {document['threshold']:g}",
        "",
        *_table1(document),
    ]
    if document.get("reader") is not None:
        lines += ["", "## Table 2: fourfold table of the reader", "", *_table2(document["reader"])]
    lines += ["", "## Figures", ""]
    for name, s in document["sets"].items():
        for kind, file in s["figures"].items():
            lines.append(f"![{kind}, {name} set]({file})")
    for name, s in document["sets"].items():
        if s["excluded"]:
            lines += ["", f"## Excluded from {name}", ""]
            lines += [f"- {key}: {reason}" for key, reason in s["excluded"].items()]
    return "\n".join(lines) + "\n"
