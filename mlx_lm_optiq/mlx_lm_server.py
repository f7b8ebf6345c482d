"""The boundary with mlx-lm's server: every name of ``mlx_lm.server`` serving relies on.

mlx-lm's server has no extension points, so serving many adapters reaches
into it, here and nowhere else. :data:`RELIES_ON` lists each name used
beyond its command line, with what it is used for, and importing this module
checks them against the installed mlx-lm (:func:`check_server`): a newer
mlx-lm fails at start-up naming what is missing, never with an
``AttributeError`` in the middle of a request.

What a request gets is decided in :mod:`mlx_lm_optiq.serve_api`; the
adapters and their layers are :mod:`mlx_lm_optiq.registry`'s.
"""

import contextlib
import io
import json
import logging
import sys
from typing import List

import mlx_lm
import mlx_lm.server as server

from . import serve_api
from .errors import OptiqError
from .registry import AdapterKey, AdapterRegistry

# mlx_lm/server.py as of 0.32.2: name -> what serving uses it for
RELIES_ON = {
    "main": "parses mlx-lm's own options from sys.argv and calls run()",
    "run": "what main() calls with ModelProvider(args): replaced, because it "
    "does not pass a handler class on to _run_http_server",
    "ModelProvider": "subclassed and given to main(): adapters switch where "
    "models load",
    "ModelProvider._load": "(private) loads (model, adapter, draft) for a request: "
    "overridden to swap resident adapters in instead of reloading",
    "ModelProvider.load": "maps a request's model and adapter through "
    "_adapter_map, then calls _load",
    "APIHandler": "subclassed: the adapter field and /v1/adapters",
    "APIHandler.validate_model_parameters": "where a request's fields are checked "
    "(a ValueError is answered 400)",
    "APIHandler.do_POST": "reads a completion's body: capped before it is called",
    "LRUPromptCache": "the prompt cache run() makes",
    "ResponseGenerator": "the generation thread run() makes",
    "_run_http_server": "(private) serves a handler class of our choosing",
}


# ... and attributes a ModelProvider instance has once mlx-lm built it
PROVIDER_ATTRIBUTES = {
    "model": "the model loaded, which adapters are swapped into",
    "model_key": "(model, adapter, draft) of what is loaded: our key is its adapter",
    "_adapter_map": "(private) maps 'default_model' to --adapter-path: emptied",
}


def check_server(module=server) -> None:
    """Every name in :data:`RELIES_ON` exists in ``module`` (mlx-lm's server)."""
    for dotted, why in RELIES_ON.items():
        owner = module
        for part in dotted.split("."):
            owner = getattr(owner, part, None)
        if owner is None:
            raise OptiqError(
                f"mlx-lm {mlx_lm.__version__}'s server has no {dotted}, which "
                f"serving adapters needs ({why}); install a supported mlx-lm"
            )


check_server()


class AdapterProvider(server.ModelProvider):
    """Loads the base model once; a request's adapter is swapped in."""

    registry: AdapterRegistry

    def __init__(self, cli_args):
        super().__init__(cli_args)
        for name, why in PROVIDER_ATTRIBUTES.items():
            if not hasattr(self, name):
                raise OptiqError(
                    f"mlx-lm {mlx_lm.__version__}'s ModelProvider has no {name}, "
                    f"which serving adapters needs ({why}); install a supported mlx-lm"
                )
        # load() replaces the adapter of a request for 'default_model' by
        # --adapter-path through this map: let the request's through.
        self._adapter_map = {}

    def _load(self, model_path, adapter_path=None, draft_model_path=None):
        # adapter_path is the request's adapter: an AdapterKey of ours, never a path
        if adapter_path is not None and not isinstance(adapter_path, AdapterKey):
            raise ValueError("adapters are chosen by name, with 'adapter'")
        if self.model is None or self.model_key[::2] != (model_path, draft_model_path):
            super()._load(model_path, None, draft_model_path)
            self.registry.attach(self.model)
        self.registry.activate(self.model, adapter_path)
        self.model_key = (model_path, adapter_path, draft_model_path)


