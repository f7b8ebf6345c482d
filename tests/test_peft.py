"""PEFT interoperability, both directions, proved by logits.

The tiny mlx models are dequantized and saved as transformers checkpoints, so
PEFT runs on exactly the weights mlx-lm computes with.
"""

import json
import logging
import warnings

import mlx.core as mx
import mlx_lm
import numpy as np
import peft
import pytest
import tiny_model
import torch
import transformers
from conftest import TRAIN_ARGS, lora, read_json

from mlx_lm_optiq import _startup
from mlx_lm_optiq.adapter_read import peft_pattern_key
from mlx_lm_optiq.export import main as export

PROJECTIONS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
TOKENS = [4, 17, 9, 23, 31, 8, 12, 40, 5, 11]


def mlx_logits(model):
    return np.array(model(mx.array([TOKENS]))[0].astype(mx.float32))


def hf_logits(model):
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0].float().numpy()


def to_transformers(mlx_dir, out):
    """Save the dequantized mlx model as a float32 transformers checkpoint."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import dequantize_model
    from safetensors.numpy import save_file

    model, _ = mlx_lm.load(str(mlx_dir))
    model = dequantize_model(model)
    weights = {
        k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = read_json(mlx_dir / "config.json")
    for key in ("quantization", "quantization_config"):
        config.pop(key, None)
    config["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def arch_setup(request, models, data_dir, tmp_path_factory):
    """A mixed 4/8-bit tiny model, its transformers twin, and a by_bits adapter."""
    arch = request.param
    mlx_dir = tiny_model.build_model(
        models / f"{arch}-peft", arch=arch, quantize="mixed"
    )
    hf_dir = to_transformers(mlx_dir, models / f"{arch}-hf")
    adapter = tmp_path_factory.mktemp(f"{arch}-adapter") / "a"
    lora(
        "--model", mlx_dir, "--data", data_dir, *TRAIN_ARGS, "--learning-rate", "1e-2",
        "--rank-scaling", "by_bits", "--rank", "4", "--adapter-path", adapter,
    )  # fmt: skip
    return arch, mlx_dir, hf_dir, adapter


@pytest.fixture(scope="module")
def llama_pair(models):
    """A mixed-precision tiny Llama and its transformers twin (no adapter)."""
    mlx_dir = tiny_model.build_model(models / "llama-pair", quantize="mixed")
    return mlx_dir, to_transformers(mlx_dir, models / "llama-pair-hf")


def hf_base(hf_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32
    ).eval()


def test_written_peft_layout_reproduces_mlx_logits(arch_setup):
    arch, mlx_dir, hf_dir, adapter = arch_setup
    model, _ = mlx_lm.load(str(mlx_dir), adapter_path=str(adapter))
    expected = mlx_logits(model)

    base = hf_base(hf_dir)
    base_logits = hf_logits(base)
    peft_model = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
    got = hf_logits(peft_model)
    assert np.abs(got - expected).max() <= 1e-4
    # the adapter changes the function enough for that bound to mean something
    assert np.abs(base_logits - expected).max() > 1e-2

    # mixed ranks on all seven projection types, as PEFT built them
    ranks = {
        name.removeprefix("base_model.model."): m.r["default"]
        for name, m in peft_model.named_modules()
        if hasattr(m, "r") and "default" in getattr(m, "r", {})
    }
    kinds = {p.rsplit(".", 1)[-1] for p in ranks}
    assert kinds == set(PROJECTIONS)
    assert ranks["model.layers.3.self_attn.v_proj"] == 8
    assert ranks["model.layers.3.self_attn.k_proj"] == 4
    assert len(ranks) == 14


def test_peft_tensors_are_the_mlx_tensors_transposed(arch_setup):
    _, _, _, adapter = arch_setup
    mlx_w = mx.load(str(adapter / "adapters.safetensors"))
    peft_w = mx.load(str(adapter / "adapter_model.safetensors"))
    assert len(peft_w) == len(mlx_w) == 28
    for name, w in mlx_w.items():
        path, leaf = name.rsplit(".", 1)
        key = f"base_model.model.{path}.lora_{leaf[-1].upper()}.weight"
        assert mx.array_equal(peft_w[key], w.T)  # bit-exact


def _warnings_from(load, caplog, capfd):
    """Everything ``load()`` warns about, through warnings, logging or stderr."""
    capfd.readouterr()
    caplog.clear()
    with (
        warnings.catch_warnings(record=True) as caught,
        caplog.at_level(logging.WARNING),
    ):
        warnings.simplefilter("always")
        result = load()
    _, err = capfd.readouterr()
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    return result, said + ([err] if err else [])


def test_clean_peft_export_loads_without_warnings(arch_setup, tmp_path, caplog, capfd):
    arch, mlx_dir, hf_dir, adapter = arch_setup
    out = tmp_path / "peft"
    assert export([str(adapter), "--peft", str(out), "--base", str(hf_dir)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    config = read_json(out / "adapter_config.json")
    assert "lora_parameters" not in config and "num_layers" not in config
    expected = mlx_logits(mlx_lm.load(str(mlx_dir), adapter_path=str(adapter))[0])

    # What PEFT says when it loads an adapter it saved itself is the baseline:
    # this transformers release warns about its own deprecations there.
    _peft_adapter(hf_dir, tmp_path / "native", r=4, target_modules=["q_proj"])
    _, baseline = _warnings_from(
        lambda: peft.PeftModel.from_pretrained(
            hf_base(hf_dir), str(tmp_path / "native")
        ),
        caplog,
        capfd,
    )
    base = hf_base(hf_dir)
    peft_model, said = _warnings_from(
        lambda: peft.PeftModel.from_pretrained(base, str(out)), caplog, capfd
    )
    assert [w for w in said if w not in baseline] == []
    assert np.abs(hf_logits(peft_model.eval()) - expected).max() <= 1e-4

    # the combined directory loads too, but PEFT warns about mlx-lm's keys
    _, said = _warnings_from(
        lambda: peft.PeftModel.from_pretrained(hf_base(hf_dir), str(adapter)),
        caplog,
        capfd,
    )
    assert any("Unexpected keyword arguments" in w for w in said)


def stock_logits(mlx_dir, adapter):
    """Logits of ``mlx_dir`` with ``adapter`` as stock mlx-lm (no plugin) loads it."""
    _startup.uninstall()
    try:
        stock, _ = mlx_lm.load(str(mlx_dir), adapter_path=str(adapter))
    finally:
        _startup.install()
    return mlx_logits(stock)


def test_padded_export_loads_in_stock_mlx_lm(arch_setup, tmp_path):
    arch, mlx_dir, _, adapter = arch_setup
    expected = mlx_logits(mlx_lm.load(str(mlx_dir), adapter_path=str(adapter))[0])
    out = tmp_path / "padded"
    assert export([str(adapter), "--pad", str(out)]) == 0
    config = read_json(out / "adapter_config.json")
    assert config["lora_parameters"]["rank"] == 8
    assert "rank_pattern" not in config["lora_parameters"]
    assert np.abs(stock_logits(mlx_dir, out) - expected).max() <= 1e-5


def _peft_adapter(hf_dir, out, **config):
    """A PEFT LoRA adapter made by PEFT itself, with non-zero B matrices."""
    base = hf_base(hf_dir)
    torch.manual_seed(0)
    model = peft.get_peft_model(base, peft.LoraConfig(**config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(str(out))
    return hf_logits(model.eval())


PEFT_CASES = {
    "patterns": dict(
        r=4,
        lora_alpha=8,
        target_modules=list(PROJECTIONS),
        rank_pattern={"v_proj": 12, r"layers\.1\.mlp\.down_proj": 6},
        alpha_pattern={"k_proj": 32, "layers.2.self_attn.q_proj": 3},
        layers_to_transform=[1, 2],
    ),
    "rslora": dict(
        r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "down_proj"]
    ),
}


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_adapter_loads_in_mlx(arch_setup, tmp_path, case):
    arch, mlx_dir, hf_dir, _ = arch_setup
    out = tmp_path / "peft"
    expected = _peft_adapter(hf_dir, out, **PEFT_CASES[case])
    model, _ = mlx_lm.load(str(mlx_dir), adapter_path=str(out))
    assert np.abs(mlx_logits(model) - expected).max() <= 1e-4
    base, _ = mlx_lm.load(str(mlx_dir))
    assert np.abs(mlx_logits(base) - expected).max() > 1e-3


def test_peft_adapter_pads_for_stock_mlx_lm(arch_setup, tmp_path):
    arch, mlx_dir, hf_dir, _ = arch_setup
    expected = _peft_adapter(hf_dir, tmp_path / "peft", **PEFT_CASES["patterns"])
    assert export([str(tmp_path / "peft"), "--pad", str(tmp_path / "padded")]) == 0
    assert np.abs(stock_logits(mlx_dir, tmp_path / "padded") - expected).max() <= 1e-4


def test_pattern_keys_follow_peft():
    from peft.utils.other import get_pattern_key

    patterns = [
        "v_proj",
        r"layers\.1\.mlp\.down_proj",
        "q_proj",
        "layers.2.self_attn.q_proj",
    ]
    for path in [
        "model.layers.1.mlp.down_proj",
        "model.layers.11.mlp.down_proj",
        "model.layers.2.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.0.self_attn.o_proj",
    ]:
        theirs = get_pattern_key(patterns, path)
        assert peft_pattern_key(patterns, path) == (theirs if theirs != path else None)


@pytest.mark.parametrize(
    "config, feature",
    [
        (dict(use_dora=True), "DoRA"),
        (dict(lora_bias=True), "lora_bias"),
        (dict(bias="all"), "bias='all'"),
        (dict(modules_to_save=["lm_head"]), "modules_to_save"),
        (dict(target_modules=["embed_tokens"]), "embedding adapters"),
    ],
)
def test_unsupported_peft_variants_are_refused(llama_pair, tmp_path, config, feature):
    mlx_dir, hf_dir = llama_pair
    _peft_adapter(
        hf_dir, tmp_path / "a", **{"r": 4, "target_modules": ["q_proj"], **config}
    )
    with pytest.raises(ValueError, match=feature):
        mlx_lm.load(str(mlx_dir), adapter_path=str(tmp_path / "a"))


def test_adapter_for_another_base_is_refused_before_any_change(
    llama_pair, tmp_path, models
):
    _, hf_dir = llama_pair
    _peft_adapter(hf_dir, tmp_path / "a", r=4, target_modules=["q_proj"])
    wider = tiny_model.build_model(models / "llama-wide", hidden=128, intermediate=256)
    model, _ = mlx_lm.load(str(wider))
    from mlx_lm_optiq.adapter_load import load_peft_adapter

    with pytest.raises(
        ValueError, match="adapts a 128->128 layer .* another base model"
    ):
        load_peft_adapter(model, tmp_path / "a")
    assert type(model.layers[0].self_attn.q_proj).__name__ == "QuantizedLinear"


def test_unverified_architecture_is_refused(tmp_path, by_bits_adapter):
    sidecar = read_json(by_bits_adapter / "optiq_lora_config.json")
    assert sidecar["model_type"] == "llama"
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in ("adapters.safetensors", "adapter_config.json"):
        (copy / f).write_bytes((by_bits_adapter / f).read_bytes())
    (copy / "optiq_lora_config.json").write_text(
        json.dumps({**sidecar, "model_type": "gemma3"})
    )
    assert export([str(copy), "--peft", str(tmp_path / "out")]) == 1
    assert not (tmp_path / "out").exists()


def test_info_reads_peft_dir(llama_pair, tmp_path):
    from mlx_lm_optiq.adapter_record import from_adapter_dir

    _, hf_dir = llama_pair
    _peft_adapter(hf_dir, tmp_path / "a", **PEFT_CASES["patterns"])
    summary = from_adapter_dir(tmp_path / "a")
    assert summary.kind == "peft"
    # 2 layers x 7 modules; v_proj at 12 in both, down_proj of layer 1 at 6
    assert sorted(summary.ranks.values()) == [4] * 11 + [6] + [12, 12]


def test_left_out_modules_are_not_targeted_and_logits_match(
    arch_setup, data_dir, tmp_path
):
    """A budget too small for every module: rank 0 leaves some out, and PEFT
    builds exactly the others."""
    arch, mlx_dir, hf_dir, _ = arch_setup
    adapter = tmp_path / "small"
    lora(
        "--model", mlx_dir, "--data", data_dir, *TRAIN_ARGS,
        "--num-layers", "-1", "--learning-rate", "1e-2", "--rank-scaling", "constant",
        "--rank-budget", "3k", "--rank", "4", "--adapter-path", adapter,
    )  # fmt: skip
    pattern = read_json(adapter / "adapter_config.json")["lora_parameters"][
        "rank_pattern"
    ]
    adapted = {p for p, r in pattern.items() if r}
    assert 0 < len(adapted) < len(pattern)
    expected = mlx_logits(mlx_lm.load(str(mlx_dir), adapter_path=str(adapter))[0])
    peft_model = peft.PeftModel.from_pretrained(hf_base(hf_dir), str(adapter)).eval()
    built = {
        name.removeprefix("base_model.model.")
        for name, m in peft_model.named_modules()
        if "default" in getattr(m, "r", {})
    }
    assert built == adapted
    assert np.abs(hf_logits(peft_model) - expected).max() <= 1e-4


@pytest.mark.parametrize("rule, factor", [("per-rank", 0.5), ("rslora", 0.5**0.5)])
def test_lora_scale_follows_rank_everywhere_it_loads(
    arch_setup, data_dir, tmp_path, rule, factor
):
    """--lora-scale: the rank-8 modules train at 20 * factor, the rank-4 ones
    at 20; mlx-lm, PEFT, the padded export and info all compute with it."""
    arch, mlx_dir, hf_dir, _ = arch_setup
    adapter = tmp_path / "a"
    lora(
        "--model", mlx_dir, "--data", data_dir, *TRAIN_ARGS, "--learning-rate", "1e-2",
        "--rank-scaling", "by_bits", "--rank", "4", "--lora-scale", rule,
        "--adapter-path", adapter,
    )  # fmt: skip
    model, _ = mlx_lm.load(str(mlx_dir), adapter_path=str(adapter))
    layers = {p: m for p, m in model.named_modules() if "lora_a" in m}
    assert len(layers) == 14
    for path, layer in layers.items():
        rank = layer.lora_a.shape[1]
        assert layer.scale == pytest.approx(20.0 * (factor if rank == 8 else 1.0)), path
    config = read_json(adapter / "adapter_config.json")
    for path, layer in layers.items():
        alpha = config["alpha_pattern"].get(path, config["lora_alpha"])
        assert alpha == pytest.approx(layer.scale * layer.lora_a.shape[1]), path
    expected = mlx_logits(model)
    peft_model = peft.PeftModel.from_pretrained(hf_base(hf_dir), str(adapter)).eval()
    assert np.abs(hf_logits(peft_model) - expected).max() <= 1e-4

    clean = tmp_path / "peft"
    assert export([str(adapter), "--peft", str(clean)]) == 0
    peft_model = peft.PeftModel.from_pretrained(hf_base(hf_dir), str(clean)).eval()
    assert np.abs(hf_logits(peft_model) - expected).max() <= 1e-4

    out = tmp_path / "padded"
    assert export([str(adapter), "--pad", str(out)]) == 0
    assert np.abs(stock_logits(mlx_dir, out) - expected).max() <= 1e-5
    sidecar = read_json(adapter / "optiq_lora_config.json")
    assert sidecar["settings"]["lora_scale"] == rule
    from conftest import BIN, run

    info = run([BIN / "mlx_lm_optiq.info", adapter]).stdout
    assert f"(per module {20 * factor:.4g}-20, lora_scale {rule})" in info
    described = json.loads(run([BIN / "mlx_lm_optiq.info", adapter, "--json"]).stdout)
    assert {p: m["scale"] for p, m in described["modules"].items()} == {
        p: pytest.approx(layer.scale) for p, layer in layers.items()
    }
    assert described["settings"]["lora_scale"] == rule
