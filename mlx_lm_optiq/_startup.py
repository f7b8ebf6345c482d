"""Interpreter-start half of the runtime shim. Standard library only at start-up.

``mlx_lm_optiq.pth`` in site-packages runs one guarded line at every Python
start that calls :func:`install`. That puts a finder at the front of
``sys.meta_path`` which notices when ``mlx_lm.tuner.utils`` or ``mlx_lm.lora``
finish executing and then hands the fresh module to
``mlx_lm_optiq.shim.on_import``, the only code that touches mlx-lm internals.
Nothing here imports mlx, numpy or pluggy, so a Python that never imports
mlx-lm pays for two tiny module imports and nothing else.

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

    def __getattr__(self, name):
        return getattr(self.loader, name)


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
    command stops instead.
    """
    global failure
    if failure is not None:
        return _refuse_if_requested(module.__name__)
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


def _refuse_if_requested(module_name):
    if module_name != "mlx_lm.lora" or not _rank_scaling_requested(sys.argv):
        return
    raise SystemExit(
        "mlx-lm-optiq: --rank-scaling was asked for, but the plugin could not "
        f"hook into mlx-lm: {failure}\n"
        "Install a supported mlx-lm (see `pip show mlx-lm-optiq`), or drop "
        "--rank-scaling / rank_scaling to train with stock mlx-lm."
    )


def _rank_scaling_requested(argv):
    argv = argv[1:]
    if any(a == "--rank-scaling" or a.startswith("--rank-scaling=") for a in argv):
        return True
    for flag in ("-c", "--config"):
        if flag in argv[:-1]:
            try:
                import yaml  # mlx-lm's own config reader; only on this failure path

                with open(argv[argv.index(flag) + 1]) as f:
                    config = yaml.safe_load(f)
            except Exception:  # noqa: BLE001 - mlx-lm will report a bad config
                return False
            return isinstance(config, dict) and config.get("rank_scaling") is not None
    return False


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
