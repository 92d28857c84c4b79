"""The wheels, as a user installs them: hrct-triage and hrct-triage-phantoms built from this
checkout and installed into a fresh virtual environment hold one import name, ``hrct_triage``,
with every subpackage importable and the files the code reads at run time (weights, templates,
static files, migrations) inside.

The wheels are built from a copy of the checkout, so no build folder is left in it. The fresh
environment takes the third-party dependencies (torch among them, which no test machine
downloads) from this interpreter's site-packages through a ``.pth`` line placed after its own
site-packages; ``hrct_triage`` itself can come only from the wheels.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What runs in the fresh environment: import every module, migrate a database, find the files.
PROBE = """
import importlib, json, pkgutil, sys
from pathlib import Path

import hrct_triage
from hrct_triage.db.migrate import upgrade
from hrct_triage.worker.method.checkpoints import DEMO_CHECKPOINT

failed = {}
names = []
for module in pkgutil.walk_packages(hrct_triage.__path__, "hrct_triage."):
    if module.name == "hrct_triage.__main__":  # runs the command line when imported
        continue
    names.append(module.name)
    try:
        importlib.import_module(module.name)
    except Exception as error:
        failed[module.name] = f"{type(error).__name__}: {error}"
upgrade(f"sqlite:///{Path(sys.argv[1]) / 'worklist.sqlite'}")
web = Path(importlib.import_module("hrct_triage.web").__file__).parent
print(json.dumps({
    "prefix": sys.prefix,
    "package": hrct_triage.__file__,
    "modules": names,
    "failed": failed,
    "checkpoint": str(DEMO_CHECKPOINT) if DEMO_CHECKPOINT.is_file() else None,
    "templates": sorted(p.name for p in (web / "templates").glob("*.html")),
    "static": sorted(p.name for p in (web / "static").iterdir()),
}))
"""


def _not_source(directory: str, names: list[str]) -> set[str]:
    """Build outputs and local state that a checkout may hold and a wheel must not depend on."""
    ignored = {
        name
        for name in names
        if name in ("__pycache__", "build", "dist") or name.endswith((".egg-info", "_cache"))
    }
    if Path(directory) == ROOT:
        ignored |= {".git", ".venv", "var", "demo-out", "runs", "data"} & set(names)
    return ignored


def _run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    # without PYTHONPATH, which points the test run at the checkout
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"{args}\n{done.stdout}\n{done.stderr}"
    return done


def _top_level(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    return {name.split("/")[0] for name in names if ".dist-info/" not in name}


def _names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def _shipped(folder: Path, pattern: str, prefix: str) -> set[str]:
    """What the checkout holds under ``folder``, named as in a wheel under ``prefix``."""
    return {f"{prefix}/{p.relative_to(folder).as_posix()}" for p in folder.glob(pattern)}


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("wheels")
    source = base / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=_not_source)
    built: dict[str, Path] = {}
    for name, folder in (("main", source), ("phantoms", source / "phantoms")):
        out = base / name
        pip = (sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation")
        _run(*pip, "--quiet", folder, "-w", out, cwd=base)
        (built[name],) = out.glob("*.whl")
    return built


def test_the_main_wheel_holds_only_hrct_triage_without_the_phantoms(
    wheels: dict[str, Path],
) -> None:
    # given the main distribution's wheel
    names = _names(wheels["main"])
    # then nothing but hrct_triage lands at the top of site-packages (no db, worker, listener,
    # common or phantoms), and the phantom generator is left to its own distribution
    assert _top_level(wheels["main"]) == {"hrct_triage"}
    assert not any(name.startswith("hrct_triage/phantoms") for name in names)
    # and the files read at run time are inside: weights, templates, static files, migrations
    expected = (
        _shipped(ROOT / "worker/method/weights", "*", "hrct_triage/worker/method/weights")
        | _shipped(ROOT / "hrct_triage/web/templates", "*.html", "hrct_triage/web/templates")
        | _shipped(ROOT / "hrct_triage/web/static", "*", "hrct_triage/web/static")
        | _shipped(ROOT / "db/migrations", "*.py", "hrct_triage/db/migrations")
        | _shipped(ROOT / "db/migrations", "*.mako", "hrct_triage/db/migrations")
        | _shipped(ROOT / "db/migrations/versions", "*.py", "hrct_triage/db/migrations/versions")
    )
    assert "hrct_triage/worker/method/weights/densenet121-phantom.safetensors" in expected
    assert expected - names == set()


def test_the_phantoms_wheel_holds_only_hrct_triage_phantoms(wheels: dict[str, Path]) -> None:
    # given the phantom generator's wheel
    names = _names(wheels["phantoms"])
    # then it adds hrct_triage/phantoms and nothing beside it (not even hrct_triage/__init__.py,
    # which is the main wheel's), with every module of the phantoms/ folder
    assert all(n.startswith("hrct_triage/phantoms/") for n in names if ".dist-info/" not in n)
    sources = {
        f"hrct_triage/phantoms/{p.relative_to(ROOT / 'phantoms').as_posix()}"
        for p in (ROOT / "phantoms").rglob("*.py")
        if "build" not in p.relative_to(ROOT / "phantoms").parts
    }
    assert "hrct_triage/phantoms/__init__.py" in sources
    assert sources - names == set()


def test_both_wheels_installed_in_a_fresh_environment_import_every_module(
    wheels: dict[str, Path], tmp_path: Path
) -> None:
    # given a fresh virtual environment whose dependencies come from this interpreter's
    # site-packages, after its own
    env = tmp_path / "env"
    _run(sys.executable, "-m", "venv", "--without-pip", env, cwd=tmp_path)
    python = env / "bin" / "python"
    own = _run(
        python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path
    )
    dependencies = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(own.stdout.strip()) / "zz_dependencies.pth").write_text("\n".join(dependencies) + "\n")
    # when both wheels are installed into it
    pip = (sys.executable, "-m", "pip", "--python", python, "install", "--quiet")
    _run(*pip, "--no-deps", "--no-index", wheels["main"], wheels["phantoms"], cwd=tmp_path)
    # then, away from the checkout, hrct_triage is the installed one
    probe = _run(python, "-I", "-c", PROBE, tmp_path, cwd=tmp_path)
    found = json.loads(probe.stdout)
    assert Path(found["package"]).is_relative_to(found["prefix"])
    # and every module of every subpackage imports, the phantom generator's too
    assert found["failed"] == {}
    subpackages = {".".join(name.split(".")[:2]) for name in found["modules"]}
    assert {
        f"hrct_triage.{name}"
        for name in ("cli", "common", "db", "demo", "listener", "phantoms", "web", "worker")
    } <= subpackages
    # and the migrations ran, the checkpoint, templates and static files are where the code looks
    assert (tmp_path / "worklist.sqlite").stat().st_size > 0
    assert found["checkpoint"] is not None
    assert Path(found["checkpoint"]).is_relative_to(found["prefix"])
    assert found["templates"] == sorted(
        p.name for p in ROOT.glob("hrct_triage/web/templates/*.html")
    )
    assert found["static"] == sorted(p.name for p in (ROOT / "hrct_triage/web/static").iterdir())
    # and the command is installed, pointing at the CLI that imported above
    assert "hrct_triage.cli.app" in (env / "bin" / "hrct-triage").read_text()
