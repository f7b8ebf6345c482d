"""Interpreter-start half of the runtime shim. Standard library only at start-up.

``mlx_lm_optiq.pth`` in site-packages runs one guarded line at every Python
start that calls :func:`install`. That puts a finder at the front of
``sys.meta_path`` which notices when ``mlx_lm.tuner.utils`` or ``mlx_lm.lora``
finish executing and then hands the fresh module to
``mlx_lm_optiq.shim.on_import``, the only code that touches mlx-lm internals.
``python -m mlx_lm.lora`` runs the module as ``__main__``, which no import
hook sees: its code is then replaced by "import ``mlx_lm.lora``, then run its
``if __name__ == "__main__":`` block with that module's names", so the hooked
module is the one that runs. Nothing here imports mlx, numpy or pluggy, so a
Python that never imports mlx-lm pays for two tiny module imports and nothing
else.

Set ``MLX_LM_OPTIQ_DISABLE=1`` to turn the shim off.
"""

import os
import sys

DISABLE_ENV = "MLX_LM_OPTIQ_DISABLE"

# module name -> "module:function" called with the module once it has executed
POST_IMPORT_HOOKS = {
    "mlx_lm.tuner.utils": "mlx_lm_optiq.shim:on_import",
    "mlx_lm.lora": "mlx_lm_optiq.shim:on_import",
}

# Why the shim could not patch mlx-lm in this process, if it could not.
failure = None


def disabled() -> bool:
    """``MLX_LM_OPTIQ_DISABLE`` is ``1``, ``true`` or ``yes`` (any case)."""
    return os.environ.get(DISABLE_ENV, "").strip().lower() in ("1", "true", "yes")


class _HookedLoader:
    """Runs the wrapped loader, then the post-import hook for the module."""

    def __init__(self, loader, hook):
        self.loader = loader
        self.hook = hook

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        # Leave no trace of ourselves on the module.
        module.__loader__ = self.loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self.loader
        run_hook(self.hook, module)

    def get_code(self, fullname):
        # runpy asks for the code of the module `python -m` runs while
        # sys.argv[0] is still "-m"; imports never call this method here
        if sys.argv[:1] == ["-m"] and _is_run_module(fullname):
            main = _as_main(fullname, self.loader)
            if main is not None:
                return main
        return self.loader.get_code(fullname)

    def __getattr__(self, name):
        return getattr(self.loader, name)


def _is_run_module(fullname):
    argv = getattr(sys, "orig_argv", [])
    pairs = zip(argv, argv[1:])
    return any(a == "-m" and b == fullname for a, b in pairs) or f"-m{fullname}" in argv


_MAIN_TESTS = ("__name__ == '__main__'", '__name__ == "__main__"')


def _as_main(fullname, loader):
    """Code for ``__main__`` that imports ``fullname`` (so its post-import hook
    runs) and then runs the module's ``__main__`` block with its names."""
    import ast

    try:
        source = loader.get_source(fullname)
        filename = loader.get_filename(fullname)
    except (ImportError, OSError, AttributeError):
        return None
    tree = ast.parse(source, filename)
    blocks = [
        node.body
        for node in tree.body
        if isinstance(node, ast.If) and ast.unparse(node.test) in _MAIN_TESTS
    ]
    if not blocks:
        return None
    prologue = ast.parse(
        "import importlib as __optiq_importlib\n"
        f"__optiq_module = __optiq_importlib.import_module({fullname!r})\n"
        "globals().update({k: v for k, v in vars(__optiq_module).items() "
        "if not k.startswith('__')})\n"
    ).body
    module = ast.Module(body=[*prologue, *blocks[-1]], type_ignores=[])
    return compile(ast.fix_missing_locations(module), filename, "exec")


class PostImportFinder:
    """A meta path finder that only ever decorates other finders' specs."""

    def find_spec(self, fullname, path=None, target=None):
        hook = POST_IMPORT_HOOKS.get(fullname)
        if hook is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _HookedLoader(spec.loader, hook)
        return spec


