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

from hrct_triage.common.settings import setting_names

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
# The settings every deployment sets; each deployment file must offer all of them.
CORE_SETTINGS = {
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
    "HRCT_MODE",
    "HRCT_SHADOW_DESTINATIONS",
}
KNOWN_SETTINGS = setting_names()


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
    assert {"redis", "postgres", "migrate", "listener", "worker", "web"} <= set(services)
    assert "--appendonly" in services["redis"]["command"]
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["listener"]["depends_on"]["migrate"]["condition"] == (
        "service_completed_successfully"
    )
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    env = compose["x-hrct-env"]
    assert set(env) >= CORE_SETTINGS
    assert _names(text) <= KNOWN_SETTINGS, _names(text) - KNOWN_SETTINGS


def test_compose_file_serves_the_web_worklist_with_a_token_and_a_health_check() -> None:
    # given the compose file
    compose: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    # when we look at its web service
    web = compose["services"]["web"]
    # then it runs `hrct-triage web` on port 8080 with a required token, after the migration
    assert web["command"] == ["web"]
    assert web["environment"]["HRCT_WEB_TOKEN"].startswith("${HRCT_WEB_TOKEN:?")
    assert web["environment"]["HRCT_WEB_HOST"] == "0.0.0.0"
    assert str(web["environment"]["HRCT_WEB_PORT"]) == "8080"
    assert web["environment"]["HRCT_DATABASE_URL"] == compose["x-hrct-env"]["HRCT_DATABASE_URL"]
    assert "8080:8080" in web["ports"]
    assert web["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    # and its health check asks /healthz, the one page that needs no token
    assert "http://127.0.0.1:8080/healthz" in " ".join(web["healthcheck"]["test"])


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
    assert set(config) | set(secret) >= CORE_SETTINGS
    assert _names(text) <= KNOWN_SETTINGS


def test_kubernetes_web_deployment_reads_its_token_from_the_secret() -> None:
    # given the Kubernetes manifests
    documents = [
        d for d in yaml.safe_load_all((DEPLOY / "k8s" / "hrct-triage.yaml").read_text()) if d
    ]
    by_kind = {(d["kind"], d["metadata"]["name"]): d for d in documents}
    # when we look at the web Deployment, its Service and the Secret
    deployment = by_kind[("Deployment", "hrct-web")]
    service = by_kind[("Service", "hrct-web")]
    secret = by_kind[("Secret", "hrct-triage")]["stringData"]
    # then the token is in the Secret (not the ConfigMap) and the pod takes the Secret
    assert secret["HRCT_WEB_TOKEN"]
    assert "HRCT_WEB_TOKEN" not in by_kind[("ConfigMap", "hrct-triage")]["data"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["web"]
    assert {"secretRef": {"name": "hrct-triage"}} in container["envFrom"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env == {"HRCT_WEB_HOST": "0.0.0.0", "HRCT_WEB_PORT": "8080"}
    # and it is probed on /healthz and reachable through its Service
    (port,) = container["ports"]
    assert port["containerPort"] == 8080
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]


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
        for n in (
            "hrct-migrate.service",
            "hrct-listener.service",
            "hrct-worker@0.service",
            "hrct-web.service",
        )
    ]
    result = subprocess.run(
        [analyze, "verify", *units], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert _names((DEPLOY / "env.example").read_text()) <= KNOWN_SETTINGS
    web = (DEPLOY / "systemd" / "hrct-web.service").read_text()
    assert "ExecStart=/opt/hrct-triage/.venv/bin/hrct-triage web\n" in web
    assert "EnvironmentFile=/etc/hrct-triage/env" in web
