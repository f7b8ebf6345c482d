"""Many adapters resident on one base model: ``python -m mlx_lm_optiq.serve``.

    python -m mlx_lm_optiq.serve --model M --adapter math=./math --adapter chat=./chat

mlx-lm's OpenAI-compatible server (all its options work) with every named
adapter kept in memory. A request picks one with ``"adapter": "math"`` (or
none for the base model); switching swaps LoRA layers in and out around the
shared base layers and never reloads weights. Adapters of any mix of ranks,
written by this plugin, stock mlx-lm, mlx-optiq or PEFT, can be resident.

Endpoints added to mlx-lm's: ``GET /v1/adapters`` lists them, ``POST
/v1/adapters`` with ``{"name", "path"}`` loads one, ``DELETE
/v1/adapters/NAME`` unloads one. A bad path or file is a 400 and the server
goes on serving.
"""

import argparse
import json
import logging
import re
import sys
import threading

from . import lora_layers
from .adapter_read import check_modules_fit, load_modules
from .errors import OptiqError
from .ranks import distribution

NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class AdapterRegistry:
    """The resident adapters: their tensors, and their LoRA layers once built.

    ``add``/``remove`` run on request threads; ``attach``/``activate`` run on
    mlx-lm's generation thread, the only one that touches the model.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._adapters = {}  # name -> {"path", "modules"}
        self._layers = {}  # name -> [(module path, LoRALinear)], built on first use
        self._dims = None  # {module path: (in, out)} of the attached base model
        self._active = None

    def _check(self, name, path, modules):
        if self._dims is not None:
            check_modules_fit(path, modules, self._dims)

    def add(self, name, path):
        if not isinstance(name, str) or not NAME.match(name):
            raise OptiqError(
                f"adapter name {name!r}: use letters, digits, '.', '_' or '-'"
            )
        import mlx.core as mx

        modules, _ = load_modules(path)
        # Materialize here: MLX streams are per thread, and the generation
        # thread can't evaluate arrays still pending on this thread's stream.
        mx.eval([t for a, b, _ in modules.values() for t in (a, b)])
        with self._lock:
            if name in self._adapters:
                raise OptiqError(f"an adapter named {name!r} is already loaded")
            self._check(name, path, modules)
            self._adapters[name] = {"path": str(path), "modules": modules}
            return self._describe(name)

    def remove(self, name):
        with self._lock:
            return self._adapters.pop(name, None) is not None

    def has(self, name):
        return name in self._adapters

    def names(self):
        return sorted(self._adapters)

    def _describe(self, name):
        modules = self._adapters[name]["modules"]
        ranks = distribution({p: a.shape[1] for p, (a, _, _) in modules.items()})
        return {
            "id": name,
            "object": "adapter",
            "path": self._adapters[name]["path"],
            "modules": len(modules),
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
                    self._check(name, entry["path"], entry["modules"])
                except OptiqError as e:
                    print(
                        f"mlx-lm-optiq: adapter {name!r} unloaded: {e}", file=sys.stderr
                    )
                    del self._adapters[name]
            self._layers.clear()
            self._active = None

    def activate(self, model, name):
        """Swap ``name``'s LoRA layers in (``None``: the base model)."""
        if name == self._active:
            return
        if name is not None and name not in self._adapters:
            raise OptiqError(f"unknown adapter {name!r}")
        if self._active is not None:
            # back to the shared base layers (also for an adapter removed meanwhile)
            base = [(path, layer.linear) for path, layer in self._layers[self._active]]
            lora_layers.swap_in(model, base)
            if self._active not in self._adapters:
                del self._layers[self._active]
            self._active = None
        if name is not None:
            if name not in self._layers:
                modules = self._adapters[name]["modules"]
                self._layers[name] = lora_layers.lora_layers(model, modules)
            lora_layers.swap_in(model, self._layers[name])
            self._active = name


def serve(argv, registry):
    """Run mlx-lm's server with ``registry``'s adapters resident on one base.

    Each request picks an adapter by name in its ``adapter`` field (mlx-lm's
    ``adapters`` works too); the model provider swaps LoRA layers in place of
    reloading the model, and because the adapter name is part of mlx-lm's
    model key, its batches and prompt cache are kept per adapter.
    """
    import mlx_lm.server as server

    class AdapterProvider(server.ModelProvider):
        def __init__(self, cli_args):
            super().__init__(cli_args)
            # The request's adapter name passes through as the adapter "path".
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
            name = self.body.get("adapter", self.body.get("adapters"))
            if name is not None and not registry.has(name):
                known = ", ".join(registry.names()) or "none"
                # mlx-lm's server answers a ValueError here with a 400
                raise ValueError(f"unknown adapter {name!r}; known adapters: {known}")
            self.adapter = name

        def _reply(self, status, doc):
            self._set_completion_headers(status)
            self.end_headers()
            self.wfile.write(json.dumps(doc).encode())

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/adapters":
                return self._reply(200, {"object": "list", "data": registry.describe()})
            return super().do_GET()

        def do_POST(self):
            if self.path.rstrip("/") != "/v1/adapters":
                return super().do_POST()
            try:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                entry = registry.add(body["name"], body["path"])
            except (KeyError, TypeError):
                return self._reply(
                    400, {"error": 'expected {"name": ..., "path": ...}'}
                )
            except (ValueError, OSError) as e:
                return self._reply(400, {"error": str(e)})
            return self._reply(201, entry)

        def do_DELETE(self):
            prefix = "/v1/adapters/"
            if not self.path.startswith(prefix):
                return self._reply(404, {"error": "Not Found"})
            name = self.path[len(prefix) :]
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
        help="an adapter to keep resident (repeatable): ours, mlx-lm's, mlx-optiq's or PEFT's",
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
    registry = AdapterRegistry()
    for name, path in args.adapter:
        try:
            registry.add(name, path)
        except (OptiqError, OSError) as e:
            print(f"error: --adapter {name}={path}: {e}", file=sys.stderr)
            return 1
    serve(rest, registry)
    return 0


if __name__ == "__main__":
    sys.exit(main())
