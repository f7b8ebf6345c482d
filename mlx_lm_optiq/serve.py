"""Many adapters resident on one base model: ``python -m mlx_lm_optiq.serve``.

    python -m mlx_lm_optiq.serve --model M --adapter math=./math --adapter chat=./chat \\
        [--adapter-dir ./adapters] [--max-adapters 16]

mlx-lm's OpenAI-compatible server (all its options work) with every named
adapter kept in memory. A request picks one with ``"adapter": "math"`` (or
none for the base model); switching swaps LoRA layers in and out around the
shared base layers and never reloads weights. Adapters of any mix of ranks,
written by this plugin, stock mlx-lm, mlx-optiq or PEFT, can be resident.

Who may load what: adapters named with ``--adapter`` at start are always
served; ``POST /v1/adapters`` (``{"name", "path"}``) and ``DELETE
/v1/adapters/NAME`` work only with ``--adapter-dir DIR``, for paths that
resolve inside DIR, and never from a web page's cross-origin request.
Everything is validated before it is registered: a bad adapter is a 400 and
every other adapter goes on serving, unchanged. ``GET /v1/adapters`` lists
them.
"""

import argparse
import concurrent.futures
import itertools
import json
import logging
import os
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from . import lora_layers
from .adapter_read import check_modules_fit, load_modules
from .errors import OptiqError
from .ranks import distribution

NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
MAX_BODY_BYTES = 64 * 1024


@dataclass
class Resident:
    key: str  # what requests and mlx-lm's caches know it by: new for every load
    path: str
    modules: dict  # {module path: (lora_a, lora_b, scale)}


class AdapterRegistry:
    """The resident adapters: their tensors, and their LoRA layers once built.

    ``add``/``remove`` run on request threads; ``attach``/``activate`` run on
    mlx-lm's generation thread, the only one that touches the model. Every
    load gets a new key (``name@N``), so a name unloaded and loaded again is
    a new model to mlx-lm's batches and prompt cache.
    """

    def __init__(self, max_adapters=None):
        self.max_adapters = max_adapters
        self._lock = threading.Lock()
        # MLX keeps what a thread used to evaluate (its default stream) after
        # the thread ends: load on one thread, not on each request's.
        self._loader = concurrent.futures.ThreadPoolExecutor(1, "adapter-loader")
        self._adapters = {}  # name -> Resident
        self._layers = {}  # key -> [(module path, LoRALinear)], built on first use
        self._dims = None  # {module path: (in, out)} of the attached base model
        self._active = None  # key of the adapter swapped in, or None
        self._loads = itertools.count(1)

    def add(self, name, path):
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise OptiqError(
                f"adapter name {name!r}: use 1 to 64 letters, digits, '.', '_' or '-'"
            )
        modules = self._loader.submit(self._read, path).result()
        with self._lock:
            if name in self._adapters:
                raise OptiqError(f"an adapter named {name!r} is already loaded")
            if (
                self.max_adapters is not None
                and len(self._adapters) >= self.max_adapters
            ):
                raise AtCapacity(
                    f"{len(self._adapters)} adapters are resident, the --max-adapters "
                    "cap; DELETE one first"
                )
            if self._dims is not None:
                check_modules_fit(path, modules, self._dims)
            self._adapters[name] = Resident(
                f"{name}@{next(self._loads)}", str(path), modules
            )
            return self._describe(name)

    @staticmethod
    def _read(path):
        import mlx.core as mx

        modules, _ = load_modules(path)
        # Materialize here: MLX streams are per thread, and the generation
        # thread can't evaluate arrays still pending on this thread's stream.
        mx.eval([t for a, b, _ in modules.values() for t in (a, b)])
        return modules

    def remove(self, name):
        """Unload ``name``; its layers go now, or once no stream uses them."""
        with self._lock:
            entry = self._adapters.pop(name, None)
            if entry is not None and entry.key != self._active:
                self._layers.pop(entry.key, None)
            return entry is not None

    def key(self, name):
        with self._lock:
            entry = self._adapters.get(name)
            return entry.key if entry else None

    def has(self, name):
        return name in self._adapters

    def names(self):
        return sorted(self._adapters)

    def _describe(self, name):
        entry = self._adapters[name]
        ranks = distribution({p: a.shape[1] for p, (a, _, _) in entry.modules.items()})
        return {
            "id": name,
            "object": "adapter",
            "path": entry.path,
            "modules": len(entry.modules),
            "rank_distribution": {str(r): n for r, n in ranks.items()},
        }

    def describe(self):
        with self._lock:
            return [self._describe(name) for name in sorted(self._adapters)]

    def attach(self, model):
        """A (new) base model is loaded: drop, loudly, adapters that don't fit it."""
        with self._lock:
            self._dims = lora_layers.model_linear_dims(model)
            for name, entry in list(self._adapters.items()):
                try:
                    check_modules_fit(entry.path, entry.modules, self._dims)
                except OptiqError as e:
                    print(
                        f"mlx-lm-optiq: adapter {name!r} unloaded: {e}", file=sys.stderr
                    )
                    del self._adapters[name]
            self._layers.clear()
            self._active = None

    def activate(self, model, key):
        """Swap the adapter ``key`` in (``None``: the base model).

        The new layers are built before anything changes, so a failure
        leaves the model serving what it served before.
        """
        if key == self._active:
            return
        with self._lock:
            entry = next((e for e in self._adapters.values() if e.key == key), None)
            live = {e.key for e in self._adapters.values()}
        if key is not None and entry is None:
            raise ValueError(f"adapter {key.split('@')[0]!r} was unloaded")
        layers = None
        if key is not None:
            layers = self._layers.get(key) or lora_layers.lora_layers(
                model, entry.modules
            )
        if self._active is not None:
            # back to the shared base layers (also for an adapter removed meanwhile)
            base = [(path, layer.linear) for path, layer in self._layers[self._active]]
            lora_layers.swap_in(model, base)
            if self._active not in live:
                self._layers.pop(self._active, None)
            self._active = None
        if layers is not None:
            lora_layers.swap_in(model, layers)
            self._layers[key] = layers
            self._active = key


