"""API keys to tenants, and the models each tenant may use.

With keys configured (``--api-keys KEY=TENANT,...``) every request must carry
``Authorization: Bearer KEY``; the key decides the tenant every state call is scoped to. With none
configured the router is single-tenant: every caller is tenant ``default`` and no key is checked.

With ``--tenant-models TENANT=MODEL|MODEL,...`` a listed tenant may use only its models: GET
/v1/models lists only those, and naming another on a route that calls the hub is OpenAI's 404
``model_not_found``. A tenant not listed may use every model the hub serves.
"""

from __future__ import annotations

import hmac
import logging

from router_svc import checks, errors

log = logging.getLogger(__name__)

SINGLE_TENANT = "default"


def parse_api_keys(spec: str) -> dict[str, str]:
    """Parses ``KEY=TENANT,KEY=TENANT``; raises ValueError on a malformed pair."""
    keys: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, tenant = pair.partition("=")
        if not sep or not key.strip() or not tenant.strip():
            raise ValueError(f"API key entry must be KEY=TENANT, got {pair!r}")
        keys[key.strip()] = tenant.strip()
    return keys


def parse_tenant_models(spec: str) -> dict[str, frozenset[str]]:
    """Parses ``TENANT=MODEL|MODEL,TENANT=MODEL``; raises ValueError on a malformed entry."""
    models: dict[str, frozenset[str]] = {}
    for pair in filter(None, (p.strip() for p in spec.split(","))):
        tenant, sep, names = pair.partition("=")
        tenant = tenant.strip()
        allowed = frozenset(filter(None, (n.strip() for n in names.split("|"))))
        if not sep or not tenant or not allowed:
            raise ValueError(f"--tenant-models entry must be TENANT=MODEL|MODEL, got {pair!r}")
        if tenant in models:
            raise ValueError(f"--tenant-models names tenant {tenant!r} twice")
        models[tenant] = allowed
    return models


def model_not_found(model: str) -> errors.NotFound:
    """OpenAI's answer for a model that does not exist or that the caller may not use."""
    return errors.NotFound(
        f"The model '{model}' does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


class Authenticator:
    def __init__(
        self, api_keys: dict[str, str], tenant_models: dict[str, frozenset[str]] | None = None
    ) -> None:
        self._models = tenant_models or {}
        self._keys = list(api_keys.items())
        if not self._keys:
            log.warning(
                "no API keys configured: single-tenant mode, every caller is tenant 'default'"
            )

    @property
    def single_tenant(self) -> bool:
        return not self._keys

    def tenant(self, authorization: str | None) -> str:
        """The caller's tenant; raises :class:`errors.Unauthenticated` for a missing or wrong key."""
        if not self._keys:
            return SINGLE_TENANT
        if not authorization:
            raise errors.Unauthenticated(
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                code="missing_api_key",
            )
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() == "bearer" and token:
            # Compare against every key so the time taken does not tell which one was close.
            found = None
            for key, tenant in self._keys:
                if hmac.compare_digest(key.encode(), token.encode()):
                    found = tenant
            if found is not None:
                return found
        raise errors.Unauthenticated("Incorrect API key provided.", code="invalid_api_key")

    def models_of(self, tenant: str) -> frozenset[str] | None:
        """The models the tenant may use; None when it may use every one."""
        return self._models.get(tenant) if self._models else None

    def check_model(self, tenant: str, model: str) -> None:
        """Raises 404 ``model_not_found`` when the tenant may not use ``model``; a tenant with
        models of its own must name one (400 ``missing_required_parameter`` for an empty one)."""
        if not self._models:
            return
        allowed = self._models.get(tenant)
        if allowed is None or model in allowed:
            return
        if not model:
            raise checks.missing("model")
        raise model_not_found(model)
