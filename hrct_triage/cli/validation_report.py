"""The local validation document as Markdown, laid out as the paper's Table 1 (AUC with its
95% CI, accuracy, sensitivity, specificity, F1 at the threshold) plus the site threshold."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

_SOURCES = {
    "option": "given with --threshold",
    "recorded": "the one every study was decided with",
    "configured": "HRCT_THRESHOLD or the paper's (the studies recorded none, or several)",
}


def _rate(value: float | None, interval: Sequence[float] | None = None) -> str:
    if value is None:
        return "-"
    text = f"{value * 100:.1f}"
    if interval is not None:
        text += f" ({interval[0] * 100:.1f}-{interval[1] * 100:.1f})"
    return text


def _auc(auc: Mapping[str, Any] | None) -> str:
    if auc is None:
        return "- (needs COVID-19 and non-COVID studies)"
    if auc["low"] is None or auc["high"] is None:
        return f"{auc['auc']:.3f} (n/a)"
    return f"{auc['auc']:.3f} ({auc['low']:.3f}-{auc['high']:.3f})"


def validation_markdown(document: Mapping[str, Any], pngs: Sequence[str]) -> str:
    """Render ``document`` (``db.validation.validation_figures`` plus ``filters`` and
    ``generated_at``) with links to ``pngs`` beside it."""
    studies = document["studies"]
    filters = document["filters"]
    models = ", ".join(studies["model_versions"]) or "-"
    modes = ", ".join(f"{mode} {count}" for mode, count in sorted(studies["modes"].items()))
    lines = [
        "# Local validation",
        "",
        f"- Generated: {document['generated_at']}",
        "- Filters: "
        + (", ".join(f"{k} {v}" for k, v in filters.items() if v is not None) or "none"),
        f"- Analysed studies: {studies['analysed']}; labelled {studies['labelled']} "
        f"({modes or 'none'}); without a label {studies['unlabelled']}; labelled unknown "
        f"(left out) {studies['unknown_excluded']}",
        f"- Reference: covid positive, other and normal negative "
        f"({document['positives']} / {document['negatives']})",
        f"- Threshold {document['threshold']:g}: {_SOURCES[document['threshold_source']]}; "
        "positive when the probability is at or above it",
        "",
        f"## Table 1: performance at threshold {document['threshold']:g}",
        "",
    ]
    table = document["table"] or {}
    column = f"{models} (n={studies['labelled']})"
    rows = [
        ("AUC (95% CI, DeLong)", _auc(document["auc"])),
        ("Accuracy (%)", _rate(table.get("accuracy"), table.get("accuracy_ci"))),
        (
            "Sensitivity (%)",
            _rate(table.get("sensitivity"), table.get("sensitivity_ci")),
        ),
        (
            "Specificity (%)",
            _rate(table.get("specificity"), table.get("specificity_ci")),
        ),
        ("F1 score (%)", _rate(table.get("f1"))),
        ("COVID-19 / not", f"{document['positives']} / {document['negatives']}"),
    ]
    lines += ["| Parameter | " + column + " |", "| --- | --- |"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    lines += ["", "Rates with their Wilson 95% intervals.", ""]
    if table:
        lines += [
            f"Fourfold table: TP {table['tp']}, FN {table['fn']}, TN {table['tn']}, "
            f"FP {table['fp']}.",
            "",
        ]
    lines += [f"## Site threshold for sensitivity >= {document['target_sensitivity']:g}", ""]
    recommendation = document["recommendation"]
    if recommendation is None:
        lines += [f"**Not recommended:** {document['recommendation_refused']}.", ""]
    else:
        r = recommendation
        lines += [
            f"Recommended threshold **{r['threshold']:.4f}**: the highest at which the "
            f"sensitivity on these studies reaches the target (95% bootstrap interval "
            f"{r['threshold_ci'][0]:.4f} to {r['threshold_ci'][1]:.4f}, from "
            f"{r['positives']} COVID-19 and {r['negatives']} non-COVID studies).",
            "",
            f"- Sensitivity {_rate(r['sensitivity'], r['sensitivity_ci'])} % "
            f"({r['tp']}/{r['positives']} COVID-19 studies)",
            f"- Specificity {_rate(r['specificity'], r['specificity_ci'])} % "
            f"({r['tn']}/{r['negatives']} non-COVID studies)",
            "- The lower end of the sensitivity's 95% interval "
            + ("reaches" if r["target_within_ci"] else "**does not reach**")
            + " the target.",
            "",
        ]
    if pngs:
        lines += ["## Figures", ""]
        lines += [f"![{name.removesuffix('.png')}]({name})" for name in pngs]
    return "\n".join(lines) + "\n"
