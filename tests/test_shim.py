"""The start-up shim: activation, reversibility, version guard, packaging."""

import re
import subprocess
import sys
import zipfile

import mlx_lm.lora
import mlx_lm.tuner
import mlx_lm.tuner.utils as tuner_utils
import pytest
from conftest import ROOT, run

from mlx_lm_optiq import _startup, shim

WRAPPED = [
    (tuner_utils, "linear_to_lora_layers"),
    (tuner_utils, "load_adapters"),
    (mlx_lm.lora, "linear_to_lora_layers"),
    (mlx_lm.lora, "load_adapters"),
    (mlx_lm.lora, "build_parser"),
    (mlx_lm.lora, "train_model"),
    (mlx_lm.lora, "run"),
    (mlx_lm.lora, "evaluate_model"),
    (mlx_lm.lora, "train"),
    (mlx_lm.lora, "evaluate"),
]


def test_wrappers_are_installed_where_names_are_looked_up():
    for module, name in WRAPPED:
        assert hasattr(getattr(module, name), "__optiq_original__"), (module, name)
    assert mlx_lm.lora.load_adapters is tuner_utils.load_adapters
    # mlx_lm/tuner/__init__.py imported the name after the hook ran
    assert mlx_lm.tuner.linear_to_lora_layers is tuner_utils.linear_to_lora_layers


def test_uninstall_restores_and_install_is_idempotent():
    originals = {(m.__name__, n): getattr(m, n).__optiq_original__ for m, n in WRAPPED}
    _startup.uninstall()
    try:
        for module, name in WRAPPED:
            assert getattr(module, name) is originals[(module.__name__, name)]
        assert not any(isinstance(f, _startup.PostImportFinder) for f in sys.meta_path)
    finally:
        _startup.install()
        _startup.install()
    for module, name in WRAPPED:
        wrapper = getattr(module, name)
        assert wrapper.__optiq_original__ is originals[(module.__name__, name)]
    assert sum(isinstance(f, _startup.PostImportFinder) for f in sys.meta_path) == 1


def test_hooks_pass_through_when_nothing_is_asked():
    from mlx_lm_optiq.mlx_lm_hookspecs import get_plugin_manager

    args = mlx_lm.lora.build_parser().parse_args(["--model", "m"])
    assert args.rank_scaling is None and args.rank is None
    args.resume_adapter_file = None
    hook = get_plugin_manager().hook
    assert hook.mlx_lm_lora_parameters(args=args, model=None) is None


def test_training_functions_reach_train_and_evaluate(
    tmp_path, mixed_model, data_dir, capsys
):
    """A plugin's loss is what training, validation and --test compute."""
    import types

    from conftest import TRAIN_ARGS
    from mlx_lm.tuner.trainer import default_loss

    from mlx_lm_optiq.mlx_lm_hookspecs import get_plugin_manager, hookimpl

    class ConstantLoss:
        @hookimpl
        def mlx_lm_lora_training_functions(self, args, model):
            def loss(model, batch, lengths):
                ce, ntoks = default_loss(model, batch, lengths)
                return ce * 0 + 7.0, ntoks

            return {"loss": loss}

    argv = ["--model", str(mixed_model), "--data", str(data_dir), *TRAIN_ARGS,
            "--test", "--test-batches", "1", "--adapter-path", str(tmp_path / "a")]  # fmt: skip
    args = vars(mlx_lm.lora.build_parser().parse_args(argv))
    for key, value in mlx_lm.lora.CONFIG_DEFAULTS.items():
        if args.get(key) is None:
            args[key] = value
    pm = get_plugin_manager()
    plugin = pm.register(ConstantLoss())
    try:
        mlx_lm.lora.run(types.SimpleNamespace(**args))
    finally:
        pm.unregister(name=plugin)
    out = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)  # mlx-lm's colours
    assert re.search(r"\n\s+4\s+val 7\.000\s", out)  # validation, last iteration
    assert re.search(r"\n\s+4\s+7\.000\s", out)  # training loss, last iteration
    assert "Test loss 7.000" in out


def test_an_mlx_lm_without_what_the_shim_hooks_into_is_refused():
    import types

    lora = types.ModuleType("mlx_lm.lora")
    with pytest.raises(
        shim.UnsupportedMlxLm,
        match=rf"mlx-lm {mlx_lm.__version__} has no mlx_lm.lora.build_parser, "
        "which mlx-lm-optiq 0.1.0 hooks into",
    ):
        shim.on_import(lora)


# mlx-lm with a train() that takes no loss: one the shim can't hook into
UNSUPPORTED = (
    "import sys, mlx_lm.tuner.trainer as t; "
    "t.train = lambda model, optimizer, train_dataset: None; sys.argv[1:] = {argv!r}; "
    "import mlx_lm.lora as l; w = [hasattr(f, '__optiq_original__') for f in "
    "(l.train_model, l.train)]; print('guarded only' if w == [True, False] "
    "else 'wrapped' if all(w) else 'stock')"
)


