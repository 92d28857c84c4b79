"""Typed settings read once from ``HRCT_*`` environment variables (and a ``.env`` file).

Defaults make ``hrct-triage demo`` and ``up`` work with no server: SQLite for the worklist and
kombu's SQLAlchemy transport over SQLite as the broker, both under ``HRCT_DATA_DIR``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from hrct_triage.common import paper
from hrct_triage.common.sop_classes import SR_CLASS_OPTIONS

_DESTINATION = re.compile(
    r"^(?P<ae>[^@]{1,16})@(?P<host>[^:?]+):(?P<port>\d{1,5})(?:\?(?P<options>.*))?$"
)


@dataclass(frozen=True)
class Destination:
    """A peer that receives our SR and SC objects: a DICOM AE (``AE@host:port``, C-STORE) or a
    DICOMweb service (``https://host/dicom-web``, STOW-RS to ``<url>/studies``).

    Either may end in ``?sr=comprehensive3d|comprehensive|enhanced``: that PACS gets the SR in
    that class only, for one that accepts a class but mishandles it. ``str()`` leaves the option
    out: it names the peer, which is what delivery rows record.
    """

    ae_title: str
    host: str
    port: int
    url: str | None = None  # set for a DICOMweb destination
    sr_class: str | None = None  # SOP Class UID the SR is pinned to; None: negotiated

    @property
    def is_dicomweb(self) -> bool:
        return self.url is not None

    def __str__(self) -> str:
        return self.url if self.url is not None else f"{self.ae_title}@{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Destination:
        text = text.strip()
        if text.lower().startswith(("http://", "https://")):
            return cls._parse_url(text)
        match = _DESTINATION.match(text)
        if match is None:
            raise ValueError(
                f"HRCT_DESTINATIONS entry {text!r} is not AE@host:port or an http(s):// URL"
            )
        sr_class = _sr_class_option(text, match["options"])
        return cls(match["ae"], match["host"], int(match["port"]), sr_class=sr_class)

    @classmethod
    def _parse_url(cls, text: str) -> Destination:
        parts = urlsplit(text)
        if not parts.hostname or parts.fragment:
            raise ValueError(f"HRCT_DESTINATIONS entry {text!r} is not a DICOMweb base URL")
        if parts.username or parts.password:
            # The entry is logged and stored with every delivery row: no secrets in it.
            raise ValueError(
                "a DICOMweb destination must not carry credentials; set HRCT_DICOMWEB_TOKEN"
            )
        sr_class = _sr_class_option(text, parts.query or None)
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        url = text.partition("?")[0].rstrip("/")
        return cls("", parts.hostname, port, url, sr_class=sr_class)


def _sr_class_option(entry: str, options: str | None) -> str | None:
    """The SR class an entry's ``?sr=...`` pins, checked; None when the entry has no option."""
    if options is None:
        return None
    try:
        pairs = parse_qsl(options, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        pairs = []
    names = ", ".join(SR_CLASS_OPTIONS)
    if len(pairs) != 1 or pairs[0][0] != "sr":
        choices = "|".join(SR_CLASS_OPTIONS)
        raise ValueError(f"HRCT_DESTINATIONS entry {entry!r}: the only option is sr=<{choices}>")
    value = pairs[0][1].strip().lower()
    if value not in SR_CLASS_OPTIONS:
        raise ValueError(
            f"HRCT_DESTINATIONS entry {entry!r}: sr={pairs[0][1]!r} is not one of {names}"
        )
    return SR_CLASS_OPTIONS[value]


NOT_FOR_DIAGNOSTIC_USE = "not for diagnostic use"


def check_series_description(value: str) -> str:
    """An output series description: a DICOM LO that warns the reader the object is not for
    diagnosis (the product is untrained on patients; the warning must survive configuration)."""
    if not 1 <= len(value) <= 64 or "\\" in value:
        raise ValueError(f"series description {value!r} needs 1..64 characters, no backslash")
    if NOT_FOR_DIAGNOSTIC_USE not in value.lower():
        raise ValueError(f"series description {value!r} must say {NOT_FOR_DIAGNOSTIC_USE!r}")
    return value


def _comma_list(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, list | tuple):
        return [str(part).strip() for part in value if str(part).strip()]
    raise TypeError(f"expected a comma list, got {type(value).__name__}")


def parse_quiet_by_aet(value: object) -> dict[str, float]:
    """``HRCT_QUIET_SECONDS_BY_AET``: "AE=seconds" pairs, comma separated (or a mapping)."""
    if isinstance(value, dict):
        pairs = [(str(ae), seconds) for ae, seconds in value.items()]
    else:
        pairs = []
        for entry in _comma_list(value):
            ae, separator, seconds = entry.partition("=")
            if not separator:
                raise ValueError(f"HRCT_QUIET_SECONDS_BY_AET entry {entry!r} is not AE=seconds")
            pairs.append((ae, seconds))
    parsed: dict[str, float] = {}
    for ae, seconds in pairs:
        title = ae.strip()
        if not 0 < len(title) <= 16:
            raise ValueError(f"HRCT_QUIET_SECONDS_BY_AET: {ae!r} is not an AE title")
        try:
            number = float(seconds)
        except (TypeError, ValueError):
            raise ValueError(
                f"HRCT_QUIET_SECONDS_BY_AET: {title}={seconds!r} is not a number of seconds"
            ) from None
        if not number >= 0:
            raise ValueError(f"HRCT_QUIET_SECONDS_BY_AET: {title}={seconds!r} is below 0")
        parsed[title] = number
    return parsed


_CONFIG = SettingsConfigDict(
    env_prefix="HRCT_", env_file=".env", extra="ignore", protected_namespaces=()
)


class ListenerSettings(BaseSettings):
    """The DICOM listener: who may store, its limits and timers, TLS, and study completion."""

    model_config = _CONFIG

    # Our AE title: called by scanners, and calling when we send results.
    ae_title: str = Field("HRCT_TRIAGE", max_length=16)
    port: int = Field(11112, ge=0, le=65535)
    bind_address: str = "0.0.0.0"
    allowed_aets: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Several scanners at once, each may open a few associations; above this pynetdicom answers
    # A-ASSOCIATE-RJ "local limit exceeded" and the scanner retries later.
    max_associations: int = Field(32, ge=1)
    # Listener processes accepting on the one DICOM port (SO_REUSEPORT, Linux): the kernel spreads
    # new associations over them, so several scanners at once use several cores instead of one
    # Python interpreter's. The first process alone reconciles the spool, recomputes priorities,
    # dispatches and serves the worklist metrics; HRCT_MAX_ASSOCIATIONS holds per process.
    listener_processes: int = Field(1, ge=1, le=64)
    # Largest P-DATA PDU we accept. 128 KiB keeps a 512x512 CT slice to four PDUs (fewer Python
    # round trips) while bounding what one PDU can make us buffer. 0 would mean unlimited.
    max_pdu_bytes: int = Field(131072, ge=0)
    # Seconds to finish association negotiation (A-ASSOCIATE-RQ to -AC); a peer that connects and
    # says nothing must not hold an association slot.
    acse_timeout_seconds: float = Field(30.0, gt=0)
    # Seconds to wait for the next message of a DIMSE operation: a stalled C-STORE is abandoned.
    dimse_timeout_seconds: float = Field(60.0, gt=0)
    # An association silent this long is closed, so the study it fed can complete.
    network_timeout_seconds: float = Field(120.0, gt=0)
    # Largest data set we store: an Enhanced CT multi-frame of 1000 512x512 frames is ~0.5 GiB;
    # anything bigger is refused with 0xA700 (the data set is held in memory while it arrives).
    max_instance_bytes: int = Field(1 << 30, ge=1)
    # Free space the spool's file system must keep after a write; below it C-STOREs are refused
    # with 0xA700 before anything is written, so the database and the OS never run out first.
    min_free_disk_bytes: int = Field(1 << 30, ge=0)

    # DICOM TLS (PS3.15 B.1); off unless a certificate and key are given.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # CA bundle that client certificates must chain to (mutual TLS).
    tls_ca: Path | None = None
    # Refuse a TLS client that presents no certificate signed by ``tls_ca``.
    tls_require_client_cert: bool = False

    # A study is complete this long after its last instance, once no association feeding it is
    # open. Ten seconds covers the pause between series on the scanners we know of.
    quiet_seconds: float = Field(10.0, ge=0)
    # A longer (or shorter) quiet period per calling AE title, "CT1=60,CT2=120": for a scanner
    # that sends its thin reconstruction minutes after the first series, so that its studies
    # are analysed once, on the thin series, at the cost of that much more time to notification
    # (docs/operations.md weighs the two). Scanners not named use HRCT_QUIET_SECONDS.
    quiet_seconds_by_aet: Annotated[dict[str, float], NoDecode] = Field(default_factory=dict)
    # How often the listener looks for complete studies and unpublished outbox rows.
    poll_seconds: float = Field(1.0, gt=0)
    # An outbox row published this long ago whose study is still queued is published again: the
    # broker may have lost it (restart without persistence, embedded broker consumer killed).
    republish_seconds: float = Field(120.0, gt=0)
    # Port of the Prometheus /metrics endpoint the listener serves (on HRCT_BIND_ADDRESS); 0 turns
    # it off. 9464 is the port the OpenTelemetry/Prometheus exporter convention uses, clear of
    # DICOM (104, 11112) and of the web worklist (8080). Worker figures (analysis duration,
    # delivery failures, time to notification) are read from the worklist on each scrape, so this
    # one endpoint covers every worker on every host.
    metrics_port: int = Field(9464, ge=0, le=65535)

    @field_validator("allowed_aets", mode="before")
    @classmethod
    def _split(cls, value: object) -> list[str]:
        return _comma_list(value)

    @field_validator("allowed_aets")
    @classmethod
    def _check_allowed_aets(cls, value: list[str]) -> list[str]:
        for entry in value:
            title, _, host = entry.partition("@")
            if not 0 < len(title.strip()) <= 16 or ("@" in entry and not host.strip()):
                raise ValueError(f"HRCT_ALLOWED_AETS entry {entry!r} is not AE or AE@host")
        return value

    @field_validator("quiet_seconds_by_aet", mode="before")
    @classmethod
    def _parse_quiet_by_aet(cls, value: object) -> dict[str, float]:
        return parse_quiet_by_aet(value)

    @model_validator(mode="after")
    def _check_tls(self) -> ListenerSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("HRCT_TLS_CERT and HRCT_TLS_KEY must be given together")
        if self.tls_require_client_cert and (self.tls_cert is None or self.tls_ca is None):
            raise ValueError("HRCT_TLS_REQUIRE_CLIENT_CERT needs HRCT_TLS_CERT, _KEY and _CA")
        return self

    def quiet_seconds_for(self, calling_ae: str | None) -> float:
        """The quiet period of a study sent by ``calling_ae`` (its scanner's, or the default)."""
        return self.quiet_seconds_by_aet.get(calling_ae or "", self.quiet_seconds)

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert is not None


class AnalysisSettings(BaseSettings):
    """The worker's analysis: the weights, the decision rule, and how a study is claimed."""

    model_config = _CONFIG

    model_path: Path | None = None
    allow_untrained: bool = False
    # torch.compile the DenseNet features on the worker. Pays off on a GPU after a warm-up of
    # tens of seconds per batch shape; on a CPU the compile takes minutes and gains little,
    # hence off by default.
    compile_model: bool = False
    # The decision rule. Set explicitly, each wins over the checkpoint's own value; left unset,
    # the checkpoint's applies (``worker.method.decision``), and the default below only shows
    # the paper's value.
    threshold: float = Field(paper.THRESHOLD, ge=0.0, le=1.0)
    trim_fraction: float = Field(paper.TRIM_FRACTION, ge=0.0, lt=0.5)
    min_slices: int = Field(20, ge=1)
    batch_size: int = Field(32, ge=1)
    heatmaps: int = Field(3, ge=0)
    # A worker's claim on a study lapses after this long, so a killed worker's study is analysed
    # again; well above the slowest CPU analysis of a 500-slice study.
    lease_seconds: float = Field(900.0, gt=0)
    # Analysis attempts before a study ends failed (a poison study must not loop forever).
    max_attempts: int = Field(3, ge=1)

    @property
    def threshold_override(self) -> float | None:
        """HRCT_THRESHOLD if it was set (environment, ``.env`` or argument), else None."""
        return self.threshold if "threshold" in self.model_fields_set else None

    @property
    def trim_fraction_override(self) -> float | None:
        """HRCT_TRIM_FRACTION if it was set (environment, ``.env`` or argument), else None."""
        return self.trim_fraction if "trim_fraction" in self.model_fields_set else None


class OutputSettings(BaseSettings):
    """The SR and SC series we write; their descriptions must say "not for diagnostic use"."""

    model_config = _CONFIG

    sr_series_number: int = Field(9901, ge=1, le=2**31 - 1)
    sr_series_description: str = "AI COVID-19 triage SR - not for diagnostic use"
    sc_series_number: int = Field(9902, ge=1, le=2**31 - 1)
    sc_series_description: str = "AI COVID-19 heat map - not for diagnostic use"
    # A study that ends not_applicable gets an SR saying so and why (off: some PACS file such
    # reports as clutter).
    not_analysed_sr: bool = False

    @field_validator("sr_series_description", "sc_series_description")
    @classmethod
    def _not_for_diagnostic_use(cls, value: str) -> str:
        return check_series_description(value)


class DeliverySettings(BaseSettings):
    """Where the outputs go, and how hard we try."""

    model_config = _CONFIG

    destinations: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Tries per output and destination before the study ends failed. Twelve tries with the
    # backoff below span about 2.4 h: a PACS restart or a maintenance window is ridden out, a
    # PACS gone for good is reported within the same shift.
    delivery_attempts: int = Field(12, ge=1)
    # First wait between delivery rounds; it doubles each round, with jitter. Five seconds lets a
    # PACS that merely restarts get the results almost at once.
    delivery_backoff_seconds: float = Field(5.0, ge=0)
    # Longest wait between delivery rounds however long the PACS has been down: once it is back,
    # results reach it within the hour.
    delivery_backoff_max_seconds: float = Field(3600.0, ge=0)
    delivery_timeout_seconds: float = Field(30.0, gt=0)
    # Bearer token sent to DICOMweb (STOW-RS) destinations; kept out of the destination entry,
    # which is logged and stored with each delivery row.
    dicomweb_token: str | None = Field(None, repr=False)
    # CA bundle for https destinations whose certificate is not signed by a system CA.
    dicomweb_ca: Path | None = None
    # A worker's hold on a study's delivery round, so two workers never send it at once; a killed
    # worker's hold lapses after this. Ten minutes covers a round of ten objects to two slow
    # destinations at the 30 s timeout per answer.
    delivery_lease_seconds: float = Field(600.0, gt=0)
    # ``live``: results go to ``destinations`` and prioritise the worklist. ``shadow``: studies
    # are analysed and recorded as usual, but results go to ``shadow_destinations`` only (a QA
    # archive, or nowhere) and nothing is prioritised; how a hospital tries the model silently.
    mode: Literal["live", "shadow"] = "live"
    shadow_destinations: Annotated[list[str], NoDecode] = Field(default_factory=list)

    @field_validator("destinations", "shadow_destinations", mode="before")
    @classmethod
    def _split(cls, value: object) -> list[str]:
        return _comma_list(value)

    @field_validator("destinations", "shadow_destinations")
    @classmethod
    def _check_destinations(cls, value: list[str]) -> list[str]:
        for entry in value:
            Destination.parse(entry)
        return value

    @property
    def destination_list(self) -> list[Destination]:
        return [Destination.parse(entry) for entry in self.destinations]

    @property
    def shadow_destination_list(self) -> list[Destination]:
        return [Destination.parse(entry) for entry in self.shadow_destinations]

    @property
    def every_destination_list(self) -> list[Destination]:
        """The clinical destinations, then the shadow ones not among them (for echo, doctor)."""
        named = {str(d) for d in self.destination_list}
        extra = [d for d in self.shadow_destination_list if str(d) not in named]
        return [*self.destination_list, *extra]

    def is_shadow_only(self, destination: Destination) -> bool:
        """Whether ``destination`` is a shadow destination and no clinical one."""
        name = str(destination)
        return name in {str(d) for d in self.shadow_destination_list} and name not in {
            str(d) for d in self.destination_list
        }

    def destinations_for(self, mode: str) -> list[Destination]:
        """Where a result reached in ``mode`` goes: a live one to ``destinations``, a shadow one
        to ``shadow_destinations`` only (none when that is empty), never to both."""
        return self.shadow_destination_list if mode == "shadow" else self.destination_list

    def mode_for(self, recorded: str | None) -> str:
        """The mode a study's next result is reached in: the one its first result was recorded
        in, whatever ``mode`` says now, so a shadow study never reaches a clinical destination
        and a live one never goes to the QA archive alone; ``mode`` for a study without one."""
        return recorded if recorded in ("live", "shadow") else self.mode


class WorklistSettings(BaseSettings):
    """How the worklist orders studies and when it raises an alarm."""

    model_config = _CONFIG

    # Worklist bands, most urgent first (db/priority.py): what a radiologist reads first.
    priority_bands: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["positive", "unanswered", "negative"]
    )
    # Calling AE titles whose studies go to the urgent queue (emergency department, ICU
    # scanners): their patients wait for the answer. Empty: only operator `requeue --urgent`
    # and positive results' deliveries jump the queue.
    urgent_aets: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Time to notification (last instance -> SR acknowledged) above which `stats` and the log
    # raise an alarm: 15 minutes, the turnaround a triage tool must beat to change reading order.
    notification_target_seconds: float = Field(900.0, gt=0)
    # A positive result on a study outside the model's validated domain stays in the unanswered
    # band unless this is set: the model was not shown such input, so its "positive" is no
    # reason to jump the queue.
    trust_out_of_domain: bool = False
    # Drift watch (db/drift.py, docs/operations.md "Drift watch"). The site's validation window,
    # UTC days, both inclusive: per scanner and protocol, the studies analysed in it are the
    # baseline; unset (or a group with too few studies in it), the checkpoint's reference is.
    drift_baseline_start: date | None = None
    drift_baseline_end: date | None = None
    # The recent studies compared with the baseline: those analysed in the last this many days.
    drift_window_days: int = Field(7, ge=1, le=366)
    # Fewer recent (or baseline) studies than this in a group: statistics shown, no alarm.
    drift_min_studies: int = Field(10, ge=2)
    # An alarm needs both: the two-sample Kolmogorov-Smirnov statistic D above this (an effect
    # large enough to matter) and its p-value below HRCT_DRIFT_ALPHA (not chance).
    drift_threshold: float = Field(0.3, gt=0.0, le=1.0)
    drift_alpha: float = Field(0.001, gt=0.0, lt=1.0)
    # How often the listener checks for drift (log line, Prometheus gauges); 0: never.
    drift_check_seconds: float = Field(3600.0, ge=0.0)

    @model_validator(mode="after")
    def _check_drift_window(self) -> WorklistSettings:
        start, end = self.drift_baseline_start, self.drift_baseline_end
        if (start is None) != (end is None):
            raise ValueError("HRCT_DRIFT_BASELINE_START and HRCT_DRIFT_BASELINE_END go together")
        if start is not None and end is not None and end < start:
            raise ValueError(
                f"HRCT_DRIFT_BASELINE_END {end} is before HRCT_DRIFT_BASELINE_START {start}"
            )
        return self

    @field_validator("priority_bands", "urgent_aets", mode="before")
    @classmethod
    def _split(cls, value: object) -> list[str]:
        return _comma_list(value)

    @field_validator("priority_bands")
    @classmethod
    def _check_bands(cls, value: list[str]) -> list[str]:
        if sorted(value) != sorted(["positive", "unanswered", "negative"]):
            raise ValueError(
                "HRCT_PRIORITY_BANDS must name positive, unanswered and negative once each, "
                f"most urgent first; got {','.join(value)!r}"
            )
        return value


class WebSettings(BaseSettings):
    """The read-only web worklist (``hrct-triage web``): its bearer token and its address."""

    model_config = _CONFIG

    web_token: str | None = Field(None, repr=False)
    web_host: str = "127.0.0.1"
    web_port: int = Field(8080, ge=1, le=65535)


# Each group, by the name ``Settings`` holds it under.
GROUPS: dict[str, type[BaseSettings]] = {
    "listener": ListenerSettings,
    "analysis": AnalysisSettings,
    "outputs": OutputSettings,
    "delivery": DeliverySettings,
    "worklist": WorklistSettings,
    "web": WebSettings,
}


class Settings(BaseSettings):
    """Every knob of the gateway, one group per subsystem; the ``HRCT_*`` names are what
    deployments set, so they stay flat (``HRCT_PORT``, not ``HRCT_LISTENER__PORT``).

    ``Settings(port=..., threshold=...)`` takes any group's field by its name too, which is how
    tests and the demo override a few settings; each group reads the environment for the rest.
    """

    model_config = _CONFIG

    data_dir: Path = Path("./var")
    database_url: str | None = None
    broker_url: str | None = None
    # "text" for people at a terminal; "json" (one object per line, with study_uid and
    # association when known) for a log shipper. Text is the default because `demo` and `up` are
    # run by hand first.
    log_format: Literal["text", "json"] = "text"

    listener: ListenerSettings = Field(default_factory=ListenerSettings)
    analysis: AnalysisSettings = Field(default_factory=AnalysisSettings)
    outputs: OutputSettings = Field(default_factory=OutputSettings)
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    worklist: WorklistSettings = Field(default_factory=WorklistSettings)
    web: WebSettings = Field(default_factory=WebSettings)

    def __init__(self, **values: Any) -> None:
        # ``_env_file`` (None in tests: no .env) must reach the groups, which read on their own.
        if "_env_file" in values:
            for name, group in GROUPS.items():
                given = {key: values.pop(key) for key in list(values) if key in group.model_fields}
                if name not in values:
                    values[name] = group(_env_file=values["_env_file"], **given)
        super().__init__(**values)

    @model_validator(mode="before")
    @classmethod
    def _route_to_groups(cls, data: object) -> object:
        """Hand each group its fields given by name, built through its own ``__init__`` so that
        it still reads the environment for the fields not given."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for name, group in GROUPS.items():
            given = {key: data.pop(key) for key in list(data) if key in group.model_fields}
            if isinstance(data.get(name), group):
                if given:  # validated again, with the fields given
                    data[name] = group(**data[name].model_dump(exclude_unset=True), **given)
            elif isinstance(data.get(name), dict):
                data[name] = group(**{**data[name], **given})
            elif given:
                data[name] = group(**given)
        return data

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def outputs_dir(self) -> Path:
        return self.data_dir / "outputs"

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'worklist.sqlite').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        if self.broker_url:
            return self.broker_url
        return f"sqla+sqlite:///{(self.data_dir / 'broker.sqlite').resolve()}"

    def explicit_environment(self) -> dict[str, str | None]:
        """The ``HRCT_*`` variables that give another process the settings that were set here
        (environment, ``.env`` or arguments; None: set to nothing); those left at their
        defaults stay unset, so a default that defers to something else (the checkpoint's
        threshold) still does."""
        values: dict[str, object] = {
            key: getattr(self, key) for key in self.model_fields_set if key not in GROUPS
        }
        for name in GROUPS:
            group = getattr(self, name)
            values.update({key: getattr(group, key) for key in group.model_fields_set})
        return {f"HRCT_{key.upper()}": _environment_text(value) for key, value in values.items()}


def setting_names() -> set[str]:
    """Every ``HRCT_*`` variable the settings read."""
    fields = {key for key in Settings.model_fields if key not in GROUPS}
    for group in GROUPS.values():
        fields |= set(group.model_fields)
    return {f"HRCT_{key.upper()}" for key in fields}


def _environment_text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):  # "KEY=value" pairs, as HRCT_QUIET_SECONDS_BY_AET reads
        return ",".join(f"{k}={v}" for k, v in value.items())
    return str(value)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once; tests build their own ``Settings``."""
    return Settings()
