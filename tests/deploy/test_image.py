"""The image recipe agrees with the project: the lock pins exactly what the package needs, the
Dockerfile copies every package and runs as the manifests' user, and the command each container
runs accepts its subcommand and environment."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
from typing import Any

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from .kube import IMAGE_UID, REPO, Manifests

DOCKERFILE = (REPO / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _lock() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep and version.strip(), f"requirements.lock: {line!r} is not an exact pin"
        pins[canonicalize_name(name)] = Version(version.strip())
    return pins


def test_lock_pins_every_runtime_dependency() -> None:
    project = PYPROJECT["project"]
    roots = [
        Requirement(r)
        for r in project["dependencies"] + project["optional-dependencies"]["postgres"]
    ]
    pins = _lock()
    for root in roots:
        pin = pins.get(canonicalize_name(root.name))
        assert pin is not None, f"requirements.lock lacks {root.name} (run scripts/lock.sh)"
        assert root.specifier.contains(pin, prereleases=True), f"{root} does not allow {pin}"
        for extra in root.extras:
            # An extra's own dependencies must be locked too (uvicorn[standard] brings uvloop).
            for raw in importlib.metadata.requires(root.name) or []:
                sub = Requirement(raw)
                if sub.marker is not None and sub.marker.evaluate({"extra": extra}):
                    assert canonicalize_name(sub.name) in pins, f"lock lacks {sub.name} ({root})"
    # Only runtime packages: nothing from the dev extra that the runtime does not need.
    runtime = {canonicalize_name(r.name) for r in roots}
    dev_only = {
        canonicalize_name(Requirement(r).name) for r in project["optional-dependencies"]["dev"]
    } - runtime
    assert not dev_only & set(pins), f"dev tools in the lock: {sorted(dev_only & set(pins))}"


def _stages() -> list[str]:
    return re.split(r"(?m)^FROM ", DOCKERFILE)[1:]


def test_base_images_are_pinned_to_a_patch_release() -> None:
    image = re.search(r"(?m)^ARG PYTHON_IMAGE=(\S+)$", DOCKERFILE)
    assert image is not None
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?", image[1])
    assert all(stage.startswith("${PYTHON_IMAGE}") for stage in _stages())


def test_runtime_stage_runs_respgw_as_the_manifests_user() -> None:
    final = _stages()[-1]
    assert re.search(rf"(?m)^USER {IMAGE_UID}(:{IMAGE_UID})?$", final)
    assert re.search(r'(?m)^ENTRYPOINT \["respgw"\]$', final)
    assert re.search(r'(?m)^CMD \["router"\]$', final)
    assert PYPROJECT["project"]["scripts"]["respgw"] == "respgw_cli.main:main"
    # Only the virtualenv comes from the builder: no compilers or build files in the image.
    assert re.findall(r"(?m)^COPY (.*)$", final) == ["--from=builder /opt/venv /opt/venv"]


def test_builder_installs_from_the_lock_and_copies_every_package() -> None:
    builder = _stages()[0]
    assert "pip install --only-binary=:all: -r requirements.lock" in builder
    assert "pip install --no-deps ." in builder
    copied = {
        src.rstrip("/")
        for line in re.findall(r"(?m)^COPY (.*)$", builder)
        for src in line.split()[:-1]
    }
    packages = {
        p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    assert packages <= copied, f"Dockerfile does not copy {sorted(packages - copied)}"
    # The build context holds only what .dockerignore lets through.
    allowed = {
        line[1:].rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    assert copied <= allowed, f".dockerignore keeps out {sorted(copied - allowed)}"


def test_each_container_command_accepts_its_environment(manifests: Manifests) -> None:
    """Runs the real ``respgw <service> --help`` with each container's environment: the
    subcommand exists, every value parses, and every variable set is one the command reads."""
    for c in manifests.containers():
        env: dict[str, Any] = {"PATH": os.environ.get("PATH", ""), "COLUMNS": "200", **c.env}
        done = subprocess.run(
            [sys.executable, "-m", "respgw_cli", *c.spec["args"], "--help"],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
            timeout=30,
            check=False,
        )
        assert done.returncode == 0, f"{c.name}: {done.stderr}"
        help_text = " ".join(done.stdout.split())
        for name in c.env:
            assert f"Environment: {name}." in help_text, f"{c.name}: respgw does not read {name}"


def test_marker_evaluation_matches_the_image_python() -> None:
    # The lock is computed with this interpreter's markers; the image runs the same minor version.
    image = re.search(r"python:(3\.\d+)\.", DOCKERFILE)
    assert image is not None
    assert Marker(f'python_version == "{image[1]}"').evaluate()
