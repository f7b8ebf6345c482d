"""Plugin managers: built-ins first, then entry points, each loaded once.

- :func:`get_plugin_manager` serves mlx-lm-optiq's own extension points
  (:mod:`mlx_lm_optiq.hookspecs`, entry-point group ``mlx_lm_optiq``).
- :func:`host_plugin_manager` plays the part of a patched mlx-lm's
  ``mlx_lm.plugins`` for the shim (:mod:`mlx_lm_optiq.mlx_lm_hookspecs`,
  entry-point group ``mlx_lm``).

``MLX_LM_OPTIQ_PLUGINS=name,name`` limits which entry points load (empty: none).
A plugin that fails to load is skipped with one line on stderr.
"""

import functools
import importlib
import importlib.metadata
import os
import sys

import pluggy

from . import hookspecs, mlx_lm_hookspecs

ENTRY_POINT_GROUP = "mlx_lm_optiq"
HOST_ENTRY_POINT_GROUP = "mlx_lm"
PLUGINS_ENV = "MLX_LM_OPTIQ_PLUGINS"

DEFAULT_PLUGINS = ("mlx_lm_optiq.builtin",)
# Registered under its entry-point name, so loading entry points skips it.
HOST_PLUGIN = ("optiq", "mlx_lm_optiq.lora_hooks")


def _allowed(name):
    names = os.environ.get(PLUGINS_ENV)
    return names is None or name in {n.strip() for n in names.split(",")}


def _load_entry_points(pm, group):
    for ep in importlib.metadata.entry_points(group=group):
        if pm.get_plugin(ep.name) is not None or not _allowed(ep.name):
            continue
        try:
            pm.register(ep.load(), name=ep.name)
        except Exception as e:  # noqa: BLE001 - one bad plugin must not break mlx-lm
            print(
                f"mlx-lm-optiq: skipped plugin {ep.name!r} ({ep.value}): "
                f"{type(e).__name__}: {e}",
                file=sys.stderr,
            )


@functools.lru_cache(maxsize=None)
def get_plugin_manager():
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    for name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    _load_entry_points(pm, ENTRY_POINT_GROUP)
    return pm


@functools.lru_cache(maxsize=None)
def host_plugin_manager():
    pm = pluggy.PluginManager(HOST_ENTRY_POINT_GROUP)
    pm.add_hookspecs(mlx_lm_hookspecs)
    name, module = HOST_PLUGIN
    pm.register(importlib.import_module(module), name=name)
    _load_entry_points(pm, HOST_ENTRY_POINT_GROUP)
    return pm


def _collect(hook, what):
    """Run a ``register`` hook; the first registration of a name wins."""
    found = {}

    def register(name, value):
        if name in found:
            print(
                f"mlx-lm-optiq: ignored a second {what} named {name!r}", file=sys.stderr
            )
        else:
            found[name] = value

    hook(register=register)
    return found


def rank_policies():
    """``{name: policy}``, built-ins first."""
    return _collect(
        get_plugin_manager().hook.optiq_register_rank_policies, "rank policy"
    )


def metadata_readers():
    """``{file name: reader}`` in the order files are tried."""
    return _collect(
        get_plugin_manager().hook.optiq_register_metadata_readers, "metadata reader"
    )
