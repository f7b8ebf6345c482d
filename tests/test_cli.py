"""The stock ``mlx_lm.lora`` command, in a subprocess, with the plugin installed.

Every test that takes ``cli`` runs twice: on stock mlx-lm through the shim,
and on mlx-lm with ``patches/`` applied and the shim switched off.
"""

import json

import mlx.core as mx
import pytest
import tiny_model
from conftest import (
    TRAIN_ARGS,
    expected_by_bits,
    lora,
    read_json,
    run,
    train_by_bits,
)

from mlx_lm_optiq.adapter_read import mlx_ranks, read_safetensors_header


@pytest.fixture(scope="module")
def trained(cli, tmp_path_factory, mixed_model, data_dir):
    """``--rank-scaling by_bits --rank 4`` trained with this ``cli``."""
    out = tmp_path_factory.mktemp(f"by_bits-{cli}") / "a"
    return train_by_bits(cli.lora, out, mixed_model, data_dir)


def test_help_explains_the_new_options(cli):
    out = " ".join(cli.lora("--help").stdout.split())
    for option in (
        "--rank-scaling",
        "{constant,by_bits,by_kl,allocate,by_grad}",
        "--rank ",
        "--rank-budget",
    ):
        assert option in out
    assert "8-bit modules get twice the rank" in out
    assert "--rank-budget {free,match,default,COUNT}" in out and "250k" in out


def test_by_bits_gives_8bit_modules_twice_the_rank(cli, trained, mixed_model):
    shapes = read_safetensors_header(trained / "adapters.safetensors")
    expected = expected_by_bits(mixed_model, base_rank=4, layers=2)
    assert mlx_ranks(shapes) == expected
    assert sorted(set(expected.values())) == [4, 8]

    # trainable parameters: sum of r_i * (in_i + out_i)
    dims = tiny_model.linear_dims(mixed_model)
    trainable = sum(r * sum(dims[p]) for p, r in expected.items())
    constant = sum(4 * sum(dims[p]) for p in expected)
    assert sum(v[0] * v[1] for v in shapes.values()) == trainable == 10496
    assert constant == 8192

    log = (trained / "train.log").read_text()
    assert "rank distribution: {4: 10, 8: 4} across 14 adapted modules" in log
    assert f"adapter parameters: {trainable:,}" in log
    assert f"the {constant:,} of constant rank 4" in log


def test_adapter_config_has_rank_pattern_and_peft_keys(cli, trained, mixed_model):
    config = read_json(trained / "adapter_config.json")
    expected = expected_by_bits(mixed_model, base_rank=4, layers=2)
    lora_parameters = config["lora_parameters"]
    assert lora_parameters["rank"] == 4
    assert lora_parameters["rank_pattern"] == expected
    assert config["rank_scaling"] == "by_bits"
    # PEFT: alpha_i = scale * r_i, exact module paths
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 4 and config["lora_alpha"] == 20.0 * 4
    assert config["target_modules"] == sorted(expected)
    eight = {p: r for p, r in expected.items() if r == 8}
    assert config["rank_pattern"] == eight
    assert config["alpha_pattern"] == {p: 20.0 * 8 for p in eight}
    assert config["base_model_name_or_path"] == str(mixed_model)


def test_sidecar_records_every_module(cli, trained, mixed_model):
    sidecar = read_json(trained / "optiq_lora_config.json")
    assert sidecar["rank_scaling"] == "by_bits"
    assert sidecar["base_rank"] == 4 and sidecar["scale"] == 20.0
    assert sidecar["rank_distribution"] == {"4": 10, "8": 4}
    assert sidecar["trainable_parameters"] == 10496
    assert sidecar["constant_rank_parameters"] == 8192
    v_proj = sidecar["modules"]["model.layers.3.self_attn.v_proj"]
    assert v_proj == {
        "rank": 8,
        "bits": 8,
        "bits_source": "config.json",
        "kl": None,
        "kl_source": None,
        "grad": None,
        "grad_source": None,
    }
    assert sidecar["metadata_files"][0]["file"] == "config.json"
    assert len(sidecar["metadata_files"][0]["sha256"]) == 64
    assert set(sidecar["versions"]) == {"mlx_lm_optiq", "mlx_lm", "mlx"}


