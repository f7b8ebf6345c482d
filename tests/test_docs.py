"""The README: its option table is the settings object's options, and the
blocks of "Use", "Coming from mlx-lm" and the gradient options run as
written on a tiny model."""

import json
import math
import re
import sys

from conftest import ROOT, run, tiny_model

from mlx_lm_optiq import settings

README = (ROOT / "README.md").read_text()


def test_readme_lists_every_option_and_no_other():
    table = set(re.findall(r"^\| `(--[a-z-]+)", README, flags=re.M))
    options = {settings.option_name(f.name) for f in settings.options()}
    assert table == options
    yaml = re.search(r"the YAML keys are (.+?)\. A run", README, flags=re.S).group(1)
    assert set(re.findall(r"`([a-z_]+)`", yaml)) == {f.name for f in settings.options()}


def blocks(section):
    """The fenced ``(language, text)`` blocks under the README's ``## section``."""
    body = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## )", README, re.M | re.S)
    return re.findall(r"^```(\w+)\n(.*?)^```", body.group(1), re.M | re.S)


def fewer_iterations(text):
    return re.sub(r'(--iters |iters: |"iters": )\d+', r"\g<1>4", text)


def test_the_readmes_use_and_mlx_lm_blocks_run_as_written(tmp_path):
    tiny_model.build_model(tmp_path / "model", quantize=None)
    tiny_model.build_dataset(tmp_path / "data")
    use = blocks("Use")
    assert [lang for lang, _ in use] == ["bash"]
    run(["bash", "-euo", "pipefail", "-c", fewer_iterations(use[0][1])], cwd=tmp_path)
    sidecar = json.loads(
        (tmp_path / "my_adapter" / "optiq_lora_config.json").read_text()
    )
    assert sidecar["rank_scaling"] == "by_kl"
    assert (tmp_path / "model" / "optiq" / "sensitivity.json").is_file()
    assert (tmp_path / "ranks.png").stat().st_size > 1000
    assert (tmp_path / "fused_model" / "config.json").is_file()

    mlx = blocks("Coming from mlx-lm")
    assert [lang for lang, _ in mlx] == ["yaml", "bash", "python", "python"]
    (tmp_path / "my_adapter").rename(tmp_path / "first_adapter")
    (tmp_path / "config.yaml").write_text(fewer_iterations(mlx[0][1]))
    run(["mlx_lm.lora", "-c", "config.yaml"], cwd=tmp_path)
    again = json.loads((tmp_path / "my_adapter" / "optiq_lora_config.json").read_text())
    assert again["modules"] == sidecar["modules"]  # the same ranks, from the YAML

    test = run(["bash", "-euo", "pipefail", "-c", mlx[1][1]], cwd=tmp_path)
    loss = float(re.search(r"Test loss ([\d.]+)", test.stdout).group(1))
    assert math.isfinite(loss) and 0 < loss < 20

    generated = run([sys.executable, "-c", mlx[2][1]], cwd=tmp_path)
    assert generated.stdout.strip()
    run([sys.executable, "-c", fewer_iterations(mlx[3][1])], cwd=tmp_path)
    notebook = json.loads(
        (tmp_path / "notebook_adapter" / "optiq_lora_config.json").read_text()
    )
    assert notebook["modules"] == sidecar["modules"]

    grad = blocks("Gradient signal, gradient init, rank-aware scale, LoRA+")
    assert [lang for lang, _ in grad] == ["bash"]
    run(["bash", "-euo", "pipefail", "-c", fewer_iterations(grad[0][1])], cwd=tmp_path)
    record = json.loads(
        (tmp_path / "grad_adapter" / "optiq_lora_config.json").read_text()
    )
    assert record["rank_scaling"] == "by_grad"
    assert record["settings"]["lora_init"] == "gradient"
    assert record["settings"]["lora_plus_ratio"] == 16.0
