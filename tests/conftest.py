import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import tiny_model  # noqa: E402

BIN = Path(sys.executable).parent

# A short, deterministic training run on the tiny model.
TRAIN_ARGS = [
    "--train",
    "--iters", "4",
    "--batch-size", "2",
    "--val-batches", "1",
    "--steps-per-eval", "100",
    "--steps-per-report", "2",
    "--num-layers", "2",
    "--learning-rate", "1e-3",
    "--seed", "3",
]  # fmt: skip


def run(cmd, env=None, check=True, timeout=300, cwd=None, **popen):
    """Run ``cmd`` (a list) with the test interpreter's tools on PATH.

    ``popen``: more ``subprocess.run`` arguments (``umask``, ``preexec_fn``).
    """
    full_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    full_env.pop("MLX_LM_OPTIQ_DISABLE", None)
    full_env.update(env or {})
    proc = subprocess.run(
        [str(c) for c in cmd],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=cwd,
        **popen,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
            f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        )
    return proc


def lora(*args, env=None, check=True, **popen):
    """The real ``mlx_lm.lora`` console script in a subprocess."""
    return run([BIN / "mlx_lm.lora", *args], env=env, check=check, **popen)


MLX_LM_SDIST = "mlx-lm==0.32.2"


@pytest.fixture(scope="session")
def mlx_lm_sdist(tmp_path_factory):
    """The mlx-lm 0.32.2 source distribution from the package index, unpacked."""
    root = tmp_path_factory.mktemp("sdist")
    run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
         "--no-binary", ":all:", MLX_LM_SDIST, "-d", root])  # fmt: skip
    with tarfile.open(next(root.glob("mlx_lm-*.tar.gz"))) as tar:
        tar.extractall(root, filter="data")
    return next(p for p in root.glob("mlx_lm-*") if p.is_dir())


@pytest.fixture(scope="session")
def patched_python(tmp_path_factory, mlx_lm_sdist):
    """Python of a throwaway virtualenv whose mlx-lm is 0.32.2 with ``patches/``.

    The venv holds only the patched mlx-lm; everything else (mlx, this plugin)
    comes from the test environment through a ``.pth`` line after it.
    """
    root = tmp_path_factory.mktemp("patched")
    src = root / mlx_lm_sdist.name
    shutil.copytree(mlx_lm_sdist, src)
    run(["git", "apply", *sorted((ROOT / "patches").glob("*.patch"))], cwd=src)
    venv = root / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            python,
            "install",
            "-q",
            "--no-deps",
            src,
        ]
    )
    site = next((venv / "lib").glob("python3*/site-packages"))
    outer = sysconfig.get_paths()["purelib"]
    (site / "zz_test_environment.pth").write_text(
        f"import site; site.addsitedir({outer!r})\n"
    )
    return python


class Cli:
    """How to run ``mlx_lm.lora``: through the shim, or on patched mlx-lm."""

    def __init__(self, name, command, env):
        self.name, self.command, self.env = name, command, env
        self.python = Path(command[0]) if name == "patched" else Path(sys.executable)

    def lora(self, *args, env=None, check=True):
        return run([*self.command, *args], env={**self.env, **(env or {})}, check=check)

    def __repr__(self):
        return self.name


@pytest.fixture(scope="module", params=["shim", "patched"])
def cli(request):
    if request.param == "shim":
        return Cli("shim", [BIN / "mlx_lm.lora"], {})
    python = request.getfixturevalue("patched_python")
    return Cli(
        "patched", [python, "-m", "mlx_lm", "lora"], {"MLX_LM_OPTIQ_DISABLE": "1"}
    )


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def mixed_model(models):
    return tiny_model.build_model(models / "llama-mixed", quantize="mixed")


@pytest.fixture(scope="session")
def fp_model(models):
    return tiny_model.build_model(models / "llama-fp", quantize=None)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return tiny_model.build_dataset(tmp_path_factory.mktemp("data"))


def train_by_bits(run_lora, out, model, data):
    """``--rank-scaling by_bits --rank 4`` through ``run_lora``; the log lands in ``out``."""
    proc = run_lora(
        "--model", model, "--data", data, *TRAIN_ARGS,
        "--rank-scaling", "by_bits", "--rank", "4", "--adapter-path", out,
    )  # fmt: skip
    out.joinpath("train.log").write_text(proc.stdout + proc.stderr)
    return out


@pytest.fixture(scope="session")
def by_bits_adapter(tmp_path_factory, mixed_model, data_dir):
    """An adapter trained through the CLI with ``--rank-scaling by_bits``."""
    out = tmp_path_factory.mktemp("adapters") / "by_bits"
    return train_by_bits(lora, out, mixed_model, data_dir)


def read_json(path):
    return json.loads(Path(path).read_text())


def expected_by_bits(model_path, base_rank, layers):
    """Ranks by_bits must give the tiny mixed model's last ``layers`` blocks."""
    n = read_json(Path(model_path) / "config.json")["num_hidden_layers"]
    return {
        path: base_rank * (2 if path.endswith(tiny_model.EIGHT_BIT) else 1)
        for path in tiny_model.linear_dims(model_path)
        if int(path.split(".")[2]) >= n - layers
    }


def entry_point_plugin(root, name, source, group="mlx_lm_optiq"):
    """A plugin module installed through a real entry point: a ``.dist-info``
    directory and the module, in ``root/site-NAME`` (put it on PYTHONPATH)."""
    site = Path(root) / f"site-{name}"
    dist = site / f"{name}-0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0\n")
    (dist / "entry_points.txt").write_text(f"[{group}]\n{name} = {name}_plugin\n")
    (site / f"{name}_plugin.py").write_text(source)
    return site