class AdapterHandler(server.APIHandler):
    """mlx-lm's handler, with the adapter field and /v1/adapters."""

    registry: AdapterRegistry
    adapter_dir = None
    max_request_bytes = serve_api.MAX_REQUEST_BYTES

    def validate_model_parameters(self):
        super().validate_model_parameters()
        cli_args = self.response_generator.cli_args
        self.adapter = serve_api.request_adapter(
            self.registry,
            self.body,
            self.requested_model,
            cli_args.model,
            cli_args.draft_model,
        )

    def _reply(self, status, doc):
        """A JSON reply of ours: CORS only for an origin named in
        --allowed-origins, never for ``*``: a web page may not read it."""
        self.send_response(status)
        self.send_header("Content-type", "application/json")
        origin = self.headers.get("Origin")
        if origin is not None and origin in self.response_generator.cli_args.allowed_origins:  # fmt: skip
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Vary", "Origin")
        self.end_headers()
        self.wfile.write(json.dumps(doc).encode())

    def _length(self):
        try:
            return int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return -1

    def _change_refused(self):
        return serve_api.change_refused(
            self.adapter_dir,
            self.headers.get("Origin"),
            self.response_generator.cli_args.allowed_origins,
        )

    def do_GET(self):
        if self.path.rstrip("/") == serve_api.ADAPTERS:
            return self._reply(*serve_api.list_adapters(self.registry))
        return super().do_GET()

    def do_POST(self):
        if self.path.rstrip("/") != serve_api.ADAPTERS:
            if not 0 <= self._length() <= self.max_request_bytes:
                self.close_connection = True  # the body is left unread
                return self._reply(413, {"error": "request body too large"})
            return super().do_POST()
        refused = self._change_refused()
        if refused:
            return self._reply(*refused)
        length = self._length()
        if not 0 <= length <= serve_api.MAX_BODY_BYTES:
            return self._reply(413, {"error": "request body too large"})
        raw = self.rfile.read(length)
        return self._reply(
            *serve_api.post_adapter(self.registry, self.adapter_dir, raw)
        )

    def do_DELETE(self):
        if not self.path.startswith(serve_api.ADAPTERS + "/"):
            return self._reply(404, {"error": "Not Found"})
        refused = self._change_refused()
        if refused:
            return self._reply(*refused)
        return self._reply(*serve_api.delete_adapter(self.registry, self.path))


@contextlib.contextmanager
def _swapped(module, **names):
    saved = {name: getattr(module, name) for name in names}
    for name, value in names.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


@contextlib.contextmanager
def _argv(argv):
    saved, sys.argv = sys.argv, [sys.argv[0], *argv]
    try:
        yield
    finally:
        sys.argv = saved


def server_options_help() -> str:
    """The options section of ``mlx_lm.server --help``: what ``serve`` passes on."""
    text = io.StringIO()
    with _argv(["--help"]), contextlib.redirect_stdout(text):
        try:
            server.main()
        except SystemExit:
            pass
    _, _, options = text.getvalue().partition("options:\n")
    lines = options.splitlines()
    # its own -h line (ours is above) and the help text's wrapped continuation
    while lines and (
        lines[0].lstrip().startswith("-h") or lines[0].startswith(" " * 8)
    ):
        lines.pop(0)
    return "\n".join(lines)


def serve(
    argv: List[str],
    registry: AdapterRegistry,
    adapter_dir=None,
    max_request_bytes: int = serve_api.MAX_REQUEST_BYTES,
) -> None:
    """Run mlx-lm's server (its options in ``argv``) with ``registry``'s
    adapters resident, until it is stopped."""
    provider = type("AdapterProvider", (AdapterProvider,), {"registry": registry})
    handler = type(
        "AdapterHandler",
        (AdapterHandler,),
        {"registry": registry, "adapter_dir": adapter_dir,
         "max_request_bytes": max_request_bytes},
    )  # fmt: skip

    def run(host, port, model_provider):
        prompt_cache = server.LRUPromptCache(model_provider.cli_args.prompt_cache_size)
        generator = server.ResponseGenerator(model_provider, prompt_cache)
        logging.info("adapters: %s", ", ".join(registry.names()) or "none")
        server._run_http_server(host, port, generator, handler_class=handler)

    with _swapped(server, run=run, ModelProvider=provider), _argv(argv):
        server.main()