class AtCapacity(OptiqError):
    """The registry holds ``--max-adapters`` adapters already (answered 409)."""


class Refused(OptiqError):
    """A request this server won't act on (answered 403)."""


def inside(adapter_dir, path):
    """``path`` (relative to ``adapter_dir``, or absolute) with links resolved,
    if it lies inside ``adapter_dir``; else :class:`Refused`, saying nothing of
    the file system."""
    root = os.path.realpath(adapter_dir)
    resolved = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([root, resolved]) != root:
        raise Refused("adapters load only from the server's --adapter-dir")
    return resolved


def serve(argv, registry, adapter_dir=None):
    """Run mlx-lm's server with ``registry``'s adapters resident on one base.

    Each request picks an adapter by name in its ``adapter`` field (mlx-lm's
    ``adapters`` works too); the model provider swaps LoRA layers in place of
    reloading the model, and because the adapter's key is part of mlx-lm's
    model key, its batches and prompt cache are kept per adapter.
    """
    import mlx_lm.server as server

    class AdapterProvider(server.ModelProvider):
        def __init__(self, cli_args):
            super().__init__(cli_args)
            # The request's adapter key passes through as the adapter "path".
            self._adapter_map = {}

        def _load(self, model_path, adapter_path=None, draft_model_path=None):
            if self.model is None or self.model_key[::2] != (
                model_path,
                draft_model_path,
            ):
                super()._load(model_path, None, draft_model_path)
                registry.attach(self.model)
            registry.activate(self.model, adapter_path)
            self.model_key = (model_path, adapter_path, draft_model_path)

    class AdapterHandler(server.APIHandler):
        def validate_model_parameters(self):
            super().validate_model_parameters()
            # mlx-lm's server answers a ValueError raised here with a 400
            name = self.body.get("adapter", self.body.get("adapters"))
            if name is not None and not isinstance(name, str):
                raise ValueError("'adapter' must be the name of an adapter (a string)")
            served = self.response_generator.cli_args.model
            if registry.names() and self.requested_model not in (
                "default_model",
                served,
            ):
                raise ValueError(
                    f"this server keeps adapters resident on {served}; a request for "
                    f"another model would unload them: send it to another server"
                )
            key = registry.key(name) if name is not None else None
            if name is not None and key is None:
                known = ", ".join(registry.names()) or "none"
                raise ValueError(f"unknown adapter {name!r}; known adapters: {known}")
            self.adapter = key

        def _reply(self, status, doc):
            self._set_completion_headers(status)
            self.end_headers()
            self.wfile.write(json.dumps(doc).encode())

        def _may_change_adapters(self):
            """Refused, unless runtime loading is on and the request is no web
            page's: CORS ``*`` lets any page POST, so only origins listed by
            name may."""
            if adapter_dir is None:
                raise Refused(
                    "runtime loading is off: start the server with --adapter-dir DIR "
                    "to POST and DELETE adapters found under DIR"
                )
            origin = self.headers.get("Origin")
            allowed = self.response_generator.cli_args.allowed_origins
            if origin is not None and origin not in allowed:
                raise Refused("cross-origin requests may not load or unload adapters")

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/adapters":
                return self._reply(200, {"object": "list", "data": registry.describe()})
            return super().do_GET()

        def do_POST(self):
            if self.path.rstrip("/") != "/v1/adapters":
                return super().do_POST()
            try:
                self._may_change_adapters()
                length = int(self.headers.get("Content-Length") or 0)
                if not 0 <= length <= MAX_BODY_BYTES:
                    return self._reply(413, {"error": "request body too large"})
                body = json.loads(self.rfile.read(length) or b"{}")
                if not (
                    isinstance(body, dict)
                    and isinstance(body.get("name"), str)
                    and isinstance(body.get("path"), str)
                ):
                    return self._reply(
                        400, {"error": 'expected {"name": ..., "path": ...}'}
                    )
                entry = registry.add(body["name"], inside(adapter_dir, body["path"]))
            except Refused as e:
                return self._reply(403, {"error": str(e)})
            except AtCapacity as e:
                return self._reply(409, {"error": str(e)})
            except (OptiqError, OSError, ValueError) as e:
                return self._reply(400, {"error": str(e)})
            except Exception as e:  # noqa: BLE001 - one bad file never stops the server
                return self._reply(
                    400, {"error": f"can't load it: {type(e).__name__}: {e}"}
                )
            return self._reply(201, entry)

        def do_DELETE(self):
            prefix = "/v1/adapters/"
            if not self.path.startswith(prefix):
                return self._reply(404, {"error": "Not Found"})
            try:
                self._may_change_adapters()
            except Refused as e:
                return self._reply(403, {"error": str(e)})
            name = unquote(self.path[len(prefix) :])
            if not registry.remove(name):
                return self._reply(404, {"error": f"unknown adapter {name!r}"})
            return self._reply(200, {"deleted": name})

    saved_run, saved_provider = server.run, server.ModelProvider

    def run(host, port, model_provider):
        prompt_cache = server.LRUPromptCache(model_provider.cli_args.prompt_cache_size)
        generator = server.ResponseGenerator(model_provider, prompt_cache)
        logging.info("adapters: %s", ", ".join(registry.names()) or "none")
        server._run_http_server(host, port, generator, handler_class=AdapterHandler)

    server.run, server.ModelProvider = run, AdapterProvider
    saved_argv = sys.argv
    sys.argv = [saved_argv[0], *argv]
    try:
        server.main()
    finally:
        server.run, server.ModelProvider = saved_run, saved_provider
        sys.argv = saved_argv


