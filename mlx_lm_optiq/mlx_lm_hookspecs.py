"""The backport of ``patches/0002``'s ``mlx_lm/plugins.py``: hookspecs and plugins.

A patched mlx-lm has this module itself as ``mlx_lm.plugins``; with an
unpatched mlx-lm the shim (:mod:`mlx_lm_optiq.shim`) calls the same hooks on
the plugin manager below. Everything from ``import`` on is kept identical to
the file in the patch (a test checks).
"""

import functools
import importlib.metadata
import os
import sys

import pluggy

hookspec = pluggy.HookspecMarker("mlx_lm")
hookimpl = pluggy.HookimplMarker("mlx_lm")


@hookspec
def mlx_lm_lora_add_arguments(parser):
    """Add command-line arguments to ``mlx_lm.lora``.

    Each argument is also a YAML config key, as for mlx-lm's own options.

    :param parser: the ``argparse.ArgumentParser`` of ``mlx_lm.lora``.
    """


@hookspec
def mlx_lm_lora_configure(args):
    """Check the arguments of ``mlx_lm.lora`` before the model is loaded.

    Called once the command line, the YAML config and the defaults are
    merged. Raise ``ValueError`` to stop the command with its message; a
    hook may also complete ``args``.

    :param args: the ``mlx_lm.lora`` arguments (a namespace).
    """


@hookspec(firstresult=True)
def mlx_lm_lora_parameters(args, model):
    """Choose the LoRA parameters the model is converted with.

    Called once per training run, before any layer is converted. Return a new
    ``lora_parameters`` dict (``rank``, ``scale``, ``dropout``, optional
    ``keys`` and ``rank_pattern``), or ``None`` to keep ``args.lora_parameters``.
    Stops at the first non-None result. A hook may also point
    ``args.adapter_path`` somewhere else for the run.

    :param args: the ``mlx_lm.lora`` arguments (a namespace).
    :param model: the loaded model, its layers not yet converted.
    :returns: a ``lora_parameters`` dict or ``None``.
    """


@hookspec(firstresult=True)
def mlx_lm_lora_training_functions(args, model):
    """Choose the loss and the batch iterator of training and evaluation.

    Called before training, and before ``--test`` evaluation, with the model
    as it is trained. Return a dict with ``loss`` and/or ``iterate_batches``
    (called as ``tuner.trainer``'s ``default_loss`` and ``iterate_batches``
    are), or ``None`` to keep mlx-lm's own. Stops at the first non-None
    result.

    :param args: the ``mlx_lm.lora`` arguments.
    :param model: the model, its LoRA layers in place.
    :returns: a dict of training functions or ``None``.
    """


@hookspec(firstresult=True)
def mlx_lm_lora_training_start(args, model, optimizer):
    """Act just before training starts, and choose the optimizer it steps with.

    Called once per training run, with the LoRA layers in place (and a
    ``--resume-adapter-file`` loaded) and mlx-lm's optimizer built. A plugin
    may set the trainable weights' initial values here; return an optimizer
    (e.g. the same one with per-parameter learning rates), or ``None`` to
    keep mlx-lm's. Stops at the first non-None result.

    :param args: the ``mlx_lm.lora`` arguments.
    :param model: the model, its LoRA layers in place.
    :param optimizer: the optimizer mlx-lm built (``mlx.optimizers``).
    :returns: an optimizer or ``None``.
    """


@hookspec
def mlx_lm_lora_training_failed(args, model, error):
    """Act when training stopped with an exception (Ctrl-C's
    ``KeyboardInterrupt`` too), before it propagates.

    A plugin can undo what it set up for the run, and may raise
    ``ValueError`` or ``OSError`` to say in one line what went wrong instead.

    :param args: the ``mlx_lm.lora`` arguments.
    :param model: the model being trained.
    :param error: the exception training raised.
    """


@hookspec
def mlx_lm_lora_adapter_saved(args, model, adapter_path):
    """Act once training has saved the final adapter weights.

    Called in every process of a distributed run; write files only where
    ``mx.distributed.init().rank() == 0``.

    :param args: the ``mlx_lm.lora`` arguments.
    :param model: the trained model.
    :param adapter_path: the adapter directory (a ``pathlib.Path``).
    """


@hookspec(firstresult=True)
def mlx_lm_load_adapters(model, adapter_path):
    """Load an adapter directory that mlx-lm can't load by itself.

    Stops at the first non-None result; return ``None`` to let mlx-lm load it.

    :param model: the model to add the adapter to.
    :param adapter_path: the adapter directory.
    :returns: the model with the adapter applied, or ``None``.
    """


