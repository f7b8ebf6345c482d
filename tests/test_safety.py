"""Training never destroys a good adapter; every bad input gets one clean line.

Faults are injected the way they happen: real runs of the real CLI killed
with SIGKILL at several points (by a plugin installed through a real entry
point), a diverging learning rate, a file-size limit standing in for a full
disk, a directory the user can't write.
"""

import hashlib
import json
import os
import resource
import shutil
import stat
import sys
from pathlib import Path

import mlx.core as mx
import mlx_lm
import pytest
from conftest import TRAIN_ARGS, entry_point_plugin, lora, run


def digest(directory):
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(directory).iterdir())
    }


@pytest.fixture
def existing(tmp_path, by_bits_adapter):
    """A good adapter from an earlier run, which the next run must not harm."""
    out = tmp_path / "adapter"
    shutil.copytree(by_bits_adapter, out)
    (out / "train.log").unlink()
    return out


KILLER = """
import os, signal
import mlx.core as mx
from mlx_lm_optiq.hookspecs import hookimpl

AT = os.environ.get("KILL_AT")
_save = mx.save_safetensors
_calls = []


def _saving(path, arrays, *args, **kwargs):
    _calls.append(path)
    if AT == "before-first-save":
        os.kill(os.getpid(), signal.SIGKILL)
    if AT == "mid-save":
        name = str(path) if str(path).endswith(".safetensors") else f"{path}.safetensors"
        with open(name, "wb") as f:
            f.write(b"\\x10" * 64)  # half a file
        os.kill(os.getpid(), signal.SIGKILL)
    return _save(path, arrays, *args, **kwargs)


mx.save_safetensors = _saving


def _kill(run, adapter_dir):
    os.kill(os.getpid(), signal.SIGKILL)


if AT == "after-save":  # before the built-ins complete the sidecar and PEFT files
    optiq_adapter_saved = hookimpl(tryfirst=True)(_kill)
elif AT == "before-move":  # after them, before the set moves into place
    optiq_adapter_saved = hookimpl(_kill)
"""


@pytest.mark.parametrize(
    "at", ["before-first-save", "mid-save", "after-save", "before-move"]
)
def test_a_killed_rerun_leaves_the_previous_adapter_byte_identical(
    tmp_path, existing, mixed_model, data_dir, at
):
    before = digest(existing)
    proc = lora(
        "--model", mixed_model, "--data", data_dir, *TRAIN_ARGS, "--save-every", "2",
        "--rank-scaling", "by_bits", "--rank", "4", "--adapter-path", existing,
        env={"PYTHONPATH": str(entry_point_plugin(tmp_path, "killer", KILLER)), "KILL_AT": at},
        check=False,
    )  # fmt: skip
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert digest(existing) == before
    partial = [p for p in tmp_path.iterdir() if p.name.startswith("adapter.partial-")]
    assert len(partial) == 1 and f"training into {partial[0]}" in proc.stdout
    if at in ("after-save", "before-move"):  # the run's work is there to resume
        assert (partial[0] / "adapters.safetensors").is_file()


