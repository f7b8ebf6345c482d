"""Sensitivity you can measure, quantization from it, and ranks from both."""

import json
import sys

import mlx.nn as nn
import mlx_lm
import pytest
import tiny_model
from conftest import TRAIN_ARGS, lora, run

from mlx_lm_optiq.adapter_read import mlx_ranks, read_safetensors_header
from mlx_lm_optiq.quantize import choose_bits, storage_bits

FRAGILE = "model.layers.1.mlp.down_proj"
MEASURE = ["--group-size", "32", "--samples", "8", "--max-seq-length", "32"]


def tool(name, *args, check=True):
    return run(
        [sys.executable, "-m", f"mlx_lm_optiq.{name}", *map(str, args)], check=check
    )


@pytest.fixture(scope="module")
def fragile_model(models):
    return tiny_model.build_model(
        models / "llama-fragile", quantize=None, fragile=FRAGILE
    )


@pytest.fixture(scope="module")
def measured(fragile_model, data_dir):
    proc = tool("sensitivity", fragile_model, "--data", data_dir, *MEASURE)
    return fragile_model, proc


@pytest.fixture(scope="module")
def quantized(measured, tmp_path_factory):
    model, _ = measured
    out = tmp_path_factory.mktemp("quantized") / "q"
    proc = tool(
        "quantize", model, "-o", out, "--target-bpw", "5.5", "--group-size", "32"
    )
    return out, proc


def test_fragile_module_has_the_largest_kl(measured):
    model, proc = measured
    doc = json.loads((model / "optiq" / "sensitivity.json").read_text())
    assert doc["metric"] == "kl_divergence_vs_reference"
    assert (
        doc["candidate_bits"] == [4, 8] and doc["group_size"] == 32 and doc["complete"]
    )
    assert len(doc["layers"]) == 4 * 7
    kl4 = {l["layer_name"]: l["sensitivities"]["4"] for l in doc["layers"]}
    kl8 = {l["layer_name"]: l["sensitivities"]["8"] for l in doc["layers"]}
    assert max(kl4, key=kl4.get) == FRAGILE
    assert kl4[FRAGILE] > 1.5 * sorted(kl4.values())[-2]
    assert all(0 <= kl8[p] < kl4[p] for p in kl4)
    params = {l["layer_name"]: l["param_count"] for l in doc["layers"]}
    assert (
        params[FRAGILE] == 128 * 64
        and params["model.layers.0.self_attn.k_proj"] == 64 * 32
    )
    # a progress bar with an ETA, and a summary line
    assert "sensitivity: 100%" in proc.stderr and "<00:00" in proc.stderr
    assert f"most sensitive at 4 bits: {FRAGILE}" in proc.stdout


def test_resume_skips_measured_modules(measured, tmp_path, data_dir):
    model, _ = measured
    doc = json.loads((model / "optiq" / "sensitivity.json").read_text())
    partial = dict(doc, complete=False, layers=doc["layers"][:5])
    partial["layers"][0] = dict(
        partial["layers"][0], sensitivities={"4": 123.0, "8": 1.0}
    )
    out = tmp_path / "s.json"
    out.write_text(json.dumps(partial))
    proc = tool("sensitivity", model, "--data", data_dir, *MEASURE, "-o", out)
    assert "resuming: 5 of 28 modules already measured" in proc.stdout
    resumed = json.loads(out.read_text())
    assert resumed["complete"] and len(resumed["layers"]) == 28
    assert resumed["layers"][0]["sensitivities"]["4"] == 123.0  # kept, not recomputed
    # other settings than the partial file's: refused, file untouched
    before = out.read_bytes()
    proc = tool(
        "sensitivity",
        model,
        "--data",
        data_dir,
        *MEASURE[:-1],
        "64",
        "-o",
        out,
        check=False,
    )
    assert (
        proc.returncode == 1
        and "measured with other settings (max_seq_length)" in proc.stderr
    )
    assert out.read_bytes() == before


def test_quantize_keeps_the_fragile_module_at_8_bits(quantized):
    out, proc = quantized
    meta = json.loads((out / "optiq" / "metadata.json").read_text())
    assert meta["per_layer"][FRAGILE] == {"bits": 8, "group_size": 32}
    assert meta["achieved_bpw"] <= meta["target_bpw"] == 5.5
    assert (out / "optiq" / "sensitivity.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"][FRAGILE] == {"bits": 8, "group_size": 32}
    model, _ = mlx_lm.load(str(out))
    for path, entry in meta["per_layer"].items():
        module = dict(model.named_modules())[path]
        assert isinstance(module, nn.QuantizedLinear) and module.bits == entry["bits"]
    # bits per weight of the block linears, recomputed from the modules
    params = {
        p: dict(model.named_modules())[p].weight.shape[0]
        * dict(model.named_modules())[p].weight.shape[1]
        * 32
        // e["bits"]
        for p, e in meta["per_layer"].items()
    }
    bpw = sum(
        params[p] * storage_bits(e["bits"], 32) for p, e in meta["per_layer"].items()
    ) / sum(params.values())
    assert bpw == pytest.approx(meta["achieved_bpw"], abs=1e-3)


