"""The boundary with mlx-lm's training code: the backport of ``patches/``, and the probe.

- patch 0001: ``linear_to_lora_layers`` honours ``lora_parameters["rank_pattern"]``
  and ``["scale_pattern"]``
  (rank 0 leaves a module as it is);
- patch 0002: the plugin hook call sites. ``mlx_lm.lora`` calls
  ``mlx_lm_lora_add_arguments`` when it builds its parser,
  ``mlx_lm_lora_configure`` before it loads the model,
  ``mlx_lm_lora_parameters`` before converting layers,
  ``mlx_lm_lora_training_functions`` for what ``train`` and ``evaluate``
  take, ``mlx_lm_lora_training_failed`` when training raises, and
  ``mlx_lm_lora_adapter_saved`` after training; ``load_adapters``
  calls ``mlx_lm_load_adapters`` first; ``main`` reports an error a plugin
  raised on purpose as one line. The hooks run on
  :func:`mlx_lm_optiq.mlx_lm_hookspecs.get_plugin_manager`.
- :func:`conversion_targets`: which modules ``linear_to_lora_layers`` would
  adapt, asked of mlx-lm's own code (patched or not).
- :func:`guard_train_model`: where the patches could not go in, the one
  wrapper left, so that ``train_model`` called from Python refuses the
  plugin's options rather than train stock.

Each patch is a small named function that wraps one name where mlx-lm looks it
up, is idempotent, is undone by :func:`uninstall`, and passes straight through
when nothing is asked of it. With a patched mlx-lm none of the patches runs.
Every swap of an mlx-lm module attribute here holds one lock. It imports
mlx-lm, pluggy and the mlx-lm hookspecs, nothing else of this package.
"""

import contextlib
import contextvars
import functools
import importlib.metadata
import importlib.util
import inspect
import sys
import threading
from pathlib import Path

from .mlx_lm_hookspecs import get_plugin_manager

# The mlx-lm releases the shim is tested with; others are used when they have
# every name it hooks into (FEATURES), with a note.
TESTED_MLX_LM = ((0, 31, 3), (0, 33, 0))

# module -> the names the shim wraps there (where mlx-lm looks them up)
FEATURES = {
    "mlx_lm.tuner.utils": ("linear_to_lora_layers", "load_adapters"),
    "mlx_lm.lora": (
        "build_parser", "run", "train_model", "evaluate_model", "train",
        "evaluate", "main", "linear_to_lora_layers", "load_adapters",
    ),
}  # fmt: skip

_patched = {}  # (module name, attribute) -> original
_lock = threading.RLock()  # guards every swap of mlx-lm module attributes
# (args, model) of the train_model / evaluate_model call in progress
_current_run = contextvars.ContextVar("mlx_lm_optiq_run", default=None)
_noted = []


class UnsupportedMlxLm(RuntimeError):
    pass


def _check_features(module):
    """Every name the shim hooks into exists in ``module``, and ``train`` and
    ``evaluate`` take a ``loss`` and an ``iterate_batches``; else the reason."""
    import mlx_lm

    version = getattr(mlx_lm, "__version__", "?")
    try:
        ours = importlib.metadata.version("mlx-lm-optiq")
    except importlib.metadata.PackageNotFoundError:  # found through its entry point
        raise UnsupportedMlxLm(
            "mlx-lm-optiq is not installed (a source tree on the path?), so "
            "mlx-lm can't find its hooks; install it: pip install -e ."
        ) from None
    for name in FEATURES.get(module.__name__, ()):
        if not callable(getattr(module, name, None)):
            raise UnsupportedMlxLm(
                f"mlx-lm {version} has no {module.__name__}.{name}, which "
                f"mlx-lm-optiq {ours} hooks into"
            )
    if module.__name__ == "mlx_lm.lora":
        for name in ("train", "evaluate"):
            function = getattr(module, name)
            function = getattr(function, "__optiq_original__", function)
            parameters = inspect.signature(function).parameters
            if not {"loss", "iterate_batches"} <= set(parameters):
                raise UnsupportedMlxLm(
                    f"mlx-lm {version}'s {name}() takes no loss and "
                    f"iterate_batches, which mlx-lm-optiq {ours} gives it"
                )
    parsed = tuple(int(p) for p in version.split(".")[:3] if p.isdigit())
    low, high = TESTED_MLX_LM
    if not (low <= parsed < high) and not _noted:
        _noted.append(version)
        print(
            f"mlx-lm-optiq: mlx-lm {version} is not among the releases it was "
            f"tested with (>={'.'.join(map(str, low))},<{'.'.join(map(str, high))}); "
            "every name it hooks into is there, so it does",
            file=sys.stderr,
        )


def guard_train_model(module, check) -> None:
    """Where the shim could not hook ``mlx_lm.lora``: its ``train_model``
    calls ``check(args)`` first (which raises for args that ask for the
    plugin), so an in-process run never trains stock instead."""
    original = getattr(module, "train_model", None)
    if not callable(original) or hasattr(original, "__optiq_original__"):
        return

    def train_model(original, args, *rest, **kwargs):
        check(args)
        return original(args, *rest, **kwargs)

    _wrap(module, "train_model", train_model)


