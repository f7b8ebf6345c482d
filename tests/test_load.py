"""Mixed-rank adapters load back in mlx-lm: load, generate, fuse, server."""

import json
import socket
import subprocess
import time
import urllib.request

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from conftest import BIN, read_json, run
from mlx.utils import tree_flatten

from mlx_lm_optiq import _startup
from mlx_lm_optiq.adapter_read import mlx_ranks, read_safetensors_header

PROMPT = "the cat sees a big red"


def logits(model, tokens):
    return model(mx.array([tokens]))[0].astype(mx.float32)


def tokens_of(tokenizer):
    return tokenizer.encode(PROMPT)


def test_load_rebuilds_each_module_at_its_rank(by_bits_adapter, mixed_model):
    model, tok = mlx_lm.load(str(mixed_model), adapter_path=str(by_bits_adapter))
    ranks = mlx_ranks(read_safetensors_header(by_bits_adapter / "adapters.safetensors"))
    params = dict(tree_flatten(model.parameters()))
    for path, rank in ranks.items():
        assert params[f"{path}.lora_a"].shape[1] == rank
    # the trained weights are the ones in the file
    saved = mx.load(str(by_bits_adapter / "adapters.safetensors"))
    for name, w in saved.items():
        assert mx.array_equal(params[name], w)