def test_constant_is_byte_identical_to_stock(cli, tmp_path, mixed_model, data_dir):
    common = ["--model", mixed_model, "--data", data_dir, *TRAIN_ARGS]
    stock = tmp_path / "stock"
    ours = tmp_path / "constant"
    lora(*common, "--adapter-path", stock, env={"MLX_LM_OPTIQ_DISABLE": "1"})
    proc = cli.lora(*common, "--rank-scaling", "constant", "--adapter-path", ours)
    assert "rank distribution: {8: 14} across 14 adapted modules" in proc.stdout
    stock_bytes = (stock / "adapters.safetensors").read_bytes()
    assert (ours / "adapters.safetensors").read_bytes() == stock_bytes
    # the adapter did train: it is not the zero-initialized lora_b
    weights = mx.load(str(ours / "adapters.safetensors"))
    assert mx.abs(weights["model.layers.3.self_attn.q_proj.lora_b"]).max().item() > 0
    assert not (stock / "optiq_lora_config.json").exists()


def test_without_the_option_mlx_lm_is_untouched(cli, tmp_path, mixed_model, data_dir):
    out = tmp_path / "plain"
    proc = cli.lora(
        "--model", mixed_model, "--data", data_dir, *TRAIN_ARGS, "--adapter-path", out
    )
    assert "rank distribution" not in proc.stdout
    assert not (out / "optiq_lora_config.json").exists()
    config = read_json(out / "adapter_config.json")
    assert "rank_pattern" not in config["lora_parameters"]
    assert "peft_type" not in config


def test_python_dash_m_and_yaml_config(cli, tmp_path, mixed_model, data_dir):
    config = tmp_path / "config.yaml"
    out = tmp_path / "yaml"
    config.write_text(
        f"model: {mixed_model}\n"
        f"data: {data_dir}\n"
        f"adapter_path: {out}\n"
        "rank_scaling: by_bits\n"
        "lora_parameters:\n  rank: 2\n  scale: 10.0\n  dropout: 0.0\n"
    )
    proc = run(
        [cli.python, "-m", "mlx_lm", "lora", "-c", config, *TRAIN_ARGS], env=cli.env
    )
    assert "rank distribution: {2: 10, 4: 4} across 14 adapted modules" in proc.stdout
    ranks = mlx_ranks(read_safetensors_header(out / "adapters.safetensors"))
    assert ranks == expected_by_bits(mixed_model, base_rank=2, layers=2)
    assert (
        read_json(out / "adapter_config.json")["alpha_pattern"][
            "model.layers.3.mlp.down_proj"
        ]
        == 10.0 * 4
    )


