"""``--rank-budget`` and rank 0: budgets respected, modules left out, every reader.

The CLI tests run twice, like test_cli.py: through the shim and on mlx-lm
with ``patches/`` applied.
"""

import json
import sys

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
import tiny_model
from conftest import TRAIN_ARGS, lora, read_json, run

from mlx_lm_optiq import _startup
from mlx_lm_optiq.adapter_read import mlx_ranks, read_safetensors_header
from mlx_lm_optiq.export import main as export

TOKENS = [4, 17, 9, 23, 31, 8, 12, 40, 5, 11]


def logits(model):
    return np.array(model(mx.array([TOKENS]))[0].astype(mx.float32))


def units_of(model_path, layers=None):
    dims = tiny_model.linear_dims(model_path)
    return {
        p: sum(d)
        for p, d in dims.items()
        if layers is None or int(p.split(".")[2]) in layers
    }


@pytest.fixture(scope="module")
def deep_model(models):
    """18 layers: mlx-lm's default window (the last 16) is not the whole model."""
    return tiny_model.build_model(models / "llama-deep", layers=18)


def test_default_budget_spreads_the_stock_budget_over_all_layers(
    cli, deep_model, data_dir, tmp_path
):
    out = tmp_path / "a"
    proc = cli.lora(
        "--model", deep_model, "--data", data_dir, *TRAIN_ARGS, "--num-layers", "-1",
        "--rank-scaling", "constant", "--rank-budget", "default", "--rank", "4",
        "--adapter-path", out,
    )  # fmt: skip
    budget = 4 * sum(units_of(deep_model, range(2, 18)).values())
    shapes = read_safetensors_header(out / "adapters.safetensors")
    spent = sum(a * b for a, b in shapes.values())
    units = units_of(deep_model)
    assert budget - min(units.values()) < spent <= budget
    ranks = mlx_ranks(shapes)
    assert {int(p.split(".")[2]) for p in ranks} == set(range(18))  # all layers
    assert set(ranks.values()) == {3, 4}
    assert f"budget default: {budget:,} parameters, {spent:,} spent" in proc.stdout
    assert "parameters per layer: 0:" in proc.stdout and " 17:" in proc.stdout
    sidecar = read_json(out / "optiq_lora_config.json")
    assert sidecar["rank_budget"] == "default"
    assert sidecar["budget_parameters"] == budget


def test_budget_as_a_yaml_count(cli, deep_model, data_dir, tmp_path):
    config = tmp_path / "c.yaml"
    out = tmp_path / "y"
    config.write_text(
        f"model: {deep_model}\ndata: {data_dir}\nadapter_path: {out}\n"
        "num_layers: -1\nrank_scaling: by_bits\nrank_budget: 12000\nrank: 4\n"
    )
    # --num-layers on the command line wins over the YAML key
    run([cli.python, "-m", "mlx_lm", "lora", "-c", config, *TRAIN_ARGS,
         "--num-layers", "-1"], env=cli.env)  # fmt: skip
    shapes = read_safetensors_header(out / "adapters.safetensors")
    assert (
        12000 - max(units_of(deep_model).values())
        < sum(a * b for a, b in shapes.values())
        <= 12000
    )


