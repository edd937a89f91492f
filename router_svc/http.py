"""Small HTTP helpers shared by the routes: JSON in and out, and query parameters."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from router_svc import errors
from router_svc.services import Services


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def services(request: Request) -> Services:
    svc: Services = request.app.state.services
    return svc


def tenant(request: Request) -> str:
    return services(request).auth.tenant(request.headers.get("authorization"))


def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def require_json_content_type(request: Request) -> None:
    """A 415 unless the request says its body is JSON (``application/json``, any parameters).

    The point is cross-site requests: a web page may POST to a gateway on localhost (keyless in
    local mode) without a CORS preflight only with a "simple" request, whose Content-Type is
    text/plain, application/x-www-form-urlencoded or multipart/form-data, or which has none at all
    (fetch() and sendBeacon() send none for a Blob or ArrayBuffer body). Refusing every body that is
    not declared JSON leaves such a page only requests the browser preflights, which the router
    never allows (it sends no CORS headers). The openai SDK and every JSON client send
    ``application/json``.
    """
    declared = request.headers.get("content-type", "")
    if _media_type(declared) == "application/json":
        return
    shown = f"'{declared}'" if declared else "missing"
    raise errors.InvalidRequest(
        f"Unsupported Content-Type ({shown}): this endpoint takes a JSON body, sent with "
        "'Content-Type: application/json'.",
        status=415,
        code="unsupported_media_type",
    )


async def read_json(request: Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 in OpenAI's words (a 415 for a body that is
    not declared JSON, see :func:`require_json_content_type`)."""
    require_json_content_type(request)
    limit = services(request).settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise errors.ApiError(
            f"The request body is larger than the limit of {limit} bytes.",
            status=413,
            code="request_too_large",
        )
    raw = await request.body()
    if len(raw) > limit:
        raise errors.ApiError(
            f"The request body is larger than the limit of {limit} bytes.",
            status=413,
            code="request_too_large",
        )
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise errors.InvalidRequest(
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, but "
            "what was sent was not valid JSON.)"
        ) from exc
    if not isinstance(body, dict):
        raise errors.InvalidRequest("The request body must be a JSON object.")
    return body


def query_int(request: Request, name: str, default: int) -> int:
    """An integer query parameter, or a 400 naming it."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise errors.InvalidRequest(
            f"Invalid type for '{name}': expected an integer, but got '{raw}' instead.",
            param=name,
            code="invalid_type",
        ) from exc


def query_limit(request: Request, default: int = 20) -> int:
    value = query_int(request, "limit", default)
    if value < 1 or value > 100:
        raise errors.InvalidRequest(
            f"Invalid 'limit': expected a value between 1 and 100, but got {value} instead.",
            param="limit",
            code="integer_out_of_range",
        )
    return value


def query_order(request: Request, default: str = "desc") -> str:
    order = request.query_params.get("order", default)
    if order not in ("asc", "desc"):
        raise errors.InvalidRequest(
            f"Invalid value for 'order': expected one of asc or desc, but got '{order}' instead.",
            param="order",
            code="invalid_value",
        )
    return order


def list_page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }
