"""Analysed studies recorded through the worklist's own transitions (instance, completion,
claim, result), with chosen acquisition, input statistics and analysis time: drift inputs."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from hrct_triage.db import worklist
from hrct_triage.db.session import transaction

_serial = itertools.count(1)


@dataclass(frozen=True)
class Protocol:
    calling_ae: str = "CT1"
    station: str = "CT1_STATION"
    kernel: str = "LUNG"
    thickness: float = 1.0


def input_stats(rng: np.random.Generator, *, noise: float = 20.0, lung: float = -840.0) -> dict:
    """The ``Study.input_stats`` contract, drawn around a lung HU mean and a noise level."""
    mean = float(rng.normal(lung, 15.0))
    sd = float(rng.normal(110.0, 8.0))
    return {
        "lung_hu_mean": mean,
        "lung_hu_sd": sd,
        "lung_hu_p10": mean - 1.28 * sd,
        "lung_hu_p50": mean - 10.0,
        "lung_hu_p90": mean + 1.28 * sd,
        "noise_hu": float(rng.normal(noise, 2.0)),
        "lung_slices": int(rng.integers(50, 70)),
        "lung_hu_histogram": [0.1] * 10,  # not a scalar: drift ignores it
    }


def record_analysed(
    sessions: sessionmaker[Session],
    *,
    at: datetime,
    protocol: Protocol,
    probability: float,
    stats: dict[str, Any] | None,
    domain_score: float | None = None,
) -> str:
    """One study received, completed, claimed and analysed at ``at``; its Study UID."""
    n = next(_serial)
    uid = f"1.2.826.0.1.3680043.8.498.{n}"
    facts = worklist.InstanceFacts(
        study_uid=uid,
        series_uid=f"{uid}.1",
        sop_instance_uid=f"{uid}.1.1",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=f"/spool/{uid}.dcm",
        size_bytes=10,
        sha256=f"{n:064x}",
        modality="CT",
        calling_ae=protocol.calling_ae,
    )
    received = at - timedelta(minutes=5)
    with transaction(sessions) as session:
        worklist.record_instance(session, facts, association_id=None, now=received)
    with transaction(sessions) as session:
        (study_id,) = [
            s
            for s in worklist.complete_ready_studies(
                session, quiet_seconds=10, now=received + timedelta(seconds=20)
            )
        ]
    with transaction(sessions) as session:
        claim = worklist.claim(
            session, study_id, worker="test", lease_seconds=900, now=at - timedelta(minutes=1)
        )
        assert claim is not None
    record = worklist.AnalysisRecord(
        probability=probability,
        positive=probability >= 0.8,
        threshold=0.8,
        model_version="test",
        series_uid=f"{uid}.1",
        slice_probabilities=[],
        timings={},
        mode="live",
        domain_score=domain_score,
        in_domain=None if domain_score is None else domain_score <= 1.0,
        input_stats=stats,
        station_name=protocol.station,
        convolution_kernel=protocol.kernel,
        slice_thickness=protocol.thickness,
    )
    with transaction(sessions) as session:
        assert worklist.finish_analysis(
            session,
            claim,
            analysis=record,
            outputs=[],
            destinations=[],
            now=at,
            delivery_grace_seconds=60,
        )
    return uid