_plugin_manager = None


def get_plugin_manager() -> pluggy.PluginManager:
    """The plugin manager, with the installed plugins loaded on first use.

    Set ``MLX_LM_NO_PLUGINS=1`` to load none.
    """
    global _plugin_manager
    if _plugin_manager is None:
        pm = pluggy.PluginManager("mlx_lm")
        pm.add_hookspecs(sys.modules[__name__])
        if not os.environ.get("MLX_LM_NO_PLUGINS"):
            load_plugins(pm, "mlx_lm")
        _plugin_manager = pm
    return _plugin_manager


def load_plugins(pm, group, label=None, allowed=None):
    """Register every plugin of the entry-point ``group`` on ``pm``.

    A plugin that fails to import (or exits while importing) is skipped, and
    one whose hook breaks later is disabled, each with one line on stderr;
    the command goes on as if it were not installed. A hook stops the command
    on purpose by raising ``ValueError`` or ``OSError``: those pass through,
    marked with the plugin's name (``error.mlx_lm_plugin``).

    Args:
        pm: the plugin manager.
        group: the entry-point group.
        label: how the lines on stderr start (default: ``group``).
        allowed: if given, ``allowed(name)`` says whether to load a plugin.
    """
    label = label or group
    for ep in importlib.metadata.entry_points(group=group):
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        if allowed is not None and not allowed(ep.name):
            continue
        try:
            plugin = ep.load()
        except (
            BaseException
        ) as e:  # a plugin that can't import is skipped, whatever it raised
            print(
                f"{label}: skipped plugin {ep.name!r} ({ep.value}): "
                f"{type(e).__name__}: {e}",
                file=sys.stderr,
            )
            continue
        register_guarded(pm, plugin, ep.name, label)


class GuardedPlugin:
    """Stands in for a plugin on the plugin manager, with its hooks guarded."""

    def __init__(self, plugin):
        self.plugin = plugin
        self.__name__ = getattr(plugin, "__name__", type(plugin).__name__)


def register_guarded(pm, plugin, name, label=None):
    """Register ``plugin`` under ``name`` so that a broken hook disables it alone."""
    label = label or pm.project_name
    guarded = GuardedPlugin(plugin)
    for attr in dir(plugin):
        opts = pm.parse_hookimpl_opts(plugin, attr)
        if opts is None:
            continue
        function = getattr(plugin, attr)
        if opts.get("wrapper"):
            function = _guard_wrapper(pm, function, name, label)
        elif not opts.get("hookwrapper"):
            function = _guard(pm, function, name, label)
        setattr(guarded, attr, function)
    pm.register(guarded, name=name)


def _mark(error, name):
    if getattr(error, "mlx_lm_plugin", None) is None:
        error.mlx_lm_plugin = name


def _disable(pm, name, label, function, error):
    if pm.get_plugin(name) is not None:
        pm.unregister(name=name)
        print(
            f"{label}: disabled plugin {name!r}: {function.__name__} raised "
            f"{type(error).__name__}: {error}",
            file=sys.stderr,
        )


def _guard_wrapper(pm, function, name, label):
    """A wrapper hook (``wrapper=True``) that disables its plugin alone when it
    breaks, before or after its ``yield``; the other implementations run, and
    the call's result or error is theirs."""

    @functools.wraps(function)
    def guarded(*args, **kwargs):
        steps = function(*args, **kwargs)
        try:
            next(steps)
        except (ValueError, OSError) as e:
            _mark(e, name)
            raise
        except (Exception, SystemExit) as e:  # also a wrapper that never yields
            _disable(pm, name, label, function, e)
            return (yield)
        try:
            result = yield
        except BaseException as inner:
            try:
                steps.throw(inner)
            except StopIteration as done:
                return done.value
            except (ValueError, OSError) as e:
                if e is not inner:
                    _mark(e, name)
                raise
            except (Exception, SystemExit) as e:
                if e is not inner:
                    _disable(pm, name, label, function, e)
                raise inner
            raise inner  # it yielded twice: not a wrapper pluggy can run
        try:
            steps.send(result)
        except StopIteration as done:
            return done.value
        except (ValueError, OSError) as e:
            _mark(e, name)
            raise
        except (Exception, SystemExit) as e:
            _disable(pm, name, label, function, e)
        return result

    return guarded


def _guard(pm, function, name, label):
    @functools.wraps(function)
    def guarded(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except (ValueError, OSError) as e:
            _mark(e, name)
            raise
        except (Exception, SystemExit) as e:
            _disable(pm, name, label, function, e)
            return None

    return guarded