def test_a_diverged_rerun_leaves_the_previous_adapter_and_says_where_it_went(
    tmp_path, existing, mixed_model, data_dir
):
    before = digest(existing)
    proc = lora(
        "--model", mixed_model, "--data", data_dir, *TRAIN_ARGS,
        "--rank-scaling", "by_bits", "--learning-rate", "1e30",
        "--adapter-path", existing, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "hold NaN or inf" in proc.stderr and "Traceback" not in proc.stderr
    (partial,) = tmp_path.glob("adapter.partial-*")
    assert f"{existing} is unchanged; this run's files are in {partial}" in proc.stderr
    assert digest(existing) == before


def test_a_good_rerun_replaces_the_adapter_and_keeps_other_files(
    tmp_path, existing, mixed_model, data_dir
):
    (existing / "notes.txt").write_text("mine")
    old = digest(existing)
    lora(
        "--model", mixed_model, "--data", data_dir, *TRAIN_ARGS, "--seed", "9",
        "--rank-scaling", "by_bits", "--rank", "4", "--adapter-path", existing,
    )  # fmt: skip
    new = digest(existing)
    assert new["notes.txt"] == old["notes.txt"]
    assert new["adapters.safetensors"] != old["adapters.safetensors"]
    assert not list(tmp_path.glob("adapter.partial-*"))  # moved, nothing left over
    config = json.loads((existing / "adapter_config.json").read_text())
    assert config["adapter_path"] == str(existing)
    mlx_lm.load(str(mixed_model), adapter_path=str(existing))


def test_a_nan_adapter_is_refused_at_load(tmp_path, by_bits_adapter, mixed_model):
    bad = tmp_path / "nan"
    shutil.copytree(by_bits_adapter, bad)
    weights = mx.load(str(bad / "adapters.safetensors"))
    name = next(iter(weights))
    weights[name] = weights[name] * mx.array(float("nan"))
    mx.save_safetensors(str(bad / "adapters.safetensors"), weights)
    with pytest.raises(ValueError, match=f"hold NaN or inf .e.g. {name}"):
        mlx_lm.load(str(mixed_model), adapter_path=str(bad))


def modes(directory):
    return {
        p.name: stat.S_IMODE(p.stat().st_mode)
        for p in [Path(directory), *Path(directory).iterdir()]
    }


def test_written_files_get_the_umask_modes(tmp_path, mixed_model, data_dir):
    """umask 022: 0644 files and 0755 directories, as open() and makedirs give."""
    out = tmp_path / "a"
    lora(
        "--model", mixed_model, "--data", data_dir, *TRAIN_ARGS,
        "--rank-scaling", "by_bits", "--adapter-path", out, umask=0o022,
    )  # fmt: skip
    assert modes(out) == {
        "a": 0o755, "adapter_config.json": 0o644, "adapter_model.safetensors": 0o644,
        "adapters.safetensors": 0o644, "optiq_lora_config.json": 0o644,
    }  # fmt: skip
    run([sys.executable, "-m", "mlx_lm_optiq.export", out, "--pad", tmp_path / "pad"],
        umask=0o022)  # fmt: skip
    assert set(modes(tmp_path / "pad").values()) == {0o755, 0o644}
    assert modes(tmp_path / "pad")["pad"] == 0o755


BAD_METADATA = [
    ("optiq/metadata.json", {"optimization": ["per_layer"]}, "'optimization' must be an object"),
    ("optiq/sensitivity.json", {"layers": [{"layer_name": 7, "sensitivities": {"4": 1.0}}]},
     "layers[0]: 'layer_name' must be a module path"),
    ("optiq/sensitivity.json", {"layers": [{"layer_name": None, "sensitivities": {"4": 1.0}}]},
     "layers[0]: 'layer_name' must be a module path"),
    ("optiq/sensitivity.json", {"candidate_bits": 4, "layers": []},
     "'candidate_bits' must be a list of bit-widths"),
    ("optiq/sensitivity.json", {"candidate_bits": [4, None], "layers": []},
     "'candidate_bits' must be a list of bit-widths"),
    ("optiq/metadata.json", "[" * 100000 + "]" * 100000, "nested too deeply"),
    ("optiq/metadata.json", {"per_layer": {"7": {"bits": 4}, "x": []}}, "per_layer['x'] has no 'bits'"),
]  # fmt: skip


@pytest.mark.parametrize(
    "name, content, problem", BAD_METADATA, ids=[p[:24] for _, _, p in BAD_METADATA]
)
def test_corrupt_metadata_is_one_line_naming_the_file(
    tmp_path, existing, mixed_model, data_dir, name, content, problem
):
    model = tmp_path / "model"
    shutil.copytree(mixed_model, model)
    path = model / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    before = digest(existing)
    proc = lora(
        "--model", model, "--data", data_dir, *TRAIN_ARGS, "--rank-scaling", "by_kl",
        "--adapter-path", existing, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == f"mlx_lm.lora: error: {path}: {problem}" or (
        lines[-1].startswith(f"mlx_lm.lora: error: {path}: ") and problem in lines[-1]
    ), lines[-3:]
    assert "Traceback" not in proc.stderr
    assert digest(existing) == before
    assert not list(tmp_path.glob("adapter.partial-*"))


def _file_size_limit(limit):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_a_full_disk_during_export_is_one_line_and_leaves_nothing(
    tmp_path, by_bits_adapter
):
    out = tmp_path / "pad"
    proc = run(
        [sys.executable, "-m", "mlx_lm_optiq.export", by_bits_adapter, "--pad", out],
        preexec_fn=_file_size_limit(4096), check=False,
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: {out}: could not be written")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_full_disk_while_saving_the_sidecar_leaves_the_previous_adapter(
    tmp_path, existing, mixed_model, data_dir
):
    """A limit that mlx-lm's own config and weights fit under, but not the
    PEFT copy of the weights our after-save action writes."""
    before = digest(existing)
    size = (existing / "adapters.safetensors").stat().st_size
    proc = lora(
        "--model", mixed_model, "--data", data_dir, *TRAIN_ARGS,
        "--rank-scaling", "by_bits", "--rank", "4", "--adapter-path", existing,
        preexec_fn=_file_size_limit(size + 100), check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-1500:]
    assert "adapter_model.safetensors: could not be written" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert digest(existing) == before


@pytest.fixture
def unwritable(tmp_path):
    """A directory this user can't write: read-only for a user, immutable for
    root (whom modes don't stop)."""
    path = tmp_path / "adapter"
    path.mkdir()
    (path / "adapters.safetensors").write_bytes(b"old")
    if os.geteuid() == 0:
        run(["chattr", "+i", path])
    else:
        os.chmod(path, 0o555)
    yield path
    if os.geteuid() == 0:
        run(["chattr", "-i", path])
    os.chmod(path, 0o755)


def test_an_unwritable_adapter_directory_is_refused_before_training(
    tmp_path, unwritable, mixed_model, data_dir
):
    proc = lora(
        "--model", mixed_model, "--data", data_dir, *TRAIN_ARGS,
        "--rank-scaling", "by_bits", "--adapter-path", unwritable, check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-1500:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"mlx_lm.lora: error: {unwritable}: is not writable: the adapter can't be "
        "saved there; pick another --adapter-path or make it writable"
    )
    assert (unwritable / "adapters.safetensors").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
