"""The domain guard without the network: the reference and its score, the reference file's
checks, the labels in the SR, the SC legend and the worklist, and the priority of an
out-of-domain positive under both settings of ``HRCT_TRUST_OUT_OF_DOMAIN``."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset

from hrct_triage.common.settings import get_settings
from hrct_triage.db.priority import band_of, priority_for
from hrct_triage.db.queries import result_text
from hrct_triage.worker.method.domain import (
    INPUT_KEYS,
    build_reference,
    load_reference,
    reference_path,
)
from hrct_triage.worker.outputs.sc import _legend_strip, build_heatmap_scs
from hrct_triage.worker.outputs.sr import NO, WITHIN_VALIDATED_DOMAIN, YES, build_sr
from hrct_triage.worklist_table import render_worklist
from tests.helpers.dicom_peers import dciodvfy_errors
from tests.helpers.fake_study import WHEN, by_uid, ct_series, make_analysis, make_model

SHA = "cd" * 32


def _stats(rng: np.random.Generator) -> dict[str, float]:
    centre = {
        "lung_hu_p10": -900.0,
        "lung_hu_p50": -840.0,
        "lung_hu_p90": -700.0,
        "noise_hu": 40.0,
        "lung_fraction": 0.4,
        "lung_slice_share": 0.8,
        "lung_extent_mm": 240.0,
    }
    return {k: v + rng.normal(0.0, max(abs(v) * 0.03, 0.01)) for k, v in centre.items()}


def _reference_data(n: int = 30) -> tuple[list[list[float]], list[dict[str, float]]]:
    rng = np.random.default_rng(5)
    basis = rng.normal(size=(4, 64))
    features = (rng.normal(size=(n, 4)) @ basis + 5.0).tolist()
    return features, [_stats(rng) for _ in range(n)]


def _reference_file(tmp_path: Path, sha256: str = SHA) -> Path:
    features, stats = _reference_data()
    reference = build_reference(
        sha256,
        features,
        stats,
        probabilities=[0.5] * len(features),
        names=[f"s{i}" for i in range(len(features))],
        components=3,
    )
    checkpoint = tmp_path / "weights.safetensors"
    reference_path(checkpoint).write_text(json.dumps(reference.to_json()))
    return checkpoint


def test_reference_scores_its_own_kind_inside_and_strangers_outside(tmp_path: Path) -> None:
    # given a reference of 30 studies written beside a checkpoint, and read back
    checkpoint = _reference_file(tmp_path)
    assert reference_path(checkpoint).name == "weights.domain.json"
    reference = load_reference(checkpoint, SHA)
    assert reference is not None
    # then its studies carry statistics, leave-one-out scores and probabilities, most inside
    scores = [s["domain_score"] for s in reference.studies]
    assert set(reference.studies[0]["input_stats"]) == set(INPUT_KEYS)
    assert sum(score <= 1.0 for score in scores) >= 28
    # and a new study drawn like them scores inside
    features, _ = _reference_data()
    typical = np.mean(features, axis=0)
    stats = _stats(np.random.default_rng(99))
    inside = reference.score(typical.tolist(), stats)
    assert inside is not None and inside <= 1.0
    # and a study with other features, or twice the noise, or a third of the lung, is outside
    other = typical + np.random.default_rng(1).normal(0.0, 5.0, typical.shape)
    assert (reference.score(other.tolist(), stats) or 0.0) > 1.0
    assert (reference.score(typical.tolist(), {**stats, "noise_hu": 80.0}) or 0.0) > 1.0
    assert (reference.score(typical.tolist(), {**stats, "lung_fraction": 0.13}) or 0.0) > 1.0
    # and statistics without a noise estimate give no score rather than a guess
    assert reference.score(typical.tolist(), {**stats, "noise_hu": None}) is None


def test_reference_of_other_weights_is_refused_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    checkpoint = _reference_file(tmp_path, sha256="ef" * 32)
    with caplog.at_level(logging.WARNING):
        assert load_reference(checkpoint, SHA) is None
    assert "not the loaded" in caplog.text
    # and no file at all gives no reference, said once at load
    with caplog.at_level(logging.INFO):
        assert load_reference(tmp_path / "other.safetensors", SHA) is None
    assert "no domain reference other.domain.json" in caplog.text


def test_reference_needs_enough_studies() -> None:
    features, stats = _reference_data(5)
    with pytest.raises(ValueError, match="at least"):
        build_reference(
            SHA, features, stats, probabilities=[0.1] * 5, names=list("abcde"), components=3
        )


def _domain_item(sr: Dataset) -> str | None:
    """The value's meaning of the SR's "within the validated domain" item, if it has one."""
    found: list[str] = []

    def walk(items: list[Dataset]) -> None:
        for item in items:
            name = item.ConceptNameCodeSequence[0] if "ConceptNameCodeSequence" in item else None
            if name is not None and name.CodeValue == WITHIN_VALIDATED_DOMAIN.value:
                found.append(str(item.ConceptCodeSequence[0].CodeMeaning))
            walk(list(item.get("ContentSequence", [])))

    walk(list(sr.ContentSequence))
    return found[0] if found else None


@pytest.mark.parametrize(("in_domain", "meaning"), [(True, YES.meaning), (False, NO.meaning)])
def test_sr_states_whether_the_input_lies_inside_the_validated_domain(
    in_domain: bool, meaning: str
) -> None:
    series = ct_series()
    analysis = replace(make_analysis(series), domain_score=0.5, in_domain=in_domain)
    scs = build_heatmap_scs(analysis, by_uid(series), content_datetime=WHEN)
    sr = build_sr(analysis, series, scs, content_datetime=WHEN)
    assert _domain_item(sr) == meaning
    # and a checkpoint without a reference says nothing about the domain
    plain = build_sr(make_analysis(series), series, scs, content_datetime=WHEN)
    assert _domain_item(plain) is None


@pytest.mark.dcmtk
def test_out_of_domain_sr_and_sc_pass_dciodvfy(tmp_path: Path) -> None:
    series = ct_series()
    analysis = replace(make_analysis(series), domain_score=3.2, in_domain=False)
    scs = build_heatmap_scs(analysis, by_uid(series), content_datetime=WHEN)
    sr = build_sr(analysis, series, scs, content_datetime=WHEN)
    for name, ds in [("sr", sr), ("sc", scs[0])]:
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == []


def test_sc_legend_warns_outside_the_validated_domain() -> None:
    # given the same slice and rule in and out of the domain, with trained weights
    model = replace(make_model(), untrained=False)
    inside = _legend_strip(512, 0.9, model, "rule")
    outside = _legend_strip(512, 0.9, model, "rule", out_of_domain=True)
    # then only the warning row differs: drawn out of the domain, empty inside
    rows = np.flatnonzero(np.any(inside != outside, axis=(1, 2)))
    assert rows.size > 0 and rows.min() >= inside.shape[0] * 0.8
    assert not inside[rows].any()
    # and the secondary captures of an out-of-domain analysis carry it
    series = ct_series()
    base = replace(make_analysis(series, model=model), domain_score=0.4, in_domain=True)
    out = replace(base, domain_score=2.0, in_domain=False)
    (a, *_) = build_heatmap_scs(base, by_uid(series), content_datetime=WHEN)
    (b, *_) = build_heatmap_scs(out, by_uid(series), content_datetime=WHEN)
    assert not np.array_equal(a.pixel_array, b.pixel_array)


def test_worklist_and_api_text_label_an_out_of_domain_result() -> None:
    assert result_text(True, False) == "POSITIVE (outside validated domain)"
    assert result_text(False, False) == "negative (outside validated domain)"
    assert result_text(True, True) == result_text(True, None) == "POSITIVE"
    assert result_text(None, False) is None
    row = {
        "priority": 0,
        "study_uid": "1.2.3",
        "status": "done",
        "probability": 0.95,
        "positive": True,
        "in_domain": False,
        "instances": 64,
        "model_version": "2.0.0-phantom",
        "reason": None,
    }
    from rich.console import Console

    console = Console(width=300, record=True)
    console.print(render_worklist([row]))
    assert "POSITIVE (outside validated domain)" in console.export_text()


def test_out_of_domain_positive_waits_unless_trusted(monkeypatch: pytest.MonkeyPatch) -> None:
    bands = ("positive", "unanswered", "negative")
    positive_band = priority_for("done", True, 0.95, bands, in_domain=True)
    unanswered = priority_for("processing", None, None, bands)
    # given HRCT_TRUST_OUT_OF_DOMAIN unset: an out-of-domain positive stays unanswered
    monkeypatch.delenv("HRCT_TRUST_OUT_OF_DOMAIN", raising=False)
    get_settings.cache_clear()
    assert band_of("done", True, in_domain=False) == "unanswered"
    assert priority_for("done", True, 0.95, bands, in_domain=False) == unanswered
    # and an out-of-domain negative stays negative
    assert band_of("done", False, in_domain=False) == "negative"
    # given HRCT_TRUST_OUT_OF_DOMAIN=1: it is promoted like any positive
    monkeypatch.setenv("HRCT_TRUST_OUT_OF_DOMAIN", "1")
    get_settings.cache_clear()
    assert priority_for("done", True, 0.95, bands, in_domain=False) == positive_band
    assert positive_band > unanswered
