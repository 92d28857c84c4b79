"""Typed settings read once from ``HRCT_*`` environment variables (and a ``.env`` file).

Defaults make ``hrct-triage demo`` and ``up`` work with no server: SQLite for the worklist and
kombu's SQLAlchemy transport over SQLite as the broker, both under ``HRCT_DATA_DIR``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

_DESTINATION = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:]+):(?P<port>\d{1,5})$")


@dataclass(frozen=True)
class Destination:
    """A DICOM peer that receives our SR and SC objects (``AE@host:port``)."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Destination:
        match = _DESTINATION.match(text.strip())
        if match is None:
            raise ValueError(f"HRCT_DESTINATIONS entry {text!r} is not AE@host:port")
        return cls(match["ae"], match["host"], int(match["port"]))


def _comma_list(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, list | tuple):
        return [str(part).strip() for part in value if str(part).strip()]
    raise TypeError(f"expected a comma list, got {type(value).__name__}")


class Settings(BaseSettings):
    """Every knob of the gateway; names are the contract in SPEC.md."""

    model_config = SettingsConfigDict(
        env_prefix="HRCT_", env_file=".env", extra="ignore", protected_namespaces=()
    )

    data_dir: Path = Path("./var")
    database_url: str | None = None
    broker_url: str | None = None

    ae_title: str = Field("HRCT_TRIAGE", max_length=16)
    port: int = Field(11112, ge=0, le=65535)
    bind_address: str = "0.0.0.0"
    allowed_aets: Annotated[list[str], NoDecode] = Field(default_factory=list)
    destinations: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # A study is complete this long after its last instance, once no association feeding it is
    # open. Ten seconds covers the pause between series on the scanners we know of.
    quiet_seconds: float = Field(10.0, ge=0)
    # How often the listener looks for complete studies and unpublished outbox rows.
    poll_seconds: float = Field(1.0, gt=0)
    # An outbox row published this long ago whose study is still queued is published again: the
    # broker may have lost it (restart without persistence, embedded broker consumer killed).
    republish_seconds: float = Field(120.0, gt=0)

    model_path: Path | None = None
    allow_untrained: bool = False
    threshold: float = Field(0.8, ge=0.0, le=1.0)
    trim_fraction: float = Field(0.1, ge=0.0, lt=0.5)
    min_slices: int = Field(20, ge=1)
    batch_size: int = Field(32, ge=1)
    heatmaps: int = Field(3, ge=0)

    # A worker's claim on a study lapses after this long, so a killed worker's study is analysed
    # again; well above the slowest CPU analysis of a 500-slice study.
    lease_seconds: float = Field(900.0, gt=0)
    # Analysis attempts before a study ends failed (a poison study must not loop forever).
    max_attempts: int = Field(3, ge=1)
    # Delivery: tries per output and destination before the study ends failed.
    delivery_attempts: int = Field(5, ge=1)
    delivery_backoff_seconds: float = Field(5.0, ge=0)
    delivery_timeout_seconds: float = Field(30.0, gt=0)

    @field_validator("allowed_aets", "destinations", mode="before")
    @classmethod
    def _split(cls, value: object) -> list[str]:
        return _comma_list(value)

    @field_validator("destinations")
    @classmethod
    def _check_destinations(cls, value: list[str]) -> list[str]:
        for entry in value:
            Destination.parse(entry)
        return value

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

    @property
    def destination_list(self) -> list[Destination]:
        return [Destination.parse(entry) for entry in self.destinations]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once; tests build their own ``Settings``."""
    return Settings()