def test_bad_budget_is_refused(cli, mixed_model, data_dir, tmp_path):
    proc = cli.lora(
        "--model", mixed_model, "--data", data_dir, *TRAIN_ARGS,
        "--rank-scaling", "allocate", "--rank-budget", "lots",
        "--adapter-path", tmp_path / "x", check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "--rank-budget 'lots': give free, match, default or a number" in proc.stderr
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def left_out(tmp_path_factory, mixed_model, data_dir):
    """Constant rank over all 4 layers on 3,000 parameters: too few for every
    module at rank 2 (8,192), so the first layers' modules are left out."""
    out = tmp_path_factory.mktemp("left_out") / "a"
    proc = lora(
        "--model", mixed_model, "--data", data_dir, *TRAIN_ARGS, "--num-layers", "-1",
        "--learning-rate", "1e-2", "--rank-scaling", "constant",
        "--rank-budget", "3k", "--rank", "4", "--adapter-path", out,
    )  # fmt: skip
    out.joinpath("train.log").write_text(proc.stdout)
    return out


def test_left_out_modules_have_no_tensors_and_rank_0_in_the_pattern(
    left_out, mixed_model
):
    shapes = read_safetensors_header(left_out / "adapters.safetensors")
    assert sum(a * b for a, b in shapes.values()) <= 3000
    pattern = read_json(left_out / "adapter_config.json")["lora_parameters"][
        "rank_pattern"
    ]
    assert set(pattern) == set(units_of(mixed_model))  # every module, 0 or not
    zero = {p for p, r in pattern.items() if r == 0}
    assert zero and zero.isdisjoint(mlx_ranks(shapes))
    assert mlx_ranks(shapes) == {p: r for p, r in pattern.items() if r}
    config = read_json(left_out / "adapter_config.json")
    assert config["target_modules"] == sorted(set(pattern) - zero)  # PEFT
    assert zero.isdisjoint(config["rank_pattern"])
    sidecar = read_json(left_out / "optiq_lora_config.json")
    assert {p for p, m in sidecar["modules"].items() if m["rank"] == 0} == zero
    log = (left_out / "train.log").read_text()
    assert f"{len(zero)} left out (rank 0)" in log


def test_load_and_generate_with_left_out_modules(left_out, mixed_model):
    model, tok = mlx_lm.load(str(mixed_model), adapter_path=str(left_out))
    modules = dict(model.named_modules())
    pattern = read_json(left_out / "adapter_config.json")["lora_parameters"][
        "rank_pattern"
    ]
    for path, rank in pattern.items():
        if rank:
            assert modules[path].lora_a.shape[1] == rank
        else:
            assert type(modules[path]).__name__ == "QuantizedLinear"
    base, _ = mlx_lm.load(str(mixed_model))
    assert np.abs(logits(model) - logits(base)).max() > 1e-3  # it trained
    expected = mlx_lm.generate(model, tok, "the cat", max_tokens=6)
    proc = run(
        [sys.executable, "-m", "mlx_lm", "generate", "--model", mixed_model,
         "--adapter-path", left_out, "--prompt", "the cat", "--max-tokens", "6",
         "--ignore-chat-template", "--verbose", "False"]
    )  # fmt: skip
    assert proc.stdout.strip() == expected.strip()


def test_padded_export_of_left_out_modules_loads_in_stock_mlx_lm(
    left_out, mixed_model, tmp_path
):
    expected = logits(mlx_lm.load(str(mixed_model), adapter_path=str(left_out))[0])
    assert export([str(left_out), "--pad", str(tmp_path / "pad")]) == 0
    _startup.uninstall()
    try:
        stock, _ = mlx_lm.load(str(mixed_model), adapter_path=str(tmp_path / "pad"))
    finally:
        _startup.install()
    assert np.abs(logits(stock) - expected).max() <= 1e-5


def test_served_adapter_with_left_out_modules(left_out, mixed_model):
    from mlx_lm_optiq.registry import AdapterRegistry

    expected = logits(mlx_lm.load(str(mixed_model), adapter_path=str(left_out))[0])
    registry = AdapterRegistry()
    described = registry.add("a", left_out)
    model, _ = mlx_lm.load(str(mixed_model))
    registry.attach(model)
    registry.activate(model, registry.key("a"))
    assert np.abs(logits(model) - expected).max() <= 1e-5
    ranks = mlx_ranks(read_safetensors_header(left_out / "adapters.safetensors"))
    assert described["modules"] == len(ranks)


def test_info_shows_what_was_left_out(left_out):
    pattern = read_json(left_out / "adapter_config.json")["lora_parameters"][
        "rank_pattern"
    ]
    zero = sorted(p for p, r in pattern.items() if r == 0)
    proc = run([sys.executable, "-m", "mlx_lm_optiq.info", left_out, "--layers"])
    assert f"; {len(zero)} left out (rank 0)" in proc.stdout
    assert "budget: 3k (3,000 parameters)" in proc.stdout
    rows = [
        l.split()
        for l in proc.stdout.splitlines()
        if l.split()[:1] in [[p] for p in zero]
    ]
    assert len(rows) == len(zero) and all(r[1] == "0" for r in rows)
    doc = json.loads(
        run([sys.executable, "-m", "mlx_lm_optiq.info", left_out, "--json"]).stdout
    )
    assert doc["left_out_modules"] == zero
    assert doc["adapted_modules"] == len(pattern) - len(zero)


def test_heat_map_renders(left_out, tmp_path):
    import matplotlib.image

    out = tmp_path / "ranks.png"
    proc = run([sys.executable, "-m", "mlx_lm_optiq.info", left_out, "--plot", out])
    assert f"wrote {out}" in proc.stdout
    image = matplotlib.image.imread(out)
    assert image.shape[0] > 200 and image.shape[1] > 600  # two panels: ranks, no KL
    assert image[..., :3].std() > 0.05  # not a blank canvas
    assert [p.name for p in tmp_path.iterdir()] == ["ranks.png"]  # written whole


def test_heat_map_draws_kl_beside_the_ranks(models, data_dir, tmp_path):
    import matplotlib.image

    fp = tiny_model.build_model(models / "llama-fp-heat", quantize=None)
    run([sys.executable, "-m", "mlx_lm_optiq.sensitivity", fp, "--data", data_dir,
         "--group-size", "32", "--samples", "4", "--max-seq-length", "16"])  # fmt: skip
    out = tmp_path / "a"
    lora(
        "--model", fp, "--data", data_dir, *TRAIN_ARGS, "--num-layers", "-1",
        "--rank-scaling", "allocate", "--rank-budget", "8k", "--adapter-path", out,
    )  # fmt: skip
    sidecar = read_json(out / "optiq_lora_config.json")
    assert all(m["kl"] is not None for m in sidecar["modules"].values())
    run([sys.executable, "-m", "mlx_lm_optiq.info", out, "--plot", tmp_path / "p.png"])
    with_kl = matplotlib.image.imread(tmp_path / "p.png")
    assert with_kl.shape[1] > 1.5 * 700  # the KL panel beside the ranks


def test_resume_keeps_the_left_out_modules_out(
    left_out, mixed_model, data_dir, tmp_path
):
    out = tmp_path / "resumed"
    lora(
        "--model", mixed_model, "--data", data_dir, *TRAIN_ARGS, "--num-layers", "-1",
        "--rank", "4", "--resume-adapter-file", left_out / "adapters.safetensors",
        "--adapter-path", out,
    )  # fmt: skip
    before = read_safetensors_header(left_out / "adapters.safetensors")
    after = read_safetensors_header(out / "adapters.safetensors")
    assert after == before  # same modules, same ranks: none trained from scratch


def test_shim_and_patch_leave_rank_0_modules_as_they_are(cli, mixed_model, tmp_path):
    code = (
        "import sys, mlx_lm; from mlx_lm.tuner.utils import linear_to_lora_layers\n"
        f"model, _ = mlx_lm.load({str(mixed_model)!r}); model.freeze()\n"
        "linear_to_lora_layers(model, 2, {'rank': 4, 'scale': 1.0, 'dropout': 0.0,"
        " 'rank_pattern': {'model.layers.3.mlp.up_proj': 0,"
        " 'model.layers.3.self_attn.q_proj': 6}})\n"
        "m = dict(model.named_modules())\n"
        "print(type(m['model.layers.3.mlp.up_proj']).__name__,"
        " m['model.layers.3.self_attn.q_proj'].lora_a.shape[1],"
        " m['model.layers.2.mlp.up_proj'].lora_a.shape[1])\n"
    )
    proc = run([cli.python, "-c", code], env=cli.env)
    assert proc.stdout.split() == ["QuantizedLinear", "6", "4"]