def run_hook(hook: str, module) -> None:
    """Call ``hook`` ("module:function") with ``module``; never raise.

    A failure leaves mlx-lm unpatched (it then behaves as stock) and prints
    one line saying what was skipped. If this very command asked for rank
    scaling, failing open would silently train the wrong thing, so the
    command stops instead; ``train_model`` called from Python with the
    plugin's options raises.
    """
    global failure
    if failure is not None:
        _refuse_if_requested(module.__name__)
        return _guard_in_process(module)
    try:
        import importlib

        name, func = hook.split(":")
        getattr(importlib.import_module(name), func)(module)
    except Exception as e:  # noqa: BLE001 - start-up code must never raise
        failure = f"{type(e).__name__}: {e}"
        print(
            f"mlx-lm-optiq: not active, mlx-lm runs unmodified ({failure})",
            file=sys.stderr,
        )
        _refuse_if_requested(module.__name__)
        _guard_in_process(module)


def _guard_in_process(module):
    """``mlx_lm.lora.train_model`` called from Python with the plugin's
    options raises :class:`~mlx_lm_optiq.errors.OptiqError` (never raises here)."""
    if module.__name__ != "mlx_lm.lora":
        return
    try:
        from mlx_lm_optiq import shim
        from mlx_lm_optiq.errors import OptiqError

        def check(args):
            asked = _options_set(args)
            if asked:
                raise OptiqError(_refusal(asked))

        shim.guard_train_model(module, check)
    except Exception:  # noqa: BLE001 - the shim itself may be what is broken
        pass


def _refusal(asked) -> str:
    return (
        f"mlx-lm-optiq: {', '.join(asked)} {'was' if len(asked) == 1 else 'were'} "
        f"asked for, but the plugin could not hook into mlx-lm: {failure}\n"
        "Install a supported mlx-lm (see `pip show mlx-lm-optiq`), or drop "
        "these options and YAML keys to train with stock mlx-lm."
    )


def _refuse_if_requested(module_name):
    if module_name != "mlx_lm.lora":
        return
    asked = _options_requested(sys.argv[1:])
    if not asked:
        return
    raise SystemExit(_refusal(asked))


def _options_set(namespace) -> list:
    """The plugin's options (as ``--flags``) that ``namespace`` sets."""
    from mlx_lm_optiq import settings

    return [
        settings.option_name(f.name)
        for f in settings.options()
        if getattr(namespace, f.name, None) is not None
    ]


def _options_requested(argv):
    """The mlx-lm-optiq options that ``argv`` or its YAML config (``-c X``,
    ``--config X``, ``--config=X``: parsed as mlx-lm parses them) asks for.

    Only on the failure path, so these imports cost start-up nothing.
    """
    import argparse

    from mlx_lm_optiq import settings

    names = [f.name for f in settings.options()]
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-c", "--config")
    for name in names:
        parser.add_argument(settings.option_name(name), dest=name)
    try:
        known, _ = parser.parse_known_args(argv)
    except SystemExit:  # an ambiguous option: as likely ours as not
        return ["options that may be mlx-lm-optiq's"]
    asked = _options_set(known)
    if known.config:
        try:
            import yaml  # mlx-lm's own config reader

            with open(known.config) as f:
                config = yaml.safe_load(f)
        except Exception:  # noqa: BLE001 - mlx-lm will report a bad config
            config = None
        if isinstance(config, dict):
            asked += [
                f"{n} ({known.config})" for n in names if config.get(n) is not None
            ]
    return asked


def install() -> None:
    """Register the post-import hook; patch right away what is already imported."""
    if disabled():
        return
    if not any(isinstance(f, PostImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, PostImportFinder())
    for name, hook in POST_IMPORT_HOOKS.items():
        if name in sys.modules:
            run_hook(hook, sys.modules[name])


def uninstall() -> None:
    """Remove the finder and restore every patched mlx-lm function."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, PostImportFinder)]
    shim = sys.modules.get("mlx_lm_optiq.shim")
    if shim is not None:
        shim.uninstall()
