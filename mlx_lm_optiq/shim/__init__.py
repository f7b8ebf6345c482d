"""The only package that touches mlx-lm internals.

``__init__`` holds the call sites; ``lora.py`` the LoRA helpers the hook
implementations need (which modules LoRA adapts, building mixed-rank and PEFT
adapters); ``server.py`` the server integration for ``mlx_lm_optiq.serve``.

It backports, into an unpatched mlx-lm, what ``patches/`` proposes upstream:

- ``linear_to_lora_layers`` honours ``lora_parameters["rank_pattern"]``
  (patch 0001);
- the plugin hook call sites (patch 0002): ``mlx_lm.lora`` calls
  ``mlx_lm_lora_add_arguments`` when it builds its parser,
  ``mlx_lm_lora_parameters`` before converting layers and
  ``mlx_lm_lora_adapter_saved`` after training; ``load_adapters`` calls
  ``mlx_lm_load_adapters`` first. The hooks run on
  :func:`mlx_lm_optiq.plugins.host_plugin_manager`.

Each patch is a small named function that wraps one name where mlx-lm looks it
up, checks the mlx-lm version first, is idempotent, is undone by
:func:`uninstall`, and passes straight through when nothing is asked of it.
"""

import functools
import importlib.util
import sys
from pathlib import Path

from .. import SUPPORTED_MLX_LM, __version__
from .lora import (  # noqa: F401 - the helpers hook implementations use
    _linear_to_lora_layers,
    _lock,
    adapted_modules,
    check_mlx_adapter,
    describe_module,
    load_mlx_adapter,
    load_peft_adapter,
    token_sequences,
)
from .server import linear_dims, lora_layers, serve  # noqa: F401

_patched = {}  # (module name, attribute) -> original


class UnsupportedMlxLm(RuntimeError):
    pass


def _check_version():
    import mlx_lm

    version = getattr(mlx_lm, "__version__", "0")
    parsed = tuple(int(p) for p in version.split(".")[:3] if p.isdigit())
    low, high = SUPPORTED_MLX_LM
    if not (low <= parsed < high):
        raise UnsupportedMlxLm(
            f"mlx-lm {version} is not supported by mlx-lm-optiq {__version__} "
            f"(needs >={'.'.join(map(str, low))},<{'.'.join(map(str, high))})"
        )


def upstream_has_hooks():
    """True for an mlx-lm that carries the ``patches/`` call sites itself."""
    return importlib.util.find_spec("mlx_lm.plugins") is not None


def on_import(module):
    """Post-import hook: patch ``module`` (``mlx_lm.tuner.utils`` or ``mlx_lm.lora``)."""
    if upstream_has_hooks():
        return
    _check_version()
    # Import what the call sites will need now, so a broken or missing
    # dependency fails open here instead of in the middle of a command.
    from .. import lora_hooks, plugins  # noqa: F401

    if module.__name__ == "mlx_lm.tuner.utils":
        _wrap(module, "linear_to_lora_layers", _linear_to_lora_layers)
        _wrap(module, "load_adapters", _load_adapters)
    elif module.__name__ == "mlx_lm.lora":
        tuner_utils = sys.modules["mlx_lm.tuner.utils"]
        for name in ("linear_to_lora_layers", "load_adapters"):
            _rebind(module, name, tuner_utils)
        _rebind(sys.modules["mlx_lm.tuner"], "linear_to_lora_layers", tuner_utils)
        _wrap(module, "build_parser", _build_parser)
        _wrap(module, "train_model", _train_model)


def uninstall():
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
    from ..plugins import host_plugin_manager

    return host_plugin_manager().hook


# -- Loading ------------------------------------------------------------------


def _load_adapters(original, model, adapter_path):
    loaded = _hook().mlx_lm_load_adapters(model=model, adapter_path=adapter_path)
    return loaded if loaded is not None else original(model, adapter_path)


# -- The mlx_lm.lora command --------------------------------------------------


def _build_parser(original):
    parser = original()
    _hook().mlx_lm_lora_add_arguments(parser=parser)
    return parser


def _train_model(original, args, model, train_set, valid_set, training_callback=None):
    lora_parameters = _hook().mlx_lm_lora_parameters(args=args, model=model)
    if lora_parameters is not None:
        args.lora_parameters = lora_parameters
    result = original(args, model, train_set, valid_set, training_callback)
    _hook().mlx_lm_lora_adapter_saved(
        args=args, model=model, adapter_path=Path(args.adapter_path)
    )
    return result
