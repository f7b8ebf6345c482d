"""What the server answers about adapters, as plain functions of the request.

The ``/v1/adapters`` endpoints and the ``adapter`` field of a completion
request, decided here from the request's parts and a registry: each
endpoint returns ``(HTTP status, JSON document)``, and nothing here knows
mlx-lm's server (that is :mod:`mlx_lm_optiq.mlx_lm_server`).

Who may change what: loading and unloading at runtime is off unless the
server has an adapter directory, then allowed for paths that resolve inside
it, and never for a cross-origin request from an origin not named in
``--allowed-origins``.
"""

import json
import os
from typing import Optional, Tuple
from urllib.parse import unquote

from .errors import OptiqError
from .layout import CONFIG, MLX_WEIGHTS, PEFT_WEIGHTS, SIDECAR
from .registry import AdapterKey, AdapterRegistry, AtCapacity, Pinned

ADAPTERS = "/v1/adapters"
MAX_BODY_BYTES = 64 * 1024  # POST /v1/adapters
MAX_REQUEST_BYTES = 8 * 1024 * 1024  # a completion (--max-request-bytes)

Reply = Tuple[int, dict]


class Refused(OptiqError):
    """A request this server won't act on (answered 403)."""


def inside(adapter_dir, path) -> str:
    """``path`` (relative to ``adapter_dir``, or absolute) with links resolved,
    if it lies inside ``adapter_dir``; else :class:`Refused`, saying nothing of
    the file system."""
    root = os.path.realpath(adapter_dir)
    resolved = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([root, resolved]) != root:
        raise Refused("adapters load only from the server's --adapter-dir")
    return resolved


def files_inside(adapter_dir, path) -> str:
    """``path`` (from :func:`inside`), if none of the files read from it
    resolves outside ``adapter_dir`` either (a link to a file elsewhere)."""
    root = os.path.realpath(adapter_dir)
    for name in (CONFIG, MLX_WEIGHTS, PEFT_WEIGHTS, SIDECAR):
        file = os.path.join(path, name)
        if os.path.lexists(file):
            resolved = os.path.realpath(file)
            if os.path.commonpath([root, resolved]) != root:
                raise Refused("adapters load only from the server's --adapter-dir")
    return path


def request_adapter(
    registry: AdapterRegistry, body: dict, requested_model, served_model, draft=None
) -> Optional[AdapterKey]:
    """The adapter a completion request asks for (``adapter``, or mlx-lm's
    ``adapters``), or ``None`` for the base model. A ``ValueError`` says what
    is wrong with the request (mlx-lm answers it with a 400)."""
    if body.get("draft_model", "default_model") not in ("default_model", draft):
        raise ValueError(
            "'draft_model' can only name the server's own --draft-model: a request "
            "may not load another model"
        )
    name = body.get("adapter", body.get("adapters"))
    if name is not None and not isinstance(name, str):
        raise ValueError("'adapter' must be the name of an adapter (a string)")
    if registry.names() and requested_model not in ("default_model", served_model):
        raise ValueError(
            f"this server keeps adapters resident on {served_model}; a request for "
            f"another model would unload them: send it to another server"
        )
    if name is None:
        return None
    key = registry.key(name)
    if key is None:
        known = ", ".join(registry.names()) or "none"
        raise ValueError(f"unknown adapter {name!r}; known adapters: {known}")
    return key


def change_refused(adapter_dir, origin, allowed_origins) -> Optional[Reply]:
    """The 403 for a request that may not load or unload adapters, else None.

    Runtime loading is off without an adapter directory, and a web page's
    request may change nothing (CORS ``*`` lets any page POST): only origins
    that ``--allowed-origins`` lists by name may.
    """
    if adapter_dir is None:
        return 403, {
            "error": "runtime loading is off: start the server with --adapter-dir "
            "DIR to POST and DELETE adapters found under DIR"
        }
    if origin is not None and origin not in allowed_origins:
        return 403, {"error": "cross-origin requests may not load or unload adapters"}
    return None


def list_adapters(registry: AdapterRegistry) -> Reply:
    return 200, {"object": "list", "data": registry.describe()}


def post_adapter(registry: AdapterRegistry, adapter_dir, raw: bytes) -> Reply:
    """Load the adapter a ``POST /v1/adapters`` body names (``{"name", "path"}``)."""
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, RecursionError):
        body = None
    if not (
        isinstance(body, dict)
        and isinstance(body.get("name"), str)
        and isinstance(body.get("path"), str)
    ):
        return 400, {"error": 'expected {"name": ..., "path": ...}'}
    try:
        path = files_inside(adapter_dir, inside(adapter_dir, body["path"]))
        return 201, registry.add(body["name"], path)
    except Refused as e:
        return 403, {"error": str(e)}
    except AtCapacity as e:
        return 409, {"error": str(e)}
    except (OptiqError, OSError, ValueError) as e:
        return 400, {"error": _relative(str(e), adapter_dir)}
    except Exception as e:  # noqa: BLE001 - one bad file never stops the server
        return 400, {"error": _relative(f"can't load it: {type(e).__name__}: {e}", adapter_dir)}  # fmt: skip


def _relative(message, adapter_dir):
    """A message that names files inside the adapter directory, not where it is."""
    root = os.path.realpath(adapter_dir)
    return message.replace(root + os.sep, "").replace(str(adapter_dir) + os.sep, "")


def delete_adapter(registry: AdapterRegistry, path: str) -> Reply:
    """Unload the adapter ``DELETE /v1/adapters/NAME`` names."""
    name = unquote(path[len(ADAPTERS) + 1 :])
    try:
        if not registry.remove(name):
            return 404, {"error": f"unknown adapter {name!r}"}
    except Pinned as e:
        return 409, {"error": str(e)}
    return 200, {"deleted": name}
