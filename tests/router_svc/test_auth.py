"""API keys to tenants, and the models a tenant may use (router_svc/auth.py)."""

from __future__ import annotations

import pytest

from router_svc import auth, errors


def test_tenant_models_parse() -> None:
    assert auth.parse_tenant_models("") == {}
    assert auth.parse_tenant_models(" a = m1 | org/m2 ,b=m3,") == {
        "a": frozenset({"m1", "org/m2"}),
        "b": frozenset({"m3"}),
    }


@pytest.mark.parametrize("spec", ["a", "=m", "a=", "a=|", "a=m,a=n"])
def test_malformed_tenant_models_are_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="--tenant-models"):
        auth.parse_tenant_models(spec)


def test_only_a_listed_tenant_is_limited() -> None:
    limits = auth.Authenticator({"k": "a"}, auth.parse_tenant_models("a=m1|m2"))
    assert limits.models_of("a") == {"m1", "m2"} and limits.models_of("b") is None
    limits.check_model("a", "m2")
    limits.check_model("b", "anything")
    with pytest.raises(errors.NotFound) as info:
        limits.check_model("a", "m3")
    assert (info.value.code, info.value.param) == ("model_not_found", "model")
    with pytest.raises(errors.InvalidRequest) as missing:
        limits.check_model("a", "")
    assert missing.value.code == "missing_required_parameter"
    unlimited = auth.Authenticator({"k": "a"})
    assert unlimited.models_of("a") is None
    unlimited.check_model("a", "")