def _adapter_arg(text):
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def _count(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive count, got {text!r}")
    return int(text)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m mlx_lm_optiq.serve",
        description="mlx-lm's OpenAI-compatible server with many LoRA adapters "
        "resident on one base model, chosen per request with the 'adapter' field. "
        "Every mlx_lm.server option is accepted too (see mlx_lm.server --help).",
        add_help=False,
    )
    parser.add_argument("-h", "--help", action="store_true", help="show this help")
    parser.add_argument(
        "--adapter",
        type=_adapter_arg,
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="an adapter to keep resident (repeatable): ours, mlx-lm's, mlx-optiq's "
        "or PEFT's",
    )
    parser.add_argument(
        "--adapter-dir",
        metavar="DIR",
        help="allow POST /v1/adapters and DELETE /v1/adapters/NAME at runtime, for "
        "adapter directories that resolve (links followed) inside DIR; without "
        "it they answer 403",
    )
    parser.add_argument(
        "--max-adapters",
        type=_count,
        metavar="N",
        help="at most N adapters resident; a POST beyond it answers 409 until one "
        "is deleted",
    )
    return parser


def main(argv=None):
    from . import _startup

    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.help:
        parser.print_help()
        return 0
    if _startup.disabled():
        print(
            f"error: {_startup.DISABLE_ENV} is set, and serving adapters of mixed "
            "ranks needs the plugin; unset it, or serve stock adapters with "
            "mlx_lm.server",
            file=sys.stderr,
        )
        return 2
    if args.adapter_dir and not Path(args.adapter_dir).is_dir():
        print(
            f"error: --adapter-dir {args.adapter_dir}: not a directory", file=sys.stderr
        )
        return 1
    registry = AdapterRegistry(max_adapters=args.max_adapters)
    for name, path in args.adapter:
        try:
            registry.add(name, path)
        except (OptiqError, OSError) as e:
            print(f"error: --adapter {name}={path}: {e}", file=sys.stderr)
            return 1
    serve(rest, registry, args.adapter_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