def test_unsupported_version_fails_open_with_one_line():
    proc = run([sys.executable, "-c", UNSUPPORTED.format(argv=["--train"])])
    # mlx-lm's own train_model, behind a check that refuses the plugin's options
    assert proc.stdout.strip() == "guarded only"
    assert proc.stderr.strip().splitlines() == [
        "mlx-lm-optiq: not active, mlx-lm runs unmodified (UnsupportedMlxLm: "
        f"mlx-lm {mlx_lm.__version__}'s train() takes no loss and iterate_batches, "
        "which mlx-lm-optiq 0.1.0 gives it)"
    ]


def test_another_version_with_every_feature_is_used_with_a_note():
    code = (
        "import mlx_lm; mlx_lm.__version__ = '0.40.1'; import mlx_lm.lora; "
        "print(hasattr(mlx_lm.lora.train_model, '__optiq_original__'))"
    )
    proc = run([sys.executable, "-c", code])
    assert proc.stdout.strip() == "True"
    assert proc.stderr.strip().splitlines() == [
        "mlx-lm-optiq: mlx-lm 0.40.1 is not among the releases it was tested with "
        "(>=0.31.3,<0.33.0); every name it hooks into is there, so it does"
    ]


def test_unsupported_version_with_rank_scaling_stops(tmp_path):
    proc = run(
        [sys.executable, "-c", UNSUPPORTED.format(argv=["--rank-scaling", "by_bits"])],
        check=False,
    )
    assert proc.returncode == 1
    assert (
        "--rank-scaling was asked for, but the plugin could not hook into mlx-lm"
        in proc.stderr
    )
    config = tmp_path / "c.yaml"
    config.write_text("model: m\nrank_scaling: by_kl\n")
    proc = run(
        [sys.executable, "-c", UNSUPPORTED.format(argv=["-c", str(config)])],
        check=False,
    )
    assert proc.returncode == 1 and "could not hook into mlx-lm" in proc.stderr


def test_python_start_is_silent_and_light():
    proc = run([sys.executable, "-c", "pass"])
    assert proc.stdout == proc.stderr == ""
    proc = run([sys.executable, "-X", "importtime", "-c", "pass"])
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines()}
    assert "mlx_lm_optiq._startup" in imported
    for heavy in ("mlx", "mlx.core", "numpy", "pluggy", "mlx_lm"):
        assert heavy not in imported


def test_disable_switch():
    code = "import sys; print(any(type(f).__name__ == 'PostImportFinder' for f in sys.meta_path))"
    assert run([sys.executable, "-c", code]).stdout.strip() == "True"
    proc = run([sys.executable, "-c", code], env={"MLX_LM_OPTIQ_DISABLE": "1"})
    assert proc.stdout.strip() == "False"


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """A fresh virtualenv with nothing but pip."""
    path = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    return path


def _site_packages(venv):
    return next((venv / "lib").glob("python3*/site-packages"))


def _build(kind, out):
    code = (
        f"from hatchling.build import build_{kind}; print(build_{kind}({str(out)!r}))"
    )
    name = run([sys.executable, "-c", code], cwd=ROOT).stdout.strip().splitlines()[-1]
    return out / name


FINDER = "import sys; print([type(f).__name__ for f in sys.meta_path][0])"


@pytest.mark.parametrize("kind", ["wheel", "editable"])
def test_pip_install_activates_and_uninstall_removes(venv, tmp_path, kind):
    wheel = _build(kind, tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert "mlx_lm_optiq.pth" in names
    python, pip = venv / "bin" / "python", [venv / "bin" / "python", "-m", "pip", "-q"]
    run([*pip, "install", "--no-deps", "--no-index", wheel])
    pth = _site_packages(venv) / "mlx_lm_optiq.pth"
    assert pth.read_text() == (ROOT / "mlx_lm_optiq.pth").read_text()
    # no mlx in this venv: start-up is still silent and the finder is in place
    proc = run([python, "-c", FINDER], cwd=tmp_path)
    assert proc.stdout.strip() == "PostImportFinder" and proc.stderr == ""
    run([*pip, "uninstall", "-y", "mlx-lm-optiq"])
    assert not pth.exists()
    proc = run([python, "-c", FINDER], cwd=tmp_path)
    assert proc.stdout.strip() != "PostImportFinder" and proc.stderr == ""


@pytest.mark.parametrize(
    "value, off",
    [("1", True), ("true", True), ("YES", True), (" Yes ", True),
     ("0", False), ("no", False), ("off", False), ("false", False), ("", False)],
)  # fmt: skip
def test_only_1_true_yes_disable(value, off):
    code = "import sys; print(any(type(f).__name__ == 'PostImportFinder' for f in sys.meta_path))"
    proc = run([sys.executable, "-c", code], env={"MLX_LM_OPTIQ_DISABLE": value})
    assert proc.stdout.strip() == ("False" if off else "True")


def test_serve_says_it_needs_the_plugin_when_disabled(tmp_path):
    proc = run(
        [sys.executable, "-m", "mlx_lm_optiq.serve", "--model", tmp_path],
        env={"MLX_LM_OPTIQ_DISABLE": "1"}, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: MLX_LM_OPTIQ_DISABLE is set, and serving adapters of mixed ranks "
        "needs the plugin; unset it, or serve stock adapters with mlx_lm.server"
    )
