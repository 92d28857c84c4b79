"""Each way a delivery can fail is recorded in its own words, on real network peers: a closed
port, a silent one, DCMTK dcmqrscp rejecting a called AE title it does not know, storescp
refusing every association, pynetdicom SCPs that are full, abort, stall or answer a failure
status. A permanent refusal ends the delivery at once; anything else waits for the next round.
The words reach the delivery row, ``show``, the web page and the log alike.
"""

from __future__ import annotations

import logging
import time
import urllib.request
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom.presentation import build_context

from hrct_triage.common.settings import Destination
from hrct_triage.common.sop_classes import (
    COMPREHENSIVE_3D_SR,
    COMPREHENSIVE_SR,
    ENHANCED_SR,
    SECONDARY_CAPTURE,
)
from hrct_triage.db import queries
from hrct_triage.db.models import StudyStatus
from hrct_triage.db.session import transaction
from hrct_triage.web.app import create_app
from hrct_triage.worker.delivery.dimse import echo
from hrct_triage.worker.jobs import run_delivery
from tests.helpers.deliveries import (
    analysed_study,
    delivery_rows,
    sessions_for,
    settings_for,
    worker_context,
)
from tests.helpers.pacs_peers import (
    ConfiguredStoreSCP,
    PynetdicomPeer,
    QueryRetrieveSCP,
    SilentPeer,
    hold_association,
)
from tests.helpers.ports import free_port
from tests.helpers.web_server import Served
from tests.helpers.worklist import study_row

TOKEN = "delivery-errors-token"


def _deliver_once(tmp_path: Path, destination: str, **settings: Any) -> tuple[Any, int, str]:
    """A study owed to ``destination``, one delivery round; (sessions, study id, outcome)."""
    url = f"sqlite:///{tmp_path / 'worklist.sqlite'}"
    sessions = sessions_for(url)
    study_id, _ = analysed_study(sessions, tmp_path / "out", [destination])
    outcome = run_delivery(worker_context(settings_for(tmp_path, url, **settings)), study_id)
    return sessions, study_id, outcome


def _states(sessions: Any, study_id: int) -> set[tuple[str, int, str | None]]:
    rows = delivery_rows(sessions, study_id)
    return {(d.state, d.attempts, d.error) for d in rows["sr"] + rows["sc"]}


def test_closed_port_is_a_refused_connection_and_is_retried(tmp_path: Path) -> None:
    # given a destination where nothing listens
    port = free_port()
    destination = f"GONE@127.0.0.1:{port}"
    # when a round runs
    sessions, study_id, outcome = _deliver_once(tmp_path, destination)
    # then every delivery waits for the next round, saying the connection was refused
    words = (
        f"association with {destination} not established: "
        f"connection refused (nothing listens on 127.0.0.1:{port})"
    )
    assert outcome == StudyStatus.DELIVERING
    assert _states(sessions, study_id) == {("pending", 1, words)}


def test_silent_peer_is_a_timeout_and_is_retried(tmp_path: Path) -> None:
    # given a peer whose port accepts connections but which never answers
    peer = SilentPeer()
    try:
        sessions, study_id, outcome = _deliver_once(
            tmp_path, peer.destination, delivery_timeout_seconds=1
        )
    finally:
        peer.stop()
    # then the round timed out waiting for the association's answer, and is retried
    words = (
        f"association with {peer.destination} not established: "
        "no answer to the association request within 1 s"
    )
    assert outcome == StudyStatus.DELIVERING
    assert _states(sessions, study_id) == {("pending", 1, words)}


@pytest.mark.dcmtk
def test_unknown_called_ae_title_is_rejected_for_good_and_fails_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # given DCMTK dcmqrscp, which knows the AE title PACS, called as WRONG
    pacs = QueryRetrieveSCP(tmp_path / "qr").start()
    destination = f"WRONG@127.0.0.1:{pacs.port}"
    try:
        with caplog.at_level(logging.WARNING, logger="hrct.worker"):
            sessions, study_id, outcome = _deliver_once(tmp_path, destination)
    finally:
        pacs.stop()
    # then the study fails at once, with the rejection's result, source and reason in words
    words = (
        f"{destination} rejected the association permanently "
        "(A-ASSOCIATE-RJ from the service user: called AE title not recognised)"
    )
    study = study_row(sessions, study_id)
    assert outcome == study.status == StudyStatus.FAILED
    assert _states(sessions, study_id) == {("failed", 1, words)}
    assert study.reason == f"delivery to {destination} failed after 1 attempt: {words}"
    # and the log says it in the same words
    assert any(words in record.getMessage() for record in caplog.records)


