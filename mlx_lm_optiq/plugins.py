"""The plugin manager of mlx-lm-optiq's extension points (:mod:`.hookspecs`).

The built-ins (:data:`DEFAULT_PLUGINS`) come first, then the entry points of
the ``mlx_lm_optiq`` group, each loaded once and guarded the way mlx-lm's own
plugins are (:func:`mlx_lm_optiq.mlx_lm_hookspecs.load_plugins`): a plugin
that fails to import, exits, or breaks in a hook is disabled with one line
on stderr. ``MLX_LM_OPTIQ_PLUGINS=name,name`` limits which entry points load
(empty: none).
"""

import functools
import os
import sys
from typing import Callable, Dict

import pluggy

from . import builtin, hookspecs
from .mlx_lm_hookspecs import load_plugins

ENTRY_POINT_GROUP = "mlx_lm_optiq"
PLUGINS_ENV = "MLX_LM_OPTIQ_PLUGINS"

DEFAULT_PLUGINS = (builtin,)


def _allowed(name):
    names = os.environ.get(PLUGINS_ENV)
    return names is None or name in {n.strip() for n in names.split(",")}


@functools.lru_cache(maxsize=None)
def get_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    for plugin in DEFAULT_PLUGINS:
        pm.register(plugin, name=plugin.__name__)
    load_plugins(pm, ENTRY_POINT_GROUP, label="mlx-lm-optiq", allowed=_allowed)
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


def rank_policies() -> Dict[str, Callable]:
    """``{name: policy}``, built-ins first."""
    return _collect(
        get_plugin_manager().hook.optiq_register_rank_policies, "rank policy"
    )


def metadata_readers() -> Dict[str, Callable]:
    """``{file name: reader}`` in the order files are tried."""
    return _collect(
        get_plugin_manager().hook.optiq_register_metadata_readers, "metadata reader"
    )
