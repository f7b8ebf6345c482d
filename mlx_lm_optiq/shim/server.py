"""The shim's serving side: many resident adapters on mlx-lm's server."""

import mlx.nn as nn

from .lora import _linear_dims


def linear_dims(model):
    """``{module path: (in, out)}`` of every linear layer (quantized or not)."""
    return {
        path: _linear_dims(module)
        for path, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.QuantizedLinear))
    }


def lora_layers(model, modules):
    """``[(module path, LoRALinear)]`` around the model's own base layers.

    Args:
        model: the base model (its linear layers are shared, not copied).
        modules: ``{module path: (lora_a (in, r), lora_b (r, out), scale)}``.
    """
    from mlx_lm.tuner.lora import LoRALinear

    base = dict(model.named_modules())
    layers = []
    for path, (lora_a, lora_b, scale) in modules.items():
        # from_base draws a random lora_a that is replaced right away, as
        # mlx-lm's own adapter loading does
        layer = LoRALinear.from_base(base[path], r=lora_a.shape[1], scale=scale)
        layer.lora_a, layer.lora_b = lora_a, lora_b
        layers.append((path, layer))
    return layers


def serve(argv, registry):
    """Run mlx-lm's server with ``registry``'s adapters resident on one base.

    Each request picks an adapter by name in its ``adapter`` field (mlx-lm's
    ``adapters`` works too); the model provider swaps LoRA layers in place of
    reloading the model, and because the adapter name is part of mlx-lm's
    model key, its batches and prompt cache are kept per adapter.
    """
    import json
    import logging
    import sys

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
                raise ValueError(
                    f"unknown adapter {name!r}; known adapters: {', '.join(registry.names()) or 'none'}"
                )
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