def upstream_has_hooks() -> bool:
    """True for an mlx-lm that carries the ``patches/`` call sites itself."""
    return importlib.util.find_spec("mlx_lm.plugins") is not None


def on_import(module) -> None:
    """Post-import hook: patch ``module`` (``mlx_lm.tuner.utils`` or ``mlx_lm.lora``)."""
    if upstream_has_hooks():
        return
    _check_features(module)
    # Load the plugins now, so a broken or missing dependency fails open here
    # instead of in the middle of a command.
    get_plugin_manager()
    if module.__name__ == "mlx_lm.tuner.utils":
        _wrap(module, "linear_to_lora_layers", _linear_to_lora_layers)
        _wrap(module, "load_adapters", _load_adapters)
    elif module.__name__ == "mlx_lm.lora":
        tuner_utils = sys.modules["mlx_lm.tuner.utils"]
        for name in ("linear_to_lora_layers", "load_adapters"):
            _rebind(module, name, tuner_utils)
        _rebind(sys.modules["mlx_lm.tuner"], "linear_to_lora_layers", tuner_utils)
        _wrap(module, "build_parser", _build_parser)
        _wrap(module, "run", _run)
        _wrap(module, "train_model", _train_model)
        _wrap(module, "evaluate_model", _evaluate_model)
        _wrap(module, "train", _train)
        _wrap(module, "evaluate", _with_training_functions)
        _wrap(module, "main", _main)


def uninstall() -> None:
    """Restore every wrapped function; safe to call more than once."""
    with _lock:
        for (module_name, attr), original in list(_patched.items()):
            module = sys.modules.get(module_name)
            if module is not None:
                setattr(module, attr, original)
            del _patched[(module_name, attr)]


def _wrap(module, attr, wrapper_fn):
    """Replace ``module.attr`` by ``wrapper_fn`` bound to the original, once."""
    with _lock:
        current = getattr(module, attr, None)
        if current is None:
            raise UnsupportedMlxLm(f"{module.__name__}.{attr} not found")
        if hasattr(current, "__optiq_original__"):
            return
        wrapper = functools.wraps(current)(functools.partial(wrapper_fn, current))
        wrapper.__optiq_original__ = current
        _patched[(module.__name__, attr)] = current
        setattr(module, attr, wrapper)


def _rebind(module, attr, source):
    """Point a name imported by value (``from .tuner.utils import load_adapters``)
    at the wrapper that ``source`` now holds."""
    with _lock:
        current = getattr(module, attr, None)
        wrapper = getattr(source, attr)
        if current is None or not hasattr(wrapper, "__optiq_original__"):
            raise UnsupportedMlxLm(f"{module.__name__}.{attr} can't be patched")
        _patched[(module.__name__, attr)] = getattr(
            current, "__optiq_original__", current
        )
        setattr(module, attr, wrapper)


def _hook():
    return get_plugin_manager().hook


# -- The layer classes linear_to_lora_layers looks up by name -----------------


@contextlib.contextmanager
def _lora_classes_replaced(stand_in):
    """Replace each LoRA/DoRA layer class of ``mlx_lm.tuner.utils`` (the names
    its inner ``to_lora`` looks up) by ``stand_in(cls)`` for the block."""
    tuner_utils = sys.modules["mlx_lm.tuner.utils"]
    names = [
        name
        for name, value in vars(tuner_utils).items()
        if isinstance(value, type) and hasattr(value, "from_base")
    ]
    with _lock:
        saved = {name: getattr(tuner_utils, name) for name in names}
        try:
            for name, cls in saved.items():
                setattr(tuner_utils, name, stand_in(cls))
            yield
        finally:
            for name, cls in saved.items():
                setattr(tuner_utils, name, cls)


class _Probe:
    """Records each base layer it is asked to convert and hands it back."""

    def __init__(self, seen):
        self.seen = seen

    def from_base(self, layer, **kwargs):
        self.seen.append(layer)
        return layer


def conversion_targets(
    model, num_layers: int, lora_parameters: dict, use_dora: bool = False
) -> list:
    """``[(module path, module)]`` that ``linear_to_lora_layers`` would adapt.

    Runs mlx-lm's own conversion with stand-in layer classes that hand each
    base layer back unchanged, so the answer follows mlx-lm's rules exactly
    and the model, and the random stream, are left as they were.
    """
    import mlx_lm.tuner.utils as tuner_utils

    paths = {id(m): p for p, m in model.named_modules()}
    seen = []
    convert = tuner_utils.linear_to_lora_layers
    convert = getattr(convert, "__optiq_original__", convert)
    params = {
        k: v
        for k, v in lora_parameters.items()
        if k not in ("rank_pattern", "scale_pattern")
    }
    with _lora_classes_replaced(lambda cls: _Probe(seen)):
        convert(model, num_layers, params, use_dora=use_dora)
    return [(paths[id(layer)], layer) for layer in seen]


