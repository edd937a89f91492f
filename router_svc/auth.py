"""API keys to tenants.

With keys configured (``--api-keys KEY=TENANT,...``) every request must carry
``Authorization: Bearer KEY``; the key decides the tenant every state call is scoped to. With none
configured the router is single-tenant: every caller is tenant ``default`` and no key is checked.
"""

from __future__ import annotations

import hmac
import logging

from router_svc import errors

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


class Authenticator:
    def __init__(self, api_keys: dict[str, str]) -> None:
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
