"""Schemathesis hooks for .ci/schemathesis.sh (loaded through SCHEMATHESIS_HOOKS).

They change what is sent, never what is checked:

1. No traffic leaves the machine. Generated orders carry `callback_url`s (pattern ^https?://) and
   `target`s, and generated kinds carry webhook `url`s; a live Tally would call them once the
   order finishes (callbacks) or its tasks run (webhook kinds). Every such URL is replaced by a
   loopback address where nothing listens, so a delivery fails locally instead of reaching a
   random host.
2. The key the run authenticates with is never revoked or rotated. Schemathesis reuses ids it
   saw in responses (GET /api/admin/keys lists the run's own key), so POST
   /api/admin/keys/{id}/revoke and /rotate only ever get ids of keys this run created; any other
   well-formed UUID is swapped for one that exists nowhere (the server answers 404, which the
   document declares). Malformed ids pass through untouched (the 422 path is still exercised).
"""

import re
import threading
import uuid

import schemathesis

LOOPBACK_URL = "http://127.0.0.1:9/schemathesis"
UNKNOWN_KEY_ID = "00000000-5c4e-4d3a-8000-000000000000"
KEY_PATH = re.compile(r"^/api/admin/keys/\{id\}/(revoke|rotate)$")

_lock = threading.Lock()
_created_key_ids = set()


def _looks_like_url(value):
    # As a WHATWG URL parser sees it: tabs and newlines removed, leading C0/space stripped,
    # scheme case-insensitive, "http:host" without slashes accepted.
    cleaned = re.sub(r"[\t\n\r]", "", value).lstrip("\x00\x01\x02\x03\x04\x05\x06\x07\x08\x0b\x0c\x0e\x0f"
                                                       "\x10\x11\x12\x13\x14\x15\x16\x17\x18\x19\x1a\x1b\x1c\x1d\x1e\x1f ")
    return cleaned.lower().startswith(("http:", "https:", "//"))


def _operation(case):
    return case.method.upper(), case.path


@schemathesis.hook
def before_call(context, case, kwargs):
    method, path = _operation(case)
    body = case.body
    if method == "POST" and path == "/api/orders" and isinstance(body, dict):
        if isinstance(body.get("callback_url"), str):
            body["callback_url"] = LOOPBACK_URL
        if isinstance(body.get("target"), str) and _looks_like_url(body["target"]):
            body["target"] = LOOPBACK_URL
    elif method == "PUT" and path == "/api/admin/kinds/{name}" and isinstance(body, dict):
        webhook = body.get("webhook")
        if isinstance(webhook, dict) and isinstance(webhook.get("url"), str):
            webhook["url"] = LOOPBACK_URL
    elif method == "POST" and KEY_PATH.match(path):
        key_id = case.path_parameters.get("id")
        if isinstance(key_id, str):
            try:
                parsed = str(uuid.UUID(key_id))
            except ValueError:
                return  # malformed: let the server answer 422
            with _lock:
                ours = parsed in _created_key_ids
            if not ours:
                case.path_parameters["id"] = UNKNOWN_KEY_ID


@schemathesis.hook
def after_call(context, case, response):
    method, path = _operation(case)
    if method == "POST" and response.status_code == 201 and (path == "/api/admin/keys" or KEY_PATH.match(path)):
        try:
            key_id = response.json()["key"]["id"]
        except Exception:
            return  # response_schema_conformance reports a malformed body
        if isinstance(key_id, str):
            with _lock:
                _created_key_ids.add(key_id.lower())
