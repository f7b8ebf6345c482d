"""``python -m mlx_lm_optiq.info`` on every kind of adapter directory."""

import json
import sys

import mlx.core as mx
import numpy as np
import pytest
from conftest import run

from mlx_lm_optiq.info import main


def info(*args, check=True):
    return run([sys.executable, "-m", "mlx_lm_optiq.info", *args], check=check)


def test_our_adapter(by_bits_adapter, mixed_model):
    out = info(by_bits_adapter).stdout
    assert out.splitlines()[:6] == [
        "OptiQ LoRA adapter",
        f"  base: {mixed_model}",
        "  ranks: 4-8 per module (base rank 4, scaling: by_bits)",
        "  scale: 20.0  dropout: 0.0",
        "  rank distribution: {4: 10, 8: 4} across 14 adapted modules",
        "  adapter parameters: 10,496 (1.28x the 8,192 of constant rank 4)",
    ]


def test_layers_table(by_bits_adapter):
    lines = info(by_bits_adapter, "--layers").stdout.splitlines()
    rows = [l.split() for l in lines if l.strip().startswith("model.layers.")]
    assert len(rows) == 14
    assert ["model.layers.3.self_attn.v_proj", "8", "8", "-", "config.json"] in rows
    assert ["model.layers.2.self_attn.q_proj", "4", "4", "-", "config.json"] in rows
    # layer order, not string order
    assert rows[0][0].startswith("model.layers.2.")


def test_json(by_bits_adapter):
    doc = json.loads(info(by_bits_adapter, "--json").stdout)
    assert doc["trainable_parameters"] == 10496
    assert doc["constant_rank_parameters"] == 8192
    assert doc["rank_distribution"] == {"4": 10, "8": 4}
    assert doc["modules"]["model.layers.3.mlp.down_proj"]["rank"] == 8
    assert doc["modules"]["model.layers.3.mlp.down_proj"]["bits"] == 8


def _lora_tensors(ranks, dims, peft=False):
    tensors = {}
    for path, r in ranks.items():
        i, o = dims
        if peft:
            tensors[f"base_model.model.{path}.lora_A.weight"] = mx.zeros((r, i))
            tensors[f"base_model.model.{path}.lora_B.weight"] = mx.zeros((o, r))
        else:
            tensors[f"{path}.lora_a"] = mx.zeros((i, r))
            tensors[f"{path}.lora_b"] = mx.zeros((r, o))
    return tensors


def test_stock_mlx_lm_adapter(tmp_path):
    mx.save_safetensors(
        str(tmp_path / "adapters.safetensors"),
        _lora_tensors(
            {f"model.layers.{i}.self_attn.q_proj": 8 for i in range(3)}, (64, 64)
        ),
    )
    (tmp_path / "adapter_config.json").write_text(
        json.dumps(
            {
                "model": "mlx-community/x",
                "lora_parameters": {"rank": 8, "scale": 20.0, "dropout": 0.05},
            }
        )
    )
    out = info(tmp_path).stdout
    assert "mlx-lm LoRA adapter" in out
    assert "ranks: 8 per module (base rank 8)" in out
    assert "scale: 20.0  dropout: 0.05" in out
    assert "{8: 3} across 3 adapted modules" in out
    assert "adapter parameters: 3,072 (1.00x the 3,072 of constant rank 8)" in out


def test_mlx_optiq_077_adapter(tmp_path):
    ranks = {"model.layers.0.self_attn.q_proj": 16, "model.layers.0.mlp.up_proj": 8}
    mx.save_safetensors(
        str(tmp_path / "adapters.safetensors"), _lora_tensors(ranks, (32, 32))
    )
    (tmp_path / "adapter_config.json").write_text(
        json.dumps(
            {
                "fine_tune_type": "lora",
                "num_layers": 1,
                "lora_parameters": {
                    "rank": 8,
                    "scale": 20.0,
                    "dropout": 0.0,
                    "keys": None,
                },
                "peft_type": "LORA",
                "r": 8,
                "lora_alpha": 160,
            }
        )
    )
    (tmp_path / "optiq_lora_config.json").write_text(
        json.dumps(
            {
                "rank": 8,
                "rank_scaling": "by_bits",
                "applied_ranks": {
                    "layer_0.self_attn.q_proj": 16,
                    "layer_0.mlp.up_proj": 8,
                },
                "source_model": "mlx-community/Qwen3.5-9B-OptiQ-4bit",
            }
        )
    )
    out = info(tmp_path).stdout
    assert "OptiQ LoRA adapter (mlx-optiq)" in out
    assert "base: mlx-community/Qwen3.5-9B-OptiQ-4bit" in out
    assert "ranks: 8-16 per module (base rank 8, scaling: by_bits)" in out
    assert "{8: 1, 16: 1} across 2 adapted modules" in out


def test_peft_adapter(tmp_path):
    from safetensors.numpy import save_file

    ranks = {
        "model.layers.0.self_attn.q_proj": 4,
        "model.layers.0.self_attn.v_proj": 12,
    }
    save_file(
        {k: np.array(v) for k, v in _lora_tensors(ranks, (64, 32), peft=True).items()},
        str(tmp_path / "adapter_model.safetensors"),
    )
    (tmp_path / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": 4,
                "lora_alpha": 8,
                "lora_dropout": 0.1,
                "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M",
                "rank_pattern": {"v_proj": 12},
            }
        )
    )
    out = info(tmp_path).stdout
    assert "PEFT LoRA adapter" in out
    assert "ranks: 4-12 per module (base rank 4)" in out
    assert "scale: 2.0  dropout: 0.1" in out
    assert "{4: 1, 12: 1} across 2 adapted modules" in out
    assert "adapter parameters: 1,536 (2.00x the 768 of constant rank 4)" in out


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"", "too short"),
        (b"\xff" * 16, "truncated or not a safetensors file"),
        (b"\x02\x00\x00\x00\x00\x00\x00\x00{]", "bad header"),
    ],
)
def test_broken_weights_say_which_file(tmp_path, capsys, content, problem):
    (tmp_path / "adapters.safetensors").write_bytes(content)
    assert main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert problem in err and "adapters.safetensors" in err


def test_not_a_directory(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 1
    assert "not an adapter directory" in capsys.readouterr().err
