"""The ErrorInfo reasons each gRPC service can send are exactly the values of its proto
package's ``ErrorReason`` enum (``error_reason.proto``), read from the source with ``ast``: a
reason sent but not in the enum, or an enum value nothing sends, fails here."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway import grpcerrors
from respgw.bootstrap.v1 import error_reason_pb2 as bootstrap_reasons
from respgw.state.v1 import error_reason_pb2 as state_reasons

REPO = Path(__file__).resolve().parent.parent
# The calls that build a ServiceError from a reason string.
BUILDERS = {"ServiceError", "_invalid", "_error"}
REASON = re.compile(r"[A-Z][A-Z0-9_]*")
SERVICES: dict[str, tuple[Any, tuple[str, ...]]] = {
    "state": (state_reasons.ErrorReason, ("state_svc", "gateway")),
    "bootstrap": (bootstrap_reasons.ErrorReason, ("bootstrap_svc", "gateway")),
}


def _sent(packages: tuple[str, ...]) -> dict[str, set[str]]:
    """Every reason the packages' code can send, with where: a reason string given to a builder,
    or a generated ``ERROR_REASON_*`` constant."""
    found: dict[str, set[str]] = {}
    for package in packages:
        for path in sorted((REPO / package).rglob("*.py")):
            where = str(path.relative_to(REPO))
            for node in ast.walk(ast.parse(path.read_text(), where)):
                names: list[str] = []
                if isinstance(node, ast.Call):
                    func = node.func
                    callee = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
                    if callee in BUILDERS:
                        args = [*node.args, *(k.value for k in node.keywords)]
                        names = [
                            a.value
                            for a in args
                            if isinstance(a, ast.Constant)
                            and isinstance(a.value, str)
                            and REASON.fullmatch(a.value)
                        ]
                elif isinstance(node, ast.Attribute) and node.attr.startswith(
                    grpcerrors.REASON_PREFIX
                ):
                    names = [node.attr.removeprefix(grpcerrors.REASON_PREFIX)]
                for name in names:
                    found.setdefault(name, set()).add(f"{where}:{getattr(node, 'lineno', 0)}")
    found.pop("UNSPECIFIED", None)
    return found


def _enum(enum: Any) -> set[str]:
    return {grpcerrors.reason(enum, v) for v in enum.values() if v != 0}


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_every_reason_sent_is_an_enum_value_and_every_value_is_sent(service: str) -> None:
    enum, packages = SERVICES[service]
    sent = _sent(packages)
    unknown = {name: sorted(where) for name, where in sent.items() if name not in _enum(enum)}
    assert unknown == {}, f"add these to {service}'s ErrorReason (error_reason.proto)"
    assert _enum(enum) - set(sent) == set(), "values nothing sends: remove them, or send them"


@pytest.mark.parametrize("package", ["state_svc", "bootstrap_svc"])
def test_a_service_builds_its_errors_only_from_its_tree(package: str) -> None:
    """Outside its ``errors.py``, a service never builds a ServiceError by hand (where a reason
    would be a spelled string): it raises a class of its tree with a generated constant."""
    by_hand = []
    for path in sorted((REPO / package).rglob("*.py")):
        if path.name == "errors.py" and path.parent.name == package:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                func = node.func
                callee = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
                if callee == "ServiceError":
                    by_hand.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert by_hand == []


def test_the_reader_finds_reasons_both_ways() -> None:
    state = _sent(("state_svc",))
    assert any(w.startswith("state_svc/errors.py") for w in state["VERSION_MISMATCH"])
    bootstrap = _sent(("bootstrap_svc",))
    assert any(w.startswith("bootstrap_svc/errors.py") for w in bootstrap["SESSION_LIMIT"])


def test_a_value_is_sent_as_its_name_without_the_prefix() -> None:
    assert grpcerrors.reason(state_reasons.ErrorReason, state_reasons.ERROR_REASON_LEASE_LOST) == (
        "LEASE_LOST"
    )
    assert all(
        name.startswith(grpcerrors.REASON_PREFIX)
        for enum in (state_reasons.ErrorReason, bootstrap_reasons.ErrorReason)
        for name in enum.keys()
    )


def _listed(proto: str, enum: Any) -> set[str]:
    """The reasons the opening comment of a service lists (its "Errors:" paragraph)."""
    text = (REPO / "protos" / proto).read_text()
    paragraph = re.search(r"^// Errors: (.*?)^(?://\n|[^/])", text, re.S | re.M)
    assert paragraph is not None, f"{proto} has no Errors: paragraph"
    words = set(re.findall(r"\b[A-Z][A-Z0-9_]*[A-Z0-9]\b", paragraph[1]))
    codes = set(grpc.StatusCode.__members__)
    prose = {"ERROR_REASON", "RPC"}
    return {w for w in words if w in _enum(enum) or w not in codes | prose}


@pytest.mark.parametrize(
    ("enum", "protos"),
    [
        (state_reasons.ErrorReason, ["state/v1/state_service.proto"]),
        (
            bootstrap_reasons.ErrorReason,
            ["bootstrap/v1/bootstrap_service.proto", "bootstrap/v1/execution_service.proto"],
        ),
    ],
    ids=["state", "bootstrap"],
)
def test_the_service_comments_list_every_reason_of_the_enum(enum: Any, protos: list[str]) -> None:
    listed = set().union(*(_listed(f"respgw/{p}", enum) for p in protos))
    assert listed == _enum(enum)