@pytest.mark.parametrize("policy", ["by_bits", "by_kl"])
def test_ranks_follow_the_measured_sensitivity(quantized, data_dir, tmp_path, policy):
    out, _ = quantized
    adapter = tmp_path / policy
    proc = lora(
        "--model", out, "--data", data_dir, *TRAIN_ARGS, "--num-layers", "4",
        "--rank-scaling", policy, "--rank", "4", "--adapter-path", adapter,
    )  # fmt: skip
    ranks = mlx_ranks(read_safetensors_header(adapter / "adapters.safetensors"))
    assert ranks[FRAGILE] == max(ranks.values()) == 8
    sidecar = json.loads((adapter / "optiq_lora_config.json").read_text())
    source = "bits_source" if policy == "by_bits" else "kl_source"
    expected = (
        "optiq/metadata.json" if policy == "by_bits" else "optiq/sensitivity.json"
    )
    assert sidecar["modules"][FRAGILE][source] == expected
    assert "falls back" not in proc.stdout


def test_quantized_model_measures_requantization(quantized, data_dir, tmp_path):
    out, _ = quantized
    proc = tool(
        "sensitivity", out, "--data", data_dir, *MEASURE, "-o", tmp_path / "s.json"
    )
    assert "already quantized: measuring re-quantization" in proc.stdout
    doc = json.loads((tmp_path / "s.json").read_text())
    layers = {l["layer_name"]: l["sensitivities"] for l in doc["layers"]}
    assert layers[FRAGILE]["4"] > 0 and layers[FRAGILE]["8"] == 0.0
    assert layers["model.layers.0.self_attn.q_proj"] == {"4": 0.0, "8": 0.0}


def test_choose_bits_greedy_arithmetic():
    modules = {
        "a": (100, {4: 1.0, 8: 0.0}),
        "b": (100, {4: 0.1, 8: 0.0}),
        "c": (200, {4: 0.5, 8: 0.0}),
    }
    # 4-bit everywhere costs 5 bits per weight at group size 32; room for 100 params at 8
    chosen, bpw = choose_bits(modules, [4, 8], 32, 6.0)
    assert chosen == {"a": 8, "b": 4, "c": 4} and bpw == 6.0
    # c saves more per extra bit (0.5/800 > 0.1/400) but only b still fits
    chosen, bpw = choose_bits(modules, [4, 8], 32, 7.0)
    assert chosen == {"a": 8, "b": 8, "c": 4} and bpw == 7.0
    chosen, bpw = choose_bits(modules, [4, 8], 32, 8.0)
    assert chosen == {"a": 8, "b": 4, "c": 8} and bpw == 8.0
    with pytest.raises(ValueError, match="below the 5.000 bits per weight"):
        choose_bits(modules, [4, 8], 32, 4.5)