# -- Patch 0001: rank_pattern in linear_to_lora_layers ------------------------


class _RankedFactory:
    """Stands in for a LoRA layer class inside ``linear_to_lora_layers``.

    mlx-lm's inner ``to_lora`` calls ``LoRALayer.from_base(layer, r=rank, ...)``
    in a fixed module order; picking ``r`` per base layer here keeps that
    order, and so the random stream, identical to stock.
    """

    def __init__(self, cls, choose):
        self.cls = cls
        self.choose = choose

    def from_base(self, layer, r=8, scale=20.0, **kwargs):
        rank, scale = self.choose(layer, r, scale)
        if rank == 0:
            return layer  # left out: stays the frozen base layer
        return self.cls.from_base(layer, r=rank, scale=scale, **kwargs)


def _linear_to_lora_layers(original, model, num_layers, config, use_dora=False):
    pattern = (config or {}).get("rank_pattern") or {}
    scales = (config or {}).get("scale_pattern") or {}
    if not pattern and not scales:
        return original(model, num_layers, config, use_dora=use_dora)
    by_id = {}
    for path, module in model.named_modules():
        if path in pattern or path in scales:
            if hasattr(module, "to_lora"):
                raise ValueError(
                    f"{path} ({type(module).__name__}) builds its own LoRA layer; "
                    "per-module ranks are not supported for it"
                )
            by_id[id(module)] = path
    used = set()

    def choose(layer, r, scale):
        if id(layer) not in by_id:
            return r, scale
        path = by_id[id(layer)]
        used.add(path)
        return pattern.get(path, r), scales.get(path, scale)

    with _lora_classes_replaced(lambda cls: _RankedFactory(cls, choose)):
        result = original(model, num_layers, config, use_dora=use_dora)
    unused = sorted((set(pattern) | set(scales)) - used)
    if unused:
        raise ValueError(
            f"rank_pattern names {len(unused)} module(s) that were not converted "
            f"to LoRA (e.g. {', '.join(unused[:3])}); check num_layers and keys"
        )
    return result


# -- Patch 0002: the hook call sites ------------------------------------------


def _load_adapters(original, model, adapter_path):
    loaded = _hook().mlx_lm_load_adapters(model=model, adapter_path=Path(adapter_path))
    return loaded if loaded is not None else original(model, adapter_path)


def _build_parser(original):
    parser = original()
    _hook().mlx_lm_lora_add_arguments(parser=parser)
    return parser


def _run(original, args, training_callback=None):
    _hook().mlx_lm_lora_configure(args=args)
    return original(args, training_callback)


def _train_model(original, args, model, train_set, valid_set, training_callback=None):
    lora_parameters = _hook().mlx_lm_lora_parameters(args=args, model=model)
    if lora_parameters is not None:
        args.lora_parameters = lora_parameters
    token = _current_run.set((args, model))
    try:
        result = original(args, model, train_set, valid_set, training_callback)
    finally:
        _current_run.reset(token)
    _hook().mlx_lm_lora_adapter_saved(
        args=args, model=model, adapter_path=Path(args.adapter_path)
    )
    return result


def _evaluate_model(original, args, model, test_set):
    token = _current_run.set((args, model))
    try:
        return original(args, model, test_set)
    finally:
        _current_run.reset(token)


def _with_training_functions(original, *args, **kwargs):
    """``train`` or ``evaluate`` as ``train_model`` / ``evaluate_model`` call
    them, with the loss and batch iterator a plugin chose."""
    current = _current_run.get()
    if current is not None and not {"loss", "iterate_batches"} & set(kwargs):
        run_args, model = current
        functions = _hook().mlx_lm_lora_training_functions(args=run_args, model=model)
        kwargs.update(functions or {})
    return original(*args, **kwargs)


def _train(original, *args, **kwargs):
    """``train`` as ``train_model`` calls it: the plugin's optimizer and
    training functions, and the failure hook if it raises."""
    current = _current_run.get()
    if current is not None and "optimizer" in kwargs:  # as train_model calls it
        run_args, model = current
        kwargs["optimizer"] = (
            _hook().mlx_lm_lora_training_start(
                args=run_args, model=model, optimizer=kwargs["optimizer"]
            )
            or kwargs["optimizer"]
        )
    try:
        return _with_training_functions(original, *args, **kwargs)
    except BaseException as error:  # Ctrl-C too: the run's files are left somewhere
        current = _current_run.get()
        if current is not None:
            run_args, model = current
            _hook().mlx_lm_lora_training_failed(args=run_args, model=model, error=error)
        raise


def _main(original):
    try:
        return original()
    except (ValueError, OSError) as e:
        if getattr(e, "mlx_lm_plugin", None) is None:
            raise
        sys.exit(f"mlx_lm.lora: error: {e}")