def test_disable_switch_gives_stock_back(mixed_model, data_dir, tmp_path):
    proc = lora(
        "--model", mixed_model, "--data", data_dir, *TRAIN_ARGS,
        "--rank-scaling", "by_bits", "--adapter-path", tmp_path / "x",
        env={"MLX_LM_OPTIQ_DISABLE": "1"}, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "unrecognized arguments: --rank-scaling by_bits" in proc.stderr


def test_by_bits_on_a_float_model_explains(cli, fp_model, data_dir, tmp_path):
    proc = cli.lora(
        "--model", fp_model, "--data", data_dir, *TRAIN_ARGS,
        "--rank-scaling", "by_bits", "--adapter-path", tmp_path / "x", check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "by_bits needs quantization information" in proc.stderr
    assert "--rank-scaling constant" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_by_kl_reads_sensitivity_json(cli, tmp_path, mixed_model, data_dir, models):
    model = tiny_model.build_model(models / f"llama-kl-{cli}", quantize="mixed")
    kls = {}
    for i, path in enumerate(sorted(tiny_model.linear_dims(model))):
        # q_proj is 4x as sensitive as the median, k_proj 1/4: clipped to 2x, 0.5x
        kls[path] = {"q_proj": 4.0, "k_proj": 0.25}.get(path.rsplit(".", 1)[-1], 1.0)
    (model / "optiq").mkdir()
    (model / "optiq" / "sensitivity.json").write_text(
        json.dumps(
            {
                "metric": "kl_divergence_vs_reference",
                "candidate_bits": [4, 8],
                "layers": [
                    {
                        "layer_name": f"language_model.{p}",  # any wrapper prefix
                        "sensitivities": {"4": kl, "8": kl / 10},
                        "param_count": 1,
                    }
                    for p, kl in kls.items()
                ],
            }
        )
    )
    out = tmp_path / "kl"
    proc = cli.lora(
        "--model", model, "--data", data_dir, *TRAIN_ARGS,
        "--rank-scaling", "by_kl", "--rank", "4", "--adapter-path", out,
    )  # fmt: skip
    assert (
        "rank distribution: {2: 2, 4: 10, 8: 2} across 14 adapted modules"
        in proc.stdout
    )
    ranks = mlx_ranks(read_safetensors_header(out / "adapters.safetensors"))
    assert ranks["model.layers.3.self_attn.q_proj"] == 8
    assert ranks["model.layers.3.self_attn.k_proj"] == 2
    assert ranks["model.layers.3.mlp.down_proj"] == 4
    sidecar = read_json(out / "optiq_lora_config.json")
    q = sidecar["modules"]["model.layers.2.self_attn.q_proj"]
    assert q["kl"] == 4.0 and q["kl_source"] == "optiq/sensitivity.json"


def test_by_kl_without_kl_falls_back_to_by_bits(cli, tmp_path, mixed_model, data_dir):
    proc = cli.lora(
        "--model", mixed_model, "--data", data_dir, *TRAIN_ARGS,
        "--rank-scaling", "by_kl", "--rank", "4", "--adapter-path", tmp_path / "a",
    )  # fmt: skip
    assert "by_kl falls back to by_bits" in proc.stdout
    assert "rank distribution: {4: 10, 8: 4}" in proc.stdout


def test_rank_budget_match_stays_under_constant(cli, tmp_path, mixed_model, data_dir):
    proc = cli.lora(
        "--model", mixed_model, "--data", data_dir, *TRAIN_ARGS,
        "--rank-scaling", "by_bits", "--rank", "4", "--rank-budget", "match",
        "--adapter-path", tmp_path / "m",
    )  # fmt: skip
    shapes = read_safetensors_header(tmp_path / "m" / "adapters.safetensors")
    trainable = sum(a * b for a, b in shapes.values())
    assert 8192 - 96 < trainable <= 8192  # within one module's rank step
    ranks = mlx_ranks(shapes)
    assert (
        ranks["model.layers.3.self_attn.v_proj"]
        > ranks["model.layers.3.self_attn.q_proj"]
    )
    assert f"adapter parameters: {trainable:,}" in proc.stdout


def test_resume_mixed_rank_adapter(cli, tmp_path, trained, mixed_model, data_dir):
    resume = trained / "adapters.safetensors"
    out = tmp_path / "resumed"
    # without --rank-scaling: the file's own ranks are rebuilt
    cli.lora(
        "--model", mixed_model, "--data", data_dir, *TRAIN_ARGS, "--rank", "4",
        "--resume-adapter-file", resume, "--adapter-path", out,
    )  # fmt: skip
    assert mlx_ranks(
        read_safetensors_header(out / "adapters.safetensors")
    ) == mlx_ranks(read_safetensors_header(resume))
    # with a policy that disagrees with the file: refused, before training
    proc = cli.lora(
        "--model", mixed_model, "--data", data_dir, *TRAIN_ARGS,
        "--rank-scaling", "constant", "--rank", "4",
        "--resume-adapter-file", resume, "--adapter-path", tmp_path / "bad", check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "other ranks than this run chooses" in proc.stderr
    assert str(resume) in proc.stderr


@pytest.mark.parametrize("bad", ["--rank=0", "--rank=-3"])
def test_bad_rank_is_refused(cli, bad, mixed_model, data_dir, tmp_path):
    proc = cli.lora(
        "--model", mixed_model, "--data", data_dir, *TRAIN_ARGS,
        "--rank-scaling", "by_bits", bad, "--adapter-path", tmp_path / "x", check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "rank must be a positive integer" in proc.stderr


@pytest.mark.parametrize(
    "bad, problem",
    [
        (["--rank-budget", "abc"], "--rank-budget 'abc': give free, match, default "
         "or a number of adapter parameters such as 250000, 250k or 1.3M"),
        (["--rank-range", "0"], "--rank-range '0': must be a number >= 1"),
        (["--rank-range", "0", "--rank-budget", "-1"], "--rank-range '0': must be a "
         "number >= 1; --rank-budget '-1': give free, match, default or a number"),
        ("yaml", "--rank-range 0.5: must be a number >= 1"),
    ],
    ids=["budget", "range", "both", "yaml"],
)  # fmt: skip
def test_bad_settings_stop_before_the_model_loads(
    cli, bad, problem, mixed_model, data_dir, tmp_path
):
    """Checked once mlx-lm has merged the command line and YAML: one line,
    exit 1, before the model is loaded and before anything is written."""
    if bad == "yaml":
        config = tmp_path / "config.yaml"
        config.write_text("rank_scaling: by_bits\nrank_range: 0.5\n")
        bad = ["-c", config]
    proc = cli.lora(
        "--model", mixed_model, "--data", data_dir, *TRAIN_ARGS,
        "--rank-scaling", "by_bits", *bad, "--adapter-path", tmp_path / "x", check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        line for line in proc.stderr.strip().splitlines() if problem in line
    ]
    assert proc.stderr.startswith("mlx_lm.lora: error: ")
    assert "Loading pretrained model" not in proc.stdout + proc.stderr
    assert not (tmp_path / "x").exists()


def test_lora_plus_makes_every_lora_b_step_ratio_times_larger(
    cli, mixed_model, data_dir, tmp_path
):
    """After one step from B = 0, A's gradient is zero and B's update is all
    there is: with --lora-plus-ratio 4 it is exactly 4 times mlx-lm's."""
    one_step = ["--model", mixed_model, "--data", data_dir, *TRAIN_ARGS, "--iters", "1",
                "--rank-scaling", "constant", "--rank", "4"]  # fmt: skip
    cli.lora(*one_step, "--adapter-path", tmp_path / "stock")
    proc = cli.lora(
        *one_step, "--lora-plus-ratio", "4", "--adapter-path", tmp_path / "plus"
    )
    assert "LoRA+: every lora_b update 4x mlx-lm's (Adam)" in proc.stdout
    stock = mx.load(str(tmp_path / "stock" / "adapters.safetensors"))
    plus = mx.load(str(tmp_path / "plus" / "adapters.safetensors"))
    assert stock.keys() == plus.keys()
    for name in stock:
        factor = 4.0 if name.endswith("lora_b") else 1.0
        assert mx.abs(stock[name]).max().item() > 0, name
        assert mx.allclose(plus[name], factor * stock[name], rtol=1e-5, atol=1e-8), name
    sidecar = read_json(tmp_path / "plus" / "optiq_lora_config.json")
    assert sidecar["settings"]["lora_plus_ratio"] == 4.0

    bad = cli.lora(*one_step, "--lora-plus-ratio", "0", "--adapter-path", tmp_path / "x",
                   check=False)  # fmt: skip
    assert bad.returncode == 1 and "--lora-plus-ratio '0': must be a positive number" in bad.stderr  # fmt: skip
    assert "Loading pretrained model" not in bad.stdout