def test_quantize_refuses_bad_input(measured, quantized, tmp_path):
    model, _ = measured
    out, _ = quantized
    proc = tool(
        "quantize",
        model,
        "-o",
        out,
        "--target-bpw",
        "5",
        "--group-size",
        "32",
        check=False,
    )
    assert proc.returncode == 1 and "exists and is not empty" in proc.stderr
    proc = tool("quantize", out, "-o", tmp_path / "x", "--target-bpw", "5", check=False)
    assert proc.returncode == 1 and "already quantized" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_modules_that_dont_fit_the_group_size_stay_unquantized(
    models, data_dir, tmp_path
):
    """Hidden size 96 at group size 64: the projections reading the hidden
    state can't be quantized (mlx-lm leaves them float); down_proj (192) can."""
    model = tiny_model.build_model(
        models / "llama-96", quantize=None, hidden=96, intermediate=192
    )
    measure = ["--group-size", "64", "--samples", "4", "--max-seq-length", "16"]
    proc = tool("sensitivity", model, "--data", data_dir, *measure)
    assert "note: 24 modules can't be quantized at group size 64" in proc.stdout
    assert "4 modules measured, 24 skipped (not quantizable)" in proc.stdout
    doc = json.loads((model / "optiq" / "sensitivity.json").read_text())
    layers = {l["layer_name"]: l for l in doc["layers"]}
    q = layers["model.layers.0.self_attn.q_proj"]
    assert q["skipped"] == "input dimension 96 is not a multiple of the group size 64"
    assert q["sensitivities"] == {}
    assert layers["model.layers.0.mlp.down_proj"]["sensitivities"]["4"] > 0

    out = tmp_path / "q"
    proc = tool("quantize", model, "-o", out, "--target-bpw", "6", "--group-size", "64")
    assert "note: 24 modules stay unquantized" in proc.stdout
    meta = json.loads((out / "optiq" / "metadata.json").read_text())
    assert meta["per_layer"]["model.layers.0.self_attn.q_proj"]["bits"] == 16
    loaded, _ = mlx_lm.load(str(out))
    modules = dict(loaded.named_modules())
    assert type(modules["model.layers.0.self_attn.q_proj"]) is nn.Linear
    assert isinstance(modules["model.layers.0.mlp.down_proj"], nn.QuantizedLinear)

    adapter = tmp_path / "a"
    lora(
        "--model", out, "--data", data_dir, *TRAIN_ARGS, "--num-layers", "1",
        "--rank-scaling", "by_bits", "--rank", "2", "--adapter-path", adapter,
    )  # fmt: skip
    ranks = mlx_ranks(read_safetensors_header(adapter / "adapters.safetensors"))
    assert ranks["model.layers.3.self_attn.q_proj"] == 8  # float: 16 bits -> 4x
    down_bits = meta["per_layer"]["model.layers.3.mlp.down_proj"]["bits"]
    assert ranks["model.layers.3.mlp.down_proj"] == 2 * down_bits // 4


def test_the_file_is_what_whole_model_trials_give(measured, data_dir):
    """Every KL in the file, from stacked trials that start at their own block
    and stop before the head, equals the KL of quantizing the module and
    running the whole model, one version at a time (how it was measured
    before), within 1e-5."""
    from mlx_lm_optiq import measuring, sensitivity

    model_dir, _ = measured
    doc = json.loads((model_dir / "optiq" / "sensitivity.json").read_text())
    model, tokenizer = mlx_lm.load(str(model_dir))
    rows = measuring.token_sequences(tokenizer, data_dir, 8, 32)
    whole = sensitivity.Reference(model, list(measuring.batches(rows, 8)), 4e9)
    whole.cached, whole.head = False, None  # the whole model, logits and all
    for target in measuring.block_targets(model):
        versions = [sensitivity.quantized(target.module, b, 32) for b in (4, 8)]
        expected = whole.kl(target, versions)
        entry = next(l for l in doc["layers"] if l["layer_name"] == target.path)
        got = [entry["sensitivities"]["4"], entry["sensitivities"]["8"]]
        assert got == pytest.approx(expected, abs=1e-5), target.path
    assert whole.stack_size() == 0


def test_a_blocks_trials_share_one_pass_with_a_head(measured, data_dir):
    from mlx_lm_optiq import measuring, sensitivity

    model_dir, _ = measured
    model, tokenizer = mlx_lm.load(str(model_dir))
    rows = measuring.token_sequences(tokenizer, data_dir, 8, 32)
    reference = sensitivity.Reference(model, list(measuring.batches(rows, 8)), 4e9)
    assert reference.head is not None and reference.stack_size() >= 14
    groups = sensitivity.trial_groups(
        reference, measuring.block_targets(model), [4, 8], 32
    )
    assert len(groups) == 4  # one pass per block: 7 modules x 2 bit-widths
    assert all(len(g) == 14 and len({t.block for t, _, _ in g}) == 1 for g in groups)


def test_layers_and_modules_limit_the_pass_and_it_says_how_long(
    fragile_model, data_dir, tmp_path
):
    out = tmp_path / "part.json"
    proc = tool("sensitivity", fragile_model, "--data", data_dir, *MEASURE,
                "--layers", "0,2-3", "--modules", "q_proj,down_proj", "-o", out)  # fmt: skip
    assert "sensitivity: 6 modules to measure, 12 trials" in proc.stdout
    assert "s per trial; about" in proc.stdout + proc.stderr  # after the first pass
    doc = json.loads(out.read_text())
    measured = {l["layer_name"] for l in doc["layers"]}
    assert measured == {f"model.layers.{i}.{m}" for i in (0, 2, 3)
                        for m in ("self_attn.q_proj", "mlp.down_proj")}  # fmt: skip
    assert doc["measured"] == {"layers": "0,2-3", "modules": "q_proj,down_proj"}
