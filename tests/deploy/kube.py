"""Reads rendered Kubernetes manifests the way the cluster would: resources, containers, the
environment each process sees, and the settings it builds from it."""

from __future__ import annotations

import argparse
import base64
import dataclasses
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bootstrap_svc.config import BootstrapSettings
from gateway import settings
from router_svc.config import RouterSettings
from state_svc.config import StateSettings

REPO = Path(__file__).resolve().parents[2]
OVERLAYS_DIR = REPO / "deploy" / "overlays"
OVERLAYS = sorted(p.name for p in OVERLAYS_DIR.iterdir() if (p / "kustomization.yaml").is_file())

# The oldest Kubernetes the manifests promise to work on (scripts/validate-deploy.sh uses it too).
K8S_VERSION = "1.33"
# The image's user, fixed in the Dockerfile.
IMAGE_UID = 10001

# The `respgw` subcommand each container runs, and what the code says about that service.
SETTINGS: dict[str, type[Any]] = {
    "router": RouterSettings,
    "state": StateSettings,
    "bootstrap": BootstrapSettings,
}
HEALTH_NAMES = {
    "state": "respgw.state.v1.StateService",
    "bootstrap": "respgw.bootstrap.v1.BootstrapService",
}
WORKLOAD_KINDS = ("Deployment", "StatefulSet")


@dataclasses.dataclass
class Container:
    """One container of a rendered workload, with the settings it is given."""

    workload: dict[str, Any]
    pod: dict[str, Any]  # the pod template's spec
    spec: dict[str, Any]
    service: str  # router, state or bootstrap
    env: dict[str, str]  # from env and envFrom, as the process sees it

    @property
    def name(self) -> str:
        return f"{self.workload['kind']}/{self.workload['metadata']['name']}/{self.spec['name']}"

    def port(self, name: str) -> int:
        for port in self.spec.get("ports", []):
            if port.get("name") == name:
                return int(port["containerPort"])
        raise AssertionError(f"{self.name} has no port named {name!r}")

    def mount_for(self, path: str) -> dict[str, Any] | None:
        """The volume mount that holds ``path``, the deepest one if several do."""
        best: dict[str, Any] | None = None
        for mount in self.spec.get("volumeMounts", []):
            root = mount["mountPath"].rstrip("/") + "/"
            if (path.rstrip("/") + "/").startswith(root):
                if best is None or len(mount["mountPath"]) > len(best["mountPath"]):
                    best = mount
        return best


class Manifests:
    """The resources one overlay renders to."""

    def __init__(self, overlay: str, docs: list[dict[str, Any]]) -> None:
        self.overlay = overlay
        self.docs = docs

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def find(self, kind: str, name: str) -> dict[str, Any] | None:
        for d in self.all(kind):
            if d["metadata"]["name"] == name:
                return d
        return None

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = self.find(kind, name)
        assert found is not None, f"{self.overlay}: no {kind} named {name!r}"
        return found

    def workloads(self) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] in WORKLOAD_KINDS]

    def workload_of(self, service: str) -> dict[str, Any]:
        found = [c.workload for c in self.containers() if c.service == service]
        assert len(found) == 1, f"{self.overlay}: {len(found)} workloads run `respgw {service}`"
        return found[0]

    def container_of(self, service: str) -> Container:
        found = [c for c in self.containers() if c.service == service]
        assert len(found) == 1, f"{self.overlay}: {len(found)} containers run `respgw {service}`"
        return found[0]

    def containers(self) -> Iterator[Container]:
        for workload in self.workloads():
            pod = workload["spec"]["template"]["spec"]
            for spec in [*pod.get("initContainers", []), *pod["containers"]]:
                args = spec.get("args") or []
                assert args and args[0] in SETTINGS, (
                    f"{workload['metadata']['name']}/{spec['name']}: args {args!r} do not start "
                    f"with a respgw subcommand ({', '.join(SETTINGS)})"
                )
                yield Container(workload, pod, spec, args[0], self._env(spec))

    def _env(self, spec: dict[str, Any]) -> dict[str, str]:
        """Merges envFrom (in order) and then env, the way the kubelet does."""
        env: dict[str, str] = {}
        for source in spec.get("envFrom", []):
            if "configMapRef" in source:
                data = self.get("ConfigMap", source["configMapRef"]["name"]).get("data", {})
            else:
                data = self.get("Secret", source["secretRef"]["name"]).get("data", {})
                data = {k: _b64(v) for k, v in data.items()}
            env.update({source.get("prefix", "") + k: str(v) for k, v in data.items()})
        for var in spec.get("env", []):
            if "value" in var:
                env[var["name"]] = str(var["value"])
            else:
                env[var["name"]] = self._value_from(var["valueFrom"])
        return env

    def _value_from(self, source: dict[str, Any]) -> str:
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            return _b64(self.get("Secret", ref["name"])["data"][ref["key"]])
        if "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            return str(self.get("ConfigMap", ref["name"])["data"][ref["key"]])
        raise AssertionError(f"unsupported valueFrom {source!r}")


def _b64(value: str) -> str:
    return base64.b64decode(value).decode()


def render(path: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize`` of one kustomization folder, parsed."""
    done = subprocess.run(
        ["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, f"kubectl kustomize {path.name} failed:\n{done.stderr}"
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def effective_settings(container: Container, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The settings dataclass the container's process would build, through the same
    flags-and-environment code the service uses (a value it cannot parse fails here too)."""
    cls = SETTINGS[container.service]
    for name in settings.env_names(cls):
        monkeypatch.delenv(name, raising=False)
    for name, value in container.env.items():
        monkeypatch.setenv(name, value)
    parser = argparse.ArgumentParser(exit_on_error=False)
    try:
        settings.add_arguments(parser, cls)
    except SystemExit as exc:  # argparse reports a bad environment value by exiting
        raise AssertionError(f"{container.name}: an environment value does not parse") from exc
    return settings.from_namespace(cls, parser.parse_args([]))
