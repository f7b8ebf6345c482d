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
import re
import sys
import threading
from collections import Counter

from .export import load_modules

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
        if self._dims is None:
            return
        for module, (a, b, _) in modules.items():
            if module not in self._dims:
                raise ValueError(
                    f"{path}: {module} is not a linear layer of the served model"
                )
            in_dims, out_dims = self._dims[module]
            if a.shape[0] != in_dims or b.shape[1] != out_dims:
                raise ValueError(
                    f"{path}: {module} adapts a {a.shape[0]}->{b.shape[1]} layer, the "
                    f"served model's is {in_dims}->{out_dims}; is it for another base model?"
                )

    def add(self, name, path):
        if not isinstance(name, str) or not NAME.match(name):
            raise ValueError(
                f"adapter name {name!r}: use letters, digits, '.', '_' or '-'"
            )
        import mlx.core as mx

        modules, _ = load_modules(path)
        # Materialize here: MLX streams are per thread, and the generation
        # thread can't evaluate arrays still pending on this thread's stream.
        mx.eval([t for a, b, _ in modules.values() for t in (a, b)])
        with self._lock:
            if name in self._adapters:
                raise ValueError(f"an adapter named {name!r} is already loaded")
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
        ranks = Counter(a.shape[1] for a, _, _ in modules.values())
        return {
            "id": name,
            "object": "adapter",
            "path": self._adapters[name]["path"],
            "modules": len(modules),
            "rank_distribution": {str(r): n for r, n in sorted(ranks.items())},
        }

    def describe(self):
        with self._lock:
            return [self._describe(name) for name in sorted(self._adapters)]

    def attach(self, model):
        """A (new) base model is loaded: drop, loudly, adapters that don't fit it."""
        from .shim import linear_dims

        with self._lock:
            self._dims = linear_dims(model)
            for name, entry in list(self._adapters.items()):
                try:
                    self._check(name, entry["path"], entry["modules"])
                except ValueError as e:
                    print(
                        f"mlx-lm-optiq: adapter {name!r} unloaded: {e}", file=sys.stderr
                    )
                    del self._adapters[name]
            self._layers.clear()
            self._active = None

    def activate(self, model, name):
        """Swap ``name``'s LoRA layers in (``None``: the base model)."""
        from mlx.utils import tree_unflatten

        from .shim import lora_layers

        if name == self._active:
            return
        if name is not None and name not in self._adapters:
            raise ValueError(f"unknown adapter {name!r}")
        if self._active is not None:
            # back to the shared base layers (also for an adapter removed meanwhile)
            base = [(path, layer.linear) for path, layer in self._layers[self._active]]
            model.update_modules(tree_unflatten(base))
            if self._active not in self._adapters:
                del self._layers[self._active]
            self._active = None
        if name is not None:
            if name not in self._layers:
                self._layers[name] = lora_layers(model, self._adapters[name]["modules"])
            model.update_modules(tree_unflatten(self._layers[name]))
            self._active = name


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
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.help:
        parser.print_help()
        return 0
    registry = AdapterRegistry()
    for name, path in args.adapter:
        try:
            registry.add(name, path)
        except (ValueError, OSError) as e:
            print(f"error: --adapter {name}={path}: {e}", file=sys.stderr)
            return 1
    from .shim import serve

    serve(rest, registry)
    return 0


if __name__ == "__main__":
    sys.exit(main())
