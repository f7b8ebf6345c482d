"""The adapters a server keeps resident on one base model, and the switch between them.

No HTTP and no knowledge of mlx-lm's server: :class:`AdapterRegistry` holds
each adapter's tensors, builds its LoRA layers around the shared base
layers when it is first used, and swaps them in and out of the model. Any
mix of ranks, written by this plugin, stock mlx-lm, mlx-optiq or PEFT, can
be resident.
"""

import concurrent.futures
import itertools
import re
import sys
import threading
from dataclasses import dataclass
from typing import List, Optional

from . import lora_layers
from .adapter_read import check_modules_fit, load_modules
from .errors import OptiqError
from .ranks import distribution

NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True)
class AdapterKey:
    """One load of one adapter: what a request and the model's caches know it by.

    A name unloaded and loaded again gets a new ``load`` number, so it is a
    new model to every cache keyed by it.
    """

    name: str
    load: int

    def __str__(self):
        return f"{self.name}@{self.load}"


@dataclass
class Resident:
    key: AdapterKey
    path: str
    modules: dict  # {module path: (lora_a, lora_b, scale)}
    pinned: bool = False  # given at start: served as long as the server runs


class AtCapacity(OptiqError):
    """The registry holds ``--max-adapters`` adapters already."""


class Pinned(OptiqError):
    """An adapter given at start, which can't be unloaded."""


class AdapterRegistry:
    """The resident adapters: their tensors, and their LoRA layers once built.

    ``add``/``remove`` run on request threads; ``attach``/``activate`` run on
    the one thread that touches the model.
    """

    def __init__(self, max_adapters: Optional[int] = None):
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

    def add(self, name: str, path, pinned: bool = False) -> dict:
        """Read, check and register the adapter at ``path`` as ``name``;
        ``pinned`` ones (given at start) can't be removed."""
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise OptiqError(
                f"adapter name {name!r}: use 1 to 64 letters, digits, '.', '_' or '-'"
            )
        try:
            modules = self._loader.submit(self._read, path).result()
        except (OptiqError, OSError):
            raise
        except Exception as e:  # noqa: BLE001 - whatever a file makes the readers raise
            raise OptiqError(f"can't be read: {type(e).__name__}: {e}", path) from e
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
            key = AdapterKey(name, next(self._loads))
            self._adapters[name] = Resident(key, str(path), modules, pinned)
            return self._describe(name)

    @staticmethod
    def _read(path):
        import mlx.core as mx

        modules, _ = load_modules(path)
        # Materialize here: MLX streams are per thread, and the generation
        # thread can't evaluate arrays still pending on this thread's stream.
        mx.eval([t for a, b, _ in modules.values() for t in (a, b)])
        return modules

    def remove(self, name: str) -> bool:
        """Unload ``name``; its layers go now, or once no stream uses them.
        False for an unknown name; a pinned adapter raises :class:`Pinned`."""
        with self._lock:
            if name in self._adapters and self._adapters[name].pinned:
                raise Pinned(
                    f"adapter {name!r} was given with --adapter at start: it is "
                    "served as long as the server runs"
                )
            entry = self._adapters.pop(name, None)
            if entry is not None and entry.key != self._active:
                self._layers.pop(entry.key, None)
            return entry is not None

    def key(self, name: str) -> Optional[AdapterKey]:
        with self._lock:
            entry = self._adapters.get(name)
            return entry.key if entry else None

    def has(self, name: str) -> bool:
        return name in self._adapters

    def names(self) -> List[str]:
        return sorted(self._adapters)

    def _describe(self, name):
        entry = self._adapters[name]
        ranks = distribution({p: a.shape[1] for p, (a, _, _) in entry.modules.items()})
        return {
            "id": name,
            "object": "adapter",
            "source": "--adapter" if entry.pinned else "runtime",
            "modules": len(entry.modules),
            "rank_distribution": {str(r): n for r, n in ranks.items()},
        }

    def describe(self) -> List[dict]:
        with self._lock:
            return [self._describe(name) for name in sorted(self._adapters)]

    def attach(self, model) -> None:
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

    def activate(self, model, key: Optional[AdapterKey]) -> None:
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
            raise OptiqError(f"adapter {key.name!r} was unloaded")
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
