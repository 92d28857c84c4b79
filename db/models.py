"""Tables of the worklist: studies and what they hold, associations, the outbox, outputs,
deliveries and the state-change log.

Times are stored in UTC; ``UTCDateTime`` makes SQLite hand them back timezone-aware like PostgreSQL.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

UID = String(64)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the worklist; use datetime.now(UTC)")
        return value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class StudyStatus:
    """A study's states (README.md lists them); ``done``: every output acknowledged everywhere."""

    RECEIVING = "receiving"
    QUEUED = "queued"
    PROCESSING = "processing"
    DELIVERING = "delivering"
    DONE = "done"
    FAILED = "failed"
    NOT_APPLICABLE = "not_applicable"

    ALL = (RECEIVING, QUEUED, PROCESSING, DELIVERING, DONE, FAILED, NOT_APPLICABLE)


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, unique=True)
    status: Mapped[str] = mapped_column(String(20), index=True, default=StudyStatus.RECEIVING)
    reason: Mapped[str | None] = mapped_column(Text)
    priority: Mapped[int] = mapped_column(Integer, default=0, index=True)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    accession_number: Mapped[str | None] = mapped_column(String(16))

    # Each completion of the study starts a new analysis generation; outputs carry it. A late
    # wave that leaves the analysed input as it was is checked within the generation it found.
    generation: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    claim_token: Mapped[str | None] = mapped_column(String(36))
    claimed_by: Mapped[str | None] = mapped_column(String(200))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)

    probability: Mapped[float | None] = mapped_column(Float)
    positive: Mapped[bool | None] = mapped_column(Boolean)
    threshold: Mapped[float | None] = mapped_column(Float)
    # Share of the lung slices dropped at each end before the mean: with ``threshold``, the
    # decision rule the result was reached with.
    trim_fraction: Mapped[float | None] = mapped_column(Float)
    model_version: Mapped[str | None] = mapped_column(String(200))
    analysed_series_uid: Mapped[str | None] = mapped_column(UID)
    # Digest of what the current generation's verdict was computed on: the series selection
    # chose and the SOP Instance UID and content hash of each of its instances (or that no
    # series fit). None until the generation has a verdict: the next completion analyses.
    analysed_input: Mapped[str | None] = mapped_column(String(64))
    # A late wave re-opened a study that had a verdict: the state to go back to when the wave
    # changes nothing, and when the wave began (its instances are those received since).
    reopened_from: Mapped[str | None] = mapped_column(String(20))
    reopened_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    slice_probabilities: Mapped[list[Any] | None] = mapped_column(JSON)
    # ``live`` or ``shadow``: the mode the current result was reached in. A shadow result went
    # to the QA destinations only and is never prioritised; switching to live does not resend it.
    mode: Mapped[str | None] = mapped_column(String(8))
    # How far the analysed input lies from the checkpoint's reference of its training inputs
    # (bigger is farther), and whether it lies inside the validated domain.
    domain_score: Mapped[float | None] = mapped_column(Float)
    in_domain: Mapped[bool | None] = mapped_column(Boolean)
    # Per-study statistics of the analysed input (lung HU histogram, features) for drift watch.
    input_stats: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # The acquisition drift is grouped by, read from the analysed series.
    station_name: Mapped[str | None] = mapped_column(String(64))
    convolution_kernel: Mapped[str | None] = mapped_column(String(64))
    slice_thickness: Mapped[float | None] = mapped_column(Float)
    timings: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    first_instance_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_instance_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The last instance of the input the current generation analyses (``last_instance_at`` when
    # it was queued): where its time to notification starts, whatever arrived later unanalysed.
    input_received_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    queued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    analysis_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    analysed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    series: Mapped[list[Series]] = relationship(back_populates="study", order_by="Series.id")
    instances: Mapped[list[Instance]] = relationship(back_populates="study", viewonly=True)
    outputs: Mapped[list[Output]] = relationship(back_populates="study", order_by="Output.id")
    events: Mapped[list[Event]] = relationship(back_populates="study", order_by="Event.id")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_uid: Mapped[str] = mapped_column(UID, unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    description: Mapped[str | None] = mapped_column(String(64))

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Association(Base):
    """One DICOM association: the audit trail, and what keeps a study from completing early."""

    __tablename__ = "associations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    called_ae: Mapped[str | None] = mapped_column(String(16))
    peer_address: Mapped[str | None] = mapped_column(String(64))
    peer_port: Mapped[int | None] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), index=True)  # open/released/aborted/orphaned
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    instances: Mapped[int] = mapped_column(Integer, default=0)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    rejection_reason: Mapped[str | None] = mapped_column(Text)
    # C-STORE statuses answered on this association, e.g. {"0x0000": 300, "0xA700": 1}.
    statuses: Mapped[dict[str, int] | None] = mapped_column(JSON)
    tls: Mapped[bool] = mapped_column(Boolean, default=False)


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    association_id: Mapped[int | None] = mapped_column(ForeignKey("associations.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    study: Mapped[Study] = relationship(back_populates="instances")
    series: Mapped[Series] = relationship(back_populates="instances")


class InstanceReplacement(Base):
    """A SOP Instance UID received again with different bytes: the version that was replaced.

    The newest version is kept in the spool and in ``instances``; this row keeps the fact that an
    older one was acknowledged, from which association, and what it hashed to.
    """

    __tablename__ = "instance_replacements"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    old_sha256: Mapped[str] = mapped_column(String(64))
    old_size_bytes: Mapped[int] = mapped_column(BigInteger)
    old_association_id: Mapped[int | None] = mapped_column(ForeignKey("associations.id"))
    old_received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # Where the old version lay; the listener deletes it once the new one is committed.
    old_path: Mapped[str] = mapped_column(Text)
    new_sha256: Mapped[str] = mapped_column(String(64))
    new_association_id: Mapped[int | None] = mapped_column(ForeignKey("associations.id"))
    replaced_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Refusal(Base):
    """A C-STORE we answered with a failure status: what of it could be identified, where it came
    from and why, so that an administrator sees why a scanner's images did not arrive.

    Most refusals happen before the instance's UIDs are known (a missing or invalid UID, a
    malformed or oversized data set), so each UID column holds a UID only where the data set gave
    a valid one, and is null otherwise; an invalid value is named in ``reason`` alone. The
    scanner's AE title and address are kept here as well as through ``association_id``: the
    association's own row may be missing when the database was down as it opened.

    A *transient* refusal (out of disk, database unavailable) is one the scanner will retry: until
    that SOP instance is stored, its study is not complete, so it is never analysed on a partial
    set.
    """

    __tablename__ = "refusals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    association_id: Mapped[int | None] = mapped_column(ForeignKey("associations.id"), index=True)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    peer_address: Mapped[str | None] = mapped_column(String(64))
    study_uid: Mapped[str | None] = mapped_column(UID, index=True)
    series_uid: Mapped[str | None] = mapped_column(UID)
    sop_instance_uid: Mapped[str | None] = mapped_column(UID)
    status: Mapped[int] = mapped_column(Integer)
    # A short fixed name of the reason (``invalid_uid``, ``too_large``, ...), to count by.
    kind: Mapped[str | None] = mapped_column(String(32))
    transient: Mapped[bool] = mapped_column(Boolean)
    reason: Mapped[str] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class OutboxRow(Base):
    """A message owed to the broker. Written in the same transaction as the state it announces,
    published by the dispatcher, published again when nobody took it."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    task: Mapped[str] = mapped_column(String(32))  # "triage" or "deliver"
    generation: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    not_before: Mapped[datetime | None] = mapped_column(UTCDateTime)
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    publish_count: Mapped[int] = mapped_column(Integer, default=0)
    done_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)


class Output(Base):
    __tablename__ = "outputs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    generation: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(8))  # "sr" or "sc"
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    series_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    study: Mapped[Study] = relationship(back_populates="outputs")
    deliveries: Mapped[list[Delivery]] = relationship(
        back_populates="output", order_by="Delivery.id"
    )


class DeliveryState:
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


class Delivery(Base):
    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("output_id", "destination"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    output_id: Mapped[int] = mapped_column(ForeignKey("outputs.id"), index=True)
    destination: Mapped[str] = mapped_column(String(128))
    state: Mapped[str] = mapped_column(String(16), default=DeliveryState.PENDING)
    status_code: Mapped[int | None] = mapped_column(Integer)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    acknowledged_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    error: Mapped[str | None] = mapped_column(Text)
    # What this destination was sent: the output itself, or an SR rewritten in the class the
    # destination accepts (its own SOP Instance UID). None until an object went out.
    sop_class_uid: Mapped[str | None] = mapped_column(UID)
    sop_instance_uid: Mapped[str | None] = mapped_column(UID)

    output: Mapped[Output] = relationship(back_populates="deliveries")


class DestinationCapabilities(Base):
    """What a destination last answered when proposed every class and transfer syntax we may
    send it: ``hrct-triage echo --capabilities``, and the worker again when a class is refused.

    ``answers`` is a list of ``{"sop_class_uid", "transfer_syntax_uid", "accepted", "detail"}``;
    ``problem`` says why there was no answer (refused connection, rejected association).
    """

    __tablename__ = "destination_capabilities"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    destination: Mapped[str] = mapped_column(String(128), unique=True)
    checked_at: Mapped[datetime] = mapped_column(UTCDateTime)
    answers: Mapped[list[Any]] = mapped_column(JSON)
    problem: Mapped[str | None] = mapped_column(Text)


class ReferenceLabel(Base):
    """What the hospital's radiologists said a study was (``covid``, ``other``, ``normal`` or
    ``unknown``), imported from a CSV to validate the model locally; importing again corrects it.

    A label names its study by Study Instance UID or by accession number, whichever the hospital's
    report system holds; it may arrive before or after the study itself.
    """

    __tablename__ = "reference_labels"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str | None] = mapped_column(UID, unique=True)
    accession_number: Mapped[str | None] = mapped_column(String(16), unique=True)
    label: Mapped[str] = mapped_column(String(16))
    reader: Mapped[str | None] = mapped_column(String(64))
    reported_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    imported_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # The file (and line) the label came from, for the audit of a correction.
    source: Mapped[str | None] = mapped_column(Text)


class Event(Base):
    """Every state change of a study, with what caused it."""

    __tablename__ = "events"
    __table_args__ = (Index("ix_events_study_at", "study_id", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"))
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    from_status: Mapped[str | None] = mapped_column(String(20))
    to_status: Mapped[str] = mapped_column(String(20))
    detail: Mapped[str | None] = mapped_column(Text)

    study: Mapped[Study] = relationship(back_populates="events")
