"""The Kubernetes manifests are valid for the pinned Kubernetes version and agree with the code:
settings, ports, health service names, how the router finds the state service, and the security
and resource rules every container follows."""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate
import pytest
from kubernetes_validate import utils as kv_utils

from gateway import settings

from .kube import (
    HEALTH_NAMES,
    IMAGE_UID,
    K8S_VERSION,
    OVERLAYS,
    SETTINGS,
    Container,
    Manifests,
    effective_settings,
)


def _label(doc: dict[str, Any]) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def _validation_errors(doc: dict[str, Any]) -> str | None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kv_utils.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        return f"{_label(doc)}: {path}: {exc.message}"
    except kv_utils.SchemaNotFoundError as exc:
        # The command-line tool only warns here; an unknown kind is a failure for us.
        return f"{_label(doc)}: {exc.message}"
    return None


def _host_port(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host, int(port)


# -- schema ---------------------------------------------------------------------------------------


def test_every_overlay_is_found() -> None:
    assert {"single-node", "postgres"} <= set(OVERLAYS)


def test_renders_resources_valid_against_pinned_kubernetes(manifests: Manifests) -> None:
    assert manifests.docs, f"{manifests.overlay} renders nothing"
    errors = [e for e in map(_validation_errors, manifests.docs) if e]
    assert not errors, "\n".join(errors)


def test_strict_validation_rejects_an_unknown_field(manifests: Manifests) -> None:
    # Guards the check above: a misspelt field must not pass unnoticed.
    doc = copy.deepcopy(manifests.workloads()[0])
    doc["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    assert _validation_errors(doc) is not None


# -- agreement with the code ----------------------------------------------------------------------


def test_env_vars_are_settings_of_the_service(manifests: Manifests) -> None:
    for c in manifests.containers():
        known = set(settings.env_names(SETTINGS[c.service]))
        unknown = sorted(set(c.env) - known)
        assert not unknown, f"{c.name} (respgw {c.service}) sets unknown settings {unknown}"


def test_every_env_value_parses(manifests: Manifests, monkeypatch: pytest.MonkeyPatch) -> None:
    for c in manifests.containers():
        effective_settings(c, monkeypatch)


def test_router_binds_all_interfaces_on_its_http_port(
    manifests: Manifests, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = manifests.container_of("router")
    s = effective_settings(c, monkeypatch)
    assert s.host == "0.0.0.0"
    assert [p["name"] for p in c.spec["ports"]] == ["http"]
    assert c.port("http") == s.port


@pytest.mark.parametrize("service", ["state", "bootstrap"])
def test_grpc_service_ports_match_its_settings(
    manifests: Manifests, monkeypatch: pytest.MonkeyPatch, service: str
) -> None:
    c = manifests.container_of(service)
    s = effective_settings(c, monkeypatch)
    host, port = _host_port(s.listen)
    assert host == "0.0.0.0", f"{c.name} listens on {s.listen}"
    assert sorted(p["name"] for p in c.spec["ports"]) == ["grpc", "metrics"]
    assert c.port("grpc") == port
    assert s.metrics_port > 0
    assert c.port("metrics") == s.metrics_port
    # Servers close connections now and then so round_robin clients re-resolve.
    assert s.max_connection_age_s > 0


@pytest.mark.parametrize("service", ["state", "bootstrap"])
def test_grpc_probes_ask_the_health_service_by_name(manifests: Manifests, service: str) -> None:
    c = manifests.container_of(service)
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = c.spec.get(kind)
        assert probe is not None, f"{c.name} has no {kind}"
        assert probe.get("grpc") == {"port": c.port("grpc"), "service": HEALTH_NAMES[service]}, (
            f"{c.name} {kind}"
        )


def test_router_probes_use_health_endpoints(manifests: Manifests) -> None:
    c = manifests.container_of("router")
    expected = {
        "startupProbe": "/healthz",
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
    }
    for kind, path in expected.items():
        get = c.spec[kind]["httpGet"]
        assert get["path"] == path
        assert get["port"] in ("http", c.port("http"))


def _target(address: str) -> tuple[str, str, int]:
    """Splits ``dns:///NAME.NAMESPACE.svc.cluster.local:PORT`` into name, namespace and port."""
    assert address.startswith("dns:///"), f"{address!r} is not a dns:/// target"
    host, port = _host_port(address.removeprefix("dns:///"))
    name, namespace, *rest = host.split(".")
    assert rest == ["svc", "cluster", "local"], f"{address!r} is not a cluster Service name"
    return name, namespace, port


def _service_reaches(
    manifests: Manifests, address: str, service: str
) -> tuple[dict[str, Any], Container]:
    """Checks that ``address`` names a Service whose grpc port leads to ``service``'s grpc port."""
    name, namespace, port = _target(address)
    svc = manifests.get("Service", name)
    assert svc["metadata"].get("namespace") == namespace, (
        f"{address} names namespace {namespace!r}, the Service is in "
        f"{svc['metadata'].get('namespace')!r}"
    )
    target = manifests.container_of(service)
    pod_labels = target.workload["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items(), f"{name} selects other pods"
    ports = [p for p in svc["spec"]["ports"] if p["name"] == "grpc"]
    assert len(ports) == 1 and ports[0]["port"] == port, f"{address}: no grpc port {port}"
    assert ports[0]["targetPort"] in ("grpc", target.port("grpc"))
    return svc, target


def test_router_reaches_state_through_the_headless_service(
    manifests: Manifests, monkeypatch: pytest.MonkeyPatch
) -> None:
    router = effective_settings(manifests.container_of("router"), monkeypatch)
    svc, _ = _service_reaches(manifests, router.state_address, "state")
    # Headless: DNS answers with every pod, and the router's round_robin channel uses them all.
    assert svc["spec"].get("clusterIP") == "None"


def test_router_reaches_bootstrap(manifests: Manifests, monkeypatch: pytest.MonkeyPatch) -> None:
    router = effective_settings(manifests.container_of("router"), monkeypatch)
    _service_reaches(manifests, router.bootstrap_address, "bootstrap")


def test_services_select_pods_and_named_ports(manifests: Manifests) -> None:
    pods = [
        (w["spec"]["template"]["metadata"]["labels"], c)
        for w in manifests.workloads()
        for c in w["spec"]["template"]["spec"]["containers"]
    ]
    for svc in manifests.all("Service"):
        selector = svc["spec"]["selector"]
        chosen = [c for labels, c in pods if selector.items() <= labels.items()]
        assert chosen, f"{_label(svc)} selects no pod"
        names = {p["name"] for c in chosen for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in names, (
                f"{_label(svc)} targets unknown {port['targetPort']}"
            )


# -- security and resources -----------------------------------------------------------------------


def _effective(c: Container, key: str) -> Any:
    """A securityContext field as the kubelet applies it: the container's, else the pod's."""
    own = c.spec.get("securityContext", {})
    return own[key] if key in own else c.pod.get("securityContext", {}).get(key)


def test_every_container_is_locked_down(manifests: Manifests) -> None:
    for c in manifests.containers():
        sc = c.spec.get("securityContext", {})
        assert _effective(c, "runAsNonRoot") is True, c.name
        assert _effective(c, "runAsUser") == IMAGE_UID, c.name
        assert sc.get("readOnlyRootFilesystem") is True, c.name
        assert sc.get("allowPrivilegeEscalation") is False, c.name
        assert sc.get("capabilities") == {"drop": ["ALL"]}, c.name
        assert _effective(c, "seccompProfile") == {"type": "RuntimeDefault"}, c.name
        assert c.pod.get("automountServiceAccountToken") is False, c.name
        # With a read-only root, Python and its libraries need a writable /tmp.
        tmp = c.mount_for("/tmp")
        assert tmp is not None and tmp["mountPath"] == "/tmp", f"{c.name} has no /tmp volume"


def test_every_container_has_requests_and_limits(manifests: Manifests) -> None:
    for c in manifests.containers():
        resources = c.spec.get("resources", {})
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources.get(bound, {})), f"{c.name} {bound}"


def _volume_kind(c: Container, volume: str) -> str:
    for v in c.pod.get("volumes", []):
        if v["name"] == volume:
            return str(next(k for k in v if k != "name"))
    claims = c.workload["spec"].get("volumeClaimTemplates", [])
    if any(t["metadata"]["name"] == volume for t in claims):
        return "volumeClaimTemplate"
    raise AssertionError(f"{c.name} mounts undeclared volume {volume!r}")


def test_bootstrap_workdir_is_on_a_writable_volume(
    manifests: Manifests, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = manifests.container_of("bootstrap")
    workdir = effective_settings(c, monkeypatch).workdir
    assert workdir.startswith("/"), f"relative workdir {workdir!r} would land on the read-only root"
    mount = c.mount_for(workdir)
    assert mount is not None and mount["mountPath"] != "/tmp", f"{workdir} has no volume of its own"
    assert not mount.get("readOnly", False)
    assert _volume_kind(c, mount["name"]) == "emptyDir"
    assert manifests.workload_of("bootstrap")["spec"]["replicas"] == 1


# -- what each overlay promises -------------------------------------------------------------------


def test_router_scales_with_an_hpa_and_keeps_a_pdb(manifests: Manifests) -> None:
    router = manifests.workload_of("router")
    pod_labels = router["spec"]["template"]["metadata"]["labels"]
    # The HPA owns the replica count; a fixed one would be reset on every apply.
    assert "replicas" not in router["spec"]
    hpa = manifests.get("HorizontalPodAutoscaler", router["metadata"]["name"])
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": router["metadata"]["name"],
    }
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert 1 < hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    pdbs = [
        p
        for p in manifests.all("PodDisruptionBudget")
        if p["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    ]
    assert len(pdbs) == 1


def test_state_storage_matches_the_overlay(
    manifests: Manifests, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = manifests.container_of("state")
    assert "RESPGW_STATE_BACKEND" in c.env, "the overlay must choose the backend explicitly"
    s = effective_settings(c, monkeypatch)
    workload = c.workload
    if manifests.overlay == "single-node":
        assert s.backend == "sqlite"
        assert workload["kind"] == "StatefulSet"
        assert workload["spec"]["replicas"] == 1, "SQLite has a single writer"
        assert workload["spec"]["serviceName"] == "respgw-state"
        mount = c.mount_for(s.sqlite_path)
        assert mount is not None, f"{s.sqlite_path} is on no volume"
        assert _volume_kind(c, mount["name"]) == "volumeClaimTemplate"
    elif manifests.overlay == "postgres":
        assert s.backend == "postgres"
        assert workload["kind"] == "Deployment"
        assert workload["spec"]["replicas"] > 1
        assert s.postgres_dsn.startswith("postgresql://")
        # The DSN carries a password: it comes from a Secret, never a literal or a ConfigMap.
        literal = {v["name"] for v in c.spec.get("env", []) if "value" in v}
        assert "RESPGW_STATE_POSTGRES_DSN" not in literal
        for source in c.spec.get("envFrom", []):
            if "configMapRef" in source:
                data = manifests.get("ConfigMap", source["configMapRef"]["name"])["data"]
                assert "RESPGW_STATE_POSTGRES_DSN" not in data
    else:
        pytest.fail(f"no expectations written for overlay {manifests.overlay!r}")
    # Exactly one state workload: the single-node patch replaced the Deployment, not added to it.
    assert [w["kind"] for w in manifests.workloads() if w is workload or _runs(w, "state")] == [
        workload["kind"]
    ]


def _runs(workload: dict[str, Any], service: str) -> bool:
    return any(
        (c.get("args") or [None])[0] == service
        for c in workload["spec"]["template"]["spec"]["containers"]
    )
