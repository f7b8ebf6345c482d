"""How an mlx-lm user meets the package: commands, labels, stopped runs, exports."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx_lm
import pytest
from conftest import BIN, TRAIN_ARGS, lora, run

from mlx_lm_optiq import __version__
from mlx_lm_optiq.__main__ import COMMANDS
from mlx_lm_optiq.adapter_record import from_adapter_dir

ORIGIN = "mlx_lm_optiq"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_command_is_a_console_script_with_version_and_help(command):
    script = BIN / f"{ORIGIN}.{command}"
    assert script.is_file(), f"{script} is not installed: pip install -e ."
    version = run([script, "--version"]).stdout.strip()
    assert version == (
        f"{ORIGIN}.{command} {__version__} (mlx-lm {mlx_lm.__version__}, "
        f"mlx {mlx_version()})"
    )
    assert run([script, "--help"]).stdout.startswith(f"usage: {ORIGIN}.{command}")


def mlx_version():
    import importlib.metadata

    return importlib.metadata.version("mlx")


def test_python_m_lists_the_commands_and_runs_one(by_bits_adapter):
    listing = run([sys.executable, "-m", ORIGIN]).stdout
    for command, what in COMMANDS.items():
        assert f"  {command:<11}  {what}" in listing
    by_module = run([sys.executable, "-m", ORIGIN, "info", by_bits_adapter]).stdout
    by_script = run([BIN / f"{ORIGIN}.info", by_bits_adapter]).stdout
    assert by_module == by_script and "ranks: 4-8 per module" in by_script
    unknown = run([sys.executable, "-m", ORIGIN, "train"], check=False)
    assert unknown.returncode == 2 and "unknown command 'train'" in unknown.stderr
    version = run([sys.executable, "-m", ORIGIN, "--version"]).stdout
    assert version.startswith(f"{ORIGIN} {__version__} (mlx-lm ")


def test_serve_without_a_model_refuses_and_its_help_shows_mlx_lms_options():
    bare = run([BIN / f"{ORIGIN}.serve"], check=False)
    assert bare.returncode == 2
    assert "no model to serve: give --model M" in bare.stderr
    help_text = run([BIN / f"{ORIGIN}.serve", "--help"]).stdout
    ours, _, passed_on = help_text.partition("options passed on to mlx_lm.server:")
    assert "--adapter NAME=PATH" in ours and "--max-adapters" in ours
    for option in ("--model MODEL", "--port PORT", "--kv-bits", "--max-tokens"):
        assert option in passed_on
    assert "show this help" not in passed_on  # mlx-lm's own -h is not repeated


def test_the_rank_line_below_mlx_lms_banner_says_what_the_ranks_are(by_bits_adapter):
    log = (by_bits_adapter / "train.log").read_text().splitlines()
    banner = next(i for i, line in enumerate(log) if "Trainable parameters" in line)
    ranks = next(i for i, line in enumerate(log) if line.startswith("ranks: "))
    assert ranks > banner
    assert log[ranks] == (
        "ranks: 4-8 per module (the rank above is the base rank 4 the budget counts in)"
    )


def test_a_stock_run_prints_no_rank_line(fp_model, data_dir, tmp_path):
    proc = lora("--model", fp_model, "--data", data_dir, *TRAIN_ARGS,
                "--adapter-path", tmp_path / "stock")  # fmt: skip
    assert "ranks: " not in proc.stdout
    assert not list(tmp_path.glob("*.partial-*"))


def test_the_heat_map_has_one_colour_and_tick_per_rank(by_bits_adapter):
    from mlx_lm_optiq.info import heat_map

    record = from_adapter_dir(by_bits_adapter)
    figure = heat_map(record)
    ranks_ax, bar_ax = figure.axes[:2]
    (image,) = ranks_ax.get_images()
    assert image.cmap.N == 2  # ranks 4 and 8, nothing in between
    assert [t.get_text() for t in bar_ax.get_yticklabels()] == ["4", "8"]
    labels = sorted(int(t.get_text()) for t in ranks_ax.texts)
    assert labels == sorted(r for r in record.ranks.values() if r)
    assert {t.get_color() for t in ranks_ax.texts} == {"white", "black"}  # dark, light


def _train_until(mixed_model, data_dir, out, saved, *extra):
    """``mlx_lm.lora`` in the background until ``saved(line, out)`` holds, then
    Ctrl-C (SIGINT); its whole output."""
    proc = subprocess.Popen(
        [BIN / "mlx_lm.lora", "--model", mixed_model, "--data", data_dir,
         *TRAIN_ARGS, "--iters", "100000", "--steps-per-report", "1",
         "--rank-scaling", "by_bits", "--rank", "4", "--adapter-path", out, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        # a test run started in the background ignores SIGINT, and so would
        # its children: Ctrl-C as a terminal sends it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    seen = []
    deadline = time.monotonic() + 240
    for line in proc.stdout:
        seen.append(line)
        if saved(line, out) or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    return proc.returncode, "".join(seen) + rest


def test_ctrl_c_before_any_checkpoint_leaves_nothing_behind(
    mixed_model, data_dir, tmp_path
):
    out = tmp_path / "a"
    code, log = _train_until(
        mixed_model, data_dir, out, lambda line, _: "train_loss" in line,
        "--save-every", "100000",
    )  # fmt: skip
    assert code != 0 and "KeyboardInterrupt" in log
    assert f"{out} is unchanged; the run saved no weights, and its partial " in log
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_after_a_checkpoint_says_how_to_resume_and_the_next_run_too(
    mixed_model, data_dir, tmp_path
):
    out = tmp_path / "a"

    def checkpoint_saved(line, out):
        return any(tmp_path.glob("a.partial-*/0000002_adapters.safetensors"))

    code, log = _train_until(
        mixed_model, data_dir, out, checkpoint_saved, "--save-every", "2"
    )
    (partial,) = tmp_path.glob("a.partial-*")
    checkpoint = sorted(partial.glob("*_adapters.safetensors"))[-1]
    assert code != 0 and not out.exists()
    assert (
        f"{out} is unchanged; this run's files are in {partial}: resume from its "
        f"last checkpoint with --resume-adapter-file {checkpoint}, or delete it"
    ) in log
    # the next run says it too, and the checkpoint named resumes
    proc = lora(
        "--model", mixed_model, "--data", data_dir, *TRAIN_ARGS,
        "--rank-scaling", "by_bits", "--rank", "4", "--adapter-path", out,
        "--resume-adapter-file", checkpoint,
    )  # fmt: skip
    assert f"note: an earlier run left {partial}: resume from its last" in proc.stdout
    assert from_adapter_dir(out).ranks == from_adapter_dir(partial).ranks


def test_export_says_loudly_when_it_cannot_check_module_paths(
    by_bits_adapter, tmp_path
):
    """Without torch (a package that refuses to import stands in for its
    absence), ``--base`` cannot be checked, and the warning says so."""
    blocked = tmp_path / "blocked"
    (blocked / "torch").mkdir(parents=True)
    (blocked / "torch" / "__init__.py").write_text(
        "raise ImportError('No module named torch')\n"
    )
    base = tmp_path / "hf"
    base.mkdir()
    (base / "config.json").write_text('{"model_type": "llama"}')
    proc = run(
        [BIN / f"{ORIGIN}.export", by_bits_adapter, "--peft", tmp_path / "peft",
         "--base", base],
        env={"PYTHONPATH": str(blocked)},
    )  # fmt: skip
    assert (
        f"WARNING: the module paths were NOT checked against {base}: torch and "
        "transformers are not installed (pip install 'mlx-lm-optiq[hf]' installs them)"
    ) in proc.stderr
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    by_name = run(
        [BIN / f"{ORIGIN}.export", by_bits_adapter, "--peft", tmp_path / "peft2",
         "--base", "HuggingFaceTB/SmolLM2-135M"]
    )  # fmt: skip
    assert "is not a local model directory with a config.json" in by_name.stderr


def test_a_hugging_face_id_works_like_a_local_directory(fp_model, data_dir, tmp_path):
    """``sensitivity`` and ``--rank-scaling by_kl`` on a model id, read from a
    Hugging Face cache laid out the way ``huggingface_hub`` lays it out."""
    import shutil

    revision = "0123456789abcdef" * 2 + "01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-fp"
    snapshot = repo / "snapshots" / revision
    shutil.copytree(fp_model, snapshot, ignore=shutil.ignore_patterns("optiq"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    offline = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    run([BIN / f"{ORIGIN}.sensitivity", "tiny-org/tiny-fp", "--data", data_dir,
         "--samples", "2", "--max-seq-length", "16", "--group-size", "32"],
        env=offline)  # fmt: skip
    assert (snapshot / "optiq" / "sensitivity.json").is_file()
    assert not (tmp_path / "tiny-org").exists() and not Path("tiny-org").exists()
    out = tmp_path / "a"
    proc = lora("--model", "tiny-org/tiny-fp", "--data", data_dir, *TRAIN_ARGS,
                "--rank-scaling", "by_kl", "--adapter-path", out, env=offline)  # fmt: skip
    assert "falls back" not in proc.stdout
    modules = from_adapter_dir(out).facts
    assert modules and all(f.kl is not None for f in modules.values())