def _mixed_rank_model(model_path, pattern, seed=0):
    """A model converted in-process with per-module ranks and non-zero lora_b."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, tok = mlx_lm.load(str(model_path))
    model.freeze()
    linear_to_lora_layers(
        model, 2, {"rank": 4, "scale": 20.0, "dropout": 0.0, "rank_pattern": pattern}
    )
    mx.random.seed(seed)
    updates = [
        (name, mx.random.normal(w.shape) * 0.05)
        for name, w in tree_flatten(model.trainable_parameters())
        if name.endswith("lora_b")
    ]
    model.load_weights(updates, strict=False)
    return model, tok


def _write_mlx_adapter(path, model, lora_parameters, extra_config=None):
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(
        str(path / "adapters.safetensors"),
        dict(tree_flatten(model.trainable_parameters())),
    )
    config = {
        "fine_tune_type": "lora",
        "num_layers": 2,
        "lora_parameters": lora_parameters,
    }
    (path / "adapter_config.json").write_text(
        json.dumps({**config, **(extra_config or {})})
    )


def test_round_trip_logits(tmp_path, mixed_model):
    pattern = {
        "model.layers.3.self_attn.q_proj": 2,
        "model.layers.3.self_attn.v_proj": 16,
        "model.layers.2.mlp.down_proj": 12,
    }
    model, tok = _mixed_rank_model(mixed_model, pattern)
    tokens = tokens_of(tok)
    before = logits(model, tokens)
    params = {"rank": 4, "scale": 20.0, "dropout": 0.0, "rank_pattern": pattern}
    _write_mlx_adapter(tmp_path / "a", model, params)

    loaded, _ = mlx_lm.load(str(mixed_model), adapter_path=str(tmp_path / "a"))
    after = logits(loaded, tokens)
    base, _ = mlx_lm.load(str(mixed_model))
    assert mx.abs(after - before).max().item() < 1e-5
    # and the adapter does change the function, so the comparison means something
    assert mx.abs(logits(base, tokens) - before).max().item() > 1e-2


def test_adapter_without_rank_pattern_loads_from_shapes(tmp_path, mixed_model):
    """mlx-optiq 0.7.7 writes mixed ranks with only lora_parameters.rank."""
    pattern = {
        "model.layers.2.self_attn.q_proj": 8,
        "model.layers.3.self_attn.q_proj": 8,
        "model.layers.3.mlp.down_proj": 16,
    }
    model, tok = _mixed_rank_model(mixed_model, pattern)
    before = logits(model, tokens_of(tok))
    adapter = tmp_path / "optiq077"
    _write_mlx_adapter(
        adapter, model, {"rank": 4, "scale": 20.0, "dropout": 0.0, "keys": None}
    )
    (adapter / "optiq_lora_config.json").write_text(
        json.dumps(
            {
                "rank": 4,
                "rank_scaling": "by_bits",
                "applied_ranks": {
                    "layer_3.mlp.down_proj": 16,
                    "layer_3.self_attn.q_proj": 8,
                },
                "source_model": "mlx-community/Qwen3.5-9B-OptiQ-4bit",
            }
        )
    )
    loaded, _ = mlx_lm.load(str(mixed_model), adapter_path=str(adapter))
    assert mx.abs(logits(loaded, tokens_of(tok)) - before).max().item() < 1e-5

    # stock mlx-lm refuses it with a shape error
    _startup.uninstall()
    try:
        with pytest.raises(ValueError, match="does not match model parameter shape"):
            mlx_lm.load(str(mixed_model), adapter_path=str(adapter))
    finally:
        _startup.install()


def test_rank_pattern_for_modules_that_are_not_adapted_is_refused(
    tmp_path, mixed_model
):
    model, _ = _mixed_rank_model(mixed_model, {"model.layers.3.self_attn.q_proj": 8})
    params = {
        "rank": 4, "scale": 20.0, "dropout": 0.0,
        "rank_pattern": {"model.layers.0.self_attn.q_proj": 8},  # layer 0 is not adapted
    }  # fmt: skip
    _write_mlx_adapter(tmp_path / "a", model, params)
    with pytest.raises(ValueError, match="model.layers.0.self_attn.q_proj"):
        mlx_lm.load(str(mixed_model), adapter_path=str(tmp_path / "a"))


def _greedy(model, tok, max_tokens=8):
    return mlx_lm.generate(model, tok, PROMPT, max_tokens=max_tokens)


def test_generate_cli(by_bits_adapter, mixed_model):
    model, tok = mlx_lm.load(str(mixed_model), adapter_path=str(by_bits_adapter))
    expected = _greedy(model, tok)
    assert len(expected) >= 4
    proc = run(
        [
            BIN / "mlx_lm.generate", "--model", mixed_model,
            "--adapter-path", by_bits_adapter, "--prompt", PROMPT,
            "--max-tokens", "8", "--ignore-chat-template", "--verbose", "False",
        ]
    )  # fmt: skip
    assert proc.stdout.strip() == expected.strip()


def test_fuse_cli(tmp_path, by_bits_adapter, mixed_model):
    model, tok = mlx_lm.load(str(mixed_model), adapter_path=str(by_bits_adapter))
    fused_path = tmp_path / "fused"
    run(
        [
            BIN / "mlx_lm.fuse", "--model", mixed_model, "--adapter-path",
            by_bits_adapter, "--save-path", fused_path, "--dequantize",
        ]
    )  # fmt: skip
    fused, _ = mlx_lm.load(str(fused_path))
    tokens = tokens_of(tok)
    diff = mx.abs(logits(fused, tokens) - logits(model, tokens)).max().item()
    assert diff < 1e-3
    base, _ = mlx_lm.load(str(mixed_model))
    assert mx.abs(logits(base, tokens) - logits(fused, tokens)).max().item() > 1e-3


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_cli(by_bits_adapter, mixed_model):
    model, tok = mlx_lm.load(str(mixed_model), adapter_path=str(by_bits_adapter))
    expected = _greedy(model, tok)
    port = _free_port()
    server = subprocess.Popen(
        [
            str(BIN / "mlx_lm.server"), "--model", str(mixed_model),
            "--adapter-path", str(by_bits_adapter), "--host", "127.0.0.1",
            "--port", str(port),
        ],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        body = json.dumps(
            {"prompt": PROMPT, "max_tokens": 8, "temperature": 0.0}
        ).encode()
        deadline = time.monotonic() + 60
        while True:
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/v1/completions",
                    data=body,
                    headers={"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(request, timeout=30) as response:
                    reply = json.load(response)
                break
            except (ConnectionError, urllib.error.URLError):
                assert server.poll() is None, server.stdout.read()
                assert time.monotonic() < deadline, "server did not start in 60 s"
                time.sleep(0.5)
        assert reply["choices"][0]["text"] == expected
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_sidecar_is_not_needed_to_load(tmp_path, by_bits_adapter, mixed_model):
    """adapter_config.json alone carries the ranks: the sidecar is informational."""
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("adapter_config.json", "adapters.safetensors"):
        (copy / name).write_bytes((by_bits_adapter / name).read_bytes())
    a, tok = mlx_lm.load(str(mixed_model), adapter_path=str(by_bits_adapter))
    b, _ = mlx_lm.load(str(mixed_model), adapter_path=str(copy))
    t = tokens_of(tok)
    np.testing.assert_array_equal(np.array(logits(a, t)), np.array(logits(b, t)))
    assert read_json(copy / "adapter_config.json")["lora_parameters"]["rank_pattern"]
