"""Deployment material that cannot run here (no Docker engine) is still checked: the compose
file and the Kubernetes manifests parse and name real settings, the systemd units verify."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from db.settings import Settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
SPEC_SETTINGS = {
    "HRCT_DATA_DIR",
    "HRCT_DATABASE_URL",
    "HRCT_BROKER_URL",
    "HRCT_AE_TITLE",
    "HRCT_PORT",
    "HRCT_ALLOWED_AETS",
    "HRCT_DESTINATIONS",
    "HRCT_QUIET_SECONDS",
    "HRCT_MODEL_PATH",
    "HRCT_THRESHOLD",
}
KNOWN_SETTINGS = {f"HRCT_{name.upper()}" for name in Settings.model_fields}


def _names(text: str) -> set[str]:
    # HRCT_TRIAGE is the default AE title (a value); the other two are compose-only variables.
    return set(re.findall(r"\bHRCT_[A-Z_]+\b", text)) - {
        "HRCT_DB_PASSWORD",
        "HRCT_MODEL_DIR",
        "HRCT_TRIAGE",
    }


def test_compose_file_runs_every_process_on_redis_with_aof_and_postgres() -> None:
    text = (DEPLOY / "compose.yaml").read_text()
    compose: dict[str, Any] = yaml.safe_load(text)
    services = compose["services"]
    assert {"redis", "postgres", "migrate", "listener", "worker"} <= set(services)
    assert "--appendonly" in services["redis"]["command"]
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["listener"]["depends_on"]["migrate"]["condition"] == (
        "service_completed_successfully"
    )
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    env = compose["x-hrct-env"]
    assert set(env) >= SPEC_SETTINGS
    assert _names(text) <= KNOWN_SETTINGS, _names(text) - KNOWN_SETTINGS


def test_kubernetes_manifests_parse_and_request_a_gpu_per_worker() -> None:
    text = (DEPLOY / "k8s" / "hrct-triage.yaml").read_text()
    documents = [d for d in yaml.safe_load_all(text) if d]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in documents}
    assert {
        ("Deployment", "hrct-listener"),
        ("Service", "hrct-listener"),
        ("Deployment", "hrct-worker"),
        ("Job", "hrct-migrate"),
        ("PersistentVolumeClaim", "hrct-spool"),
        ("ConfigMap", "hrct-triage"),
        ("Secret", "hrct-triage"),
    } <= kinds
    worker = next(d for d in documents if d["metadata"]["name"] == "hrct-worker")
    container = worker["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    config = next(d for d in documents if d["kind"] == "ConfigMap")["data"]
    secret = next(d for d in documents if d["kind"] == "Secret")["stringData"]
    assert set(config) | set(secret) >= SPEC_SETTINGS
    assert _names(text) <= KNOWN_SETTINGS


def test_systemd_units_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    venv_cli = Path(__file__).resolve().parent.parent / ".venv" / "bin" / "hrct-triage"
    for unit in (DEPLOY / "systemd").glob("*.service"):
        text = unit.read_text()
        text = text.replace("/opt/hrct-triage/.venv/bin/hrct-triage", str(venv_cli))
        text = text.replace("/etc/hrct-triage/env", str(DEPLOY / "env.example"))
        (tmp_path / unit.name).write_text(text)
    shutil.copy(tmp_path / "hrct-worker@.service", tmp_path / "hrct-worker@0.service")
    units = [
        str(tmp_path / n)
        for n in ("hrct-migrate.service", "hrct-listener.service", "hrct-worker@0.service")
    ]
    result = subprocess.run(
        [analyze, "verify", *units], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert _names((DEPLOY / "env.example").read_text()) <= KNOWN_SETTINGS