@pytest.mark.dcmtk
def test_storescp_refusing_every_association_is_rejected_for_good(tmp_path: Path) -> None:
    # given storescp --refuse (rejected permanent, service user, no reason given)
    pacs = ConfiguredStoreSCP(tmp_path / "pacs", None, extra=("--refuse",)).start()
    try:
        sessions, study_id, outcome = _deliver_once(tmp_path, pacs.destination)
    finally:
        pacs.stop()
    words = (
        f"{pacs.destination} rejected the association permanently "
        "(A-ASSOCIATE-RJ from the service user: no reason given)"
    )
    assert outcome == StudyStatus.FAILED
    assert _states(sessions, study_id) == {("failed", 1, words)}


def test_full_peer_rejects_transiently_and_is_retried(tmp_path: Path) -> None:
    # given a PACS that takes one association at a time, busy with another sender
    peer = PynetdicomPeer(lambda event: 0x0000, max_associations=1)
    release = hold_association(peer)
    try:
        sessions, study_id, outcome = _deliver_once(tmp_path, peer.destination)
    finally:
        release()
        peer.stop()
    words = (
        f"{peer.destination} rejected the association transiently "
        "(A-ASSOCIATE-RJ from the service provider (presentation): local limit exceeded)"
    )
    assert outcome == StudyStatus.DELIVERING
    assert _states(sessions, study_id) == {("pending", 1, words)}


def test_peer_aborting_during_c_store_is_recorded_as_an_abort(tmp_path: Path) -> None:
    # given a PACS that aborts the association when the first object arrives
    def abort(event: Any) -> int:
        event.assoc.abort()
        return 0x0000

    peer = PynetdicomPeer(abort)
    try:
        sessions, study_id, outcome = _deliver_once(tmp_path, peer.destination)
    finally:
        peer.stop()
    words = f"{peer.destination} aborted the association (A-ABORT from the service user)"
    assert outcome == StudyStatus.DELIVERING
    assert _states(sessions, study_id) == {("pending", 1, words)}


def test_peer_silent_after_c_store_is_a_timeout(tmp_path: Path) -> None:
    # given a PACS that takes the first object and answers only after our timeout
    def stall(event: Any) -> int:
        time.sleep(3)
        return 0x0000

    peer = PynetdicomPeer(stall)
    try:
        sessions, study_id, outcome = _deliver_once(
            tmp_path, peer.destination, delivery_timeout_seconds=1
        )
    finally:
        peer.stop()
    words = f"no response from {peer.destination} within 1 s; association aborted"
    assert outcome == StudyStatus.DELIVERING
    assert _states(sessions, study_id) == {("pending", 1, words)}


def test_failure_status_is_recorded_with_its_meaning_everywhere(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # given a PACS that refuses every object with 0xA700 (out of resources)
    peer = PynetdicomPeer(lambda event: 0xA700)
    try:
        with caplog.at_level(logging.WARNING, logger="hrct.worker"):
            sessions, study_id, outcome = _deliver_once(tmp_path, peer.destination)
    finally:
        peer.stop()
    # then each delivery waits for the next round with the status and what it means
    words = f"{peer.destination} answered 0xA700 (Refused: Out of resources)"
    assert outcome == StudyStatus.DELIVERING
    assert _states(sessions, study_id) == {("pending", 1, words)}
    assert {d.status_code for d in delivery_rows(sessions, study_id)["sc"]} == {0xA700}
    # and the log, the study record `show` prints and the web page say the same
    assert any(words in record.getMessage() for record in caplog.records)
    study = study_row(sessions, study_id)
    with transaction(sessions) as session:
        detail = queries.study_detail(session, study.study_uid)
    assert detail is not None and {o["error"] for o in detail["outputs"]} == {words}
    served = Served(create_app(sessions, token=TOKEN))
    try:
        request = urllib.request.Request(
            f"http://127.0.0.1:{served.port}/studies/{study.study_uid}",
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        with urllib.request.urlopen(request, timeout=30) as page:
            html = page.read().decode()
    finally:
        served.stop()
    assert words in html


def test_not_authorized_status_ends_the_delivery_at_once(tmp_path: Path) -> None:
    # given a PACS that answers 0x0124 (refused: not authorized) to every object
    peer = PynetdicomPeer(lambda event: 0x0124)
    try:
        sessions, study_id, outcome = _deliver_once(tmp_path, peer.destination)
    finally:
        peer.stop()
    words = f"{peer.destination} answered 0x0124 (Refused: Not authorized)"
    assert outcome == StudyStatus.FAILED
    assert _states(sessions, study_id) == {("failed", 1, words)}


def test_sop_class_refused_by_status_falls_back_on_the_same_association(tmp_path: Path) -> None:
    # given a PACS that negotiates Comprehensive 3D SR but refuses it with 0x0122
    def refuse_3d(event: Any) -> int:
        if event.request.AffectedSOPClassUID == COMPREHENSIVE_3D_SR:
            return 0x0122  # Refused: SOP Class not supported
        return 0x0000

    peer = PynetdicomPeer(refuse_3d)
    try:
        sessions, study_id, outcome = _deliver_once(tmp_path, peer.destination)
    finally:
        peer.stop()
    # then the SR went as Comprehensive SR in the same round, and the study is done
    assert outcome == StudyStatus.DONE
    sr_classes = {str(ds.SOPClassUID) for ds in peer.received} - {"1.2.840.10008.5.1.4.1.1.7"}
    assert sr_classes == {COMPREHENSIVE_SR}
    (sr,) = delivery_rows(sessions, study_id)["sr"]
    assert (sr.state, sr.sop_class_uid) == ("sent", COMPREHENSIVE_SR)


def _add_3d_point(sr_path: Path) -> None:
    """Give the stored SR a 3D point, as a future version of it might hold."""
    sr = pydicom.dcmread(sr_path)
    point = pydicom.Dataset()
    point.RelationshipType, point.ValueType = "CONTAINS", "SCOORD3D"
    point.ConceptNameCodeSequence = [sr.ConceptNameCodeSequence[0]]
    point.GraphicType, point.GraphicData = "POINT", [1.0, 2.0, 3.0]
    point.ReferencedFrameOfReferenceUID = "1.2.3"
    sr.ContentSequence.append(point)
    sr.save_as(sr_path, enforce_file_format=True)


def test_pin_the_sr_cannot_honour_fails_it_at_once_with_why(tmp_path: Path) -> None:
    # given an SR that holds a 3D point and a destination pinned to Enhanced SR, which
    # allows none
    peer = PynetdicomPeer(lambda event: 0x0000)
    url = f"sqlite:///{tmp_path / 'worklist.sqlite'}"
    sessions = sessions_for(url)
    study_id, records = analysed_study(sessions, tmp_path / "out", [peer.destination])
    _add_3d_point(Path(next(r.path for r in records if r.kind == "sr")))
    settings = settings_for(tmp_path, url, destinations=[f"{peer.destination}?sr=enhanced"])
    try:
        outcome = run_delivery(worker_context(settings), study_id)
    finally:
        peer.stop()
    # then the SR is failed at once with why, and the heat maps went
    rows = delivery_rows(sessions, study_id)
    (failed,) = rows["sr"]
    assert outcome == StudyStatus.FAILED and failed.state == "failed"
    assert failed.error == (
        f"{peer.destination} is pinned to Enhanced SR (sr= option), which this SR cannot be "
        "written as: Enhanced SR has no value type SCOORD3D (item 1.10)"
    )
    assert {d.state for d in rows["sc"]} == {"sent"}


def test_unresolvable_host_name_is_named(tmp_path: Path) -> None:
    # given a destination whose host name does not resolve
    destination = "PACS@pacs.invalid:104"
    sessions, study_id, outcome = _deliver_once(tmp_path, destination)
    # then the round is retried, saying the name did not resolve (not a crash)
    assert outcome == StudyStatus.DELIVERING
    ((state, attempts, error),) = _states(sessions, study_id)
    assert (state, attempts) == ("pending", 1)
    assert error is not None
    assert error.startswith(f"association with {destination} not established: host name")
    assert "'pacs.invalid' not resolved" in error


def test_echo_names_the_rejection(tmp_path: Path) -> None:
    # given a PACS that rejects us transiently (busy)
    peer = PynetdicomPeer(lambda event: 0x0000, max_associations=1)
    release = hold_association(peer)
    try:
        result = echo(Destination.parse(peer.destination), calling_ae="HRCT_TRIAGE", timeout=5)
    finally:
        release()
        peer.stop()
    assert not result.ok
    assert "rejected the association transiently" in result.detail


def test_sr_whose_content_fits_no_class_the_pacs_takes_fails_at_once_with_why(
    tmp_path: Path,
) -> None:
    # given an SR holding a 3D point (it fits Comprehensive 3D SR only) and a PACS that stores
    # every class of ours but that one
    peer = PynetdicomPeer(
        lambda event: 0x0000, classes=(COMPREHENSIVE_SR, ENHANCED_SR, SECONDARY_CAPTURE)
    )
    url = f"sqlite:///{tmp_path / 'worklist.sqlite'}"
    sessions = sessions_for(url)
    study_id, records = analysed_study(sessions, tmp_path / "out", [peer.destination])
    _add_3d_point(Path(next(r.path for r in records if r.kind == "sr")))
    try:
        outcome = run_delivery(worker_context(settings_for(tmp_path, url)), study_id)
    finally:
        peer.stop()
    # then the SR fails at once, saying which class was refused and which do not fit, and
    # the check made after it (which finds Comprehensive SR accepted) does not undo that
    rows = delivery_rows(sessions, study_id)
    (sr,) = rows["sr"]
    assert outcome == StudyStatus.FAILED and (sr.state, sr.attempts) == ("failed", 1)
    assert sr.error == (
        f"no class {peer.destination} accepts fits this SR: "
        "Comprehensive 3D SR (abstract syntax not supported); "
        "Comprehensive SR (accepted; the SR does not fit it: "
        "Comprehensive SR has no value type SCOORD3D (item 1.10)); "
        "Enhanced SR (accepted; the SR does not fit it: "
        "Enhanced SR has no value type SCOORD3D (item 1.10))"
    )
    assert {d.state for d in rows["sc"]} == {"sent"}


def test_refusal_the_check_after_it_contradicts_is_retried_not_final(tmp_path: Path) -> None:
    # given a PACS that stores no SR class until, while our round runs, it is configured to
    # store Enhanced SR (as an administrator fixing it would)
    def store_and_reconfigure(event: Any) -> int:
        if not any(cx.abstract_syntax == ENHANCED_SR for cx in peer.server.contexts):
            peer.server.contexts.append(build_context(ENHANCED_SR))
        return 0x0000

    peer = PynetdicomPeer(store_and_reconfigure, classes=(SECONDARY_CAPTURE,))
    url = f"sqlite:///{tmp_path / 'worklist.sqlite'}"
    sessions = sessions_for(url)
    study_id, _ = analysed_study(sessions, tmp_path / "out", [peer.destination])
    settings = settings_for(tmp_path, url)
    try:
        # when the round finds no SR class accepted, and the check after it finds one
        first = run_delivery(worker_context(settings), study_id)
        (sr,) = delivery_rows(sessions, study_id)["sr"]
        # then the SR waits for the next round instead of failing, saying why
        assert first == StudyStatus.DELIVERING and sr.state == "pending"
        assert sr.error is not None and sr.error.endswith(
            "; a check just after accepted Enhanced SR, so it is tried again"
        )
        assert sr.error.startswith(f"{peer.destination} accepts none of the classes this SR")
        # and the next round sends it as Enhanced SR
        assert run_delivery(worker_context(settings), study_id) == StudyStatus.DONE
    finally:
        peer.stop()
    (sr,) = delivery_rows(sessions, study_id)["sr"]
    assert (sr.state, sr.attempts, sr.sop_class_uid) == ("sent", 2, ENHANCED_SR)
