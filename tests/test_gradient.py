"""The gradient signal (``sensitivity --signal gradient``) and ``--rank-scaling by_grad``."""

import hashlib
import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import peft
import pytest
import tiny_model
from conftest import BIN, TRAIN_ARGS, lora, read_json, run
from test_peft import hf_base, hf_logits, mlx_logits, to_transformers

from mlx_lm_optiq import gradient, measuring
from mlx_lm_optiq.adapter_read import load_tensors
from mlx_lm_optiq.ranks import parameter_count

ARGS = ["--samples", "8", "--max-seq-length", "32", "--batch-size", "4"]


def signal(model, data, *extra):
    return run([BIN / "mlx_lm_optiq.sensitivity", model, "--data", data,
                "--signal", "gradient", *ARGS, *extra])  # fmt: skip


@pytest.fixture(scope="module")
def fp_signal(tmp_path_factory, data_dir):
    model = tiny_model.build_model(tmp_path_factory.mktemp("g") / "fp", quantize=None)
    signal(model, data_dir)
    return model


def weight_gradient(model_dir, data_dir, path):
    """The gradient of the same loss w.r.t. one module's own weight, the usual way."""
    model, tokenizer = mlx_lm.load(str(model_dir))
    rows = measuring.token_sequences(tokenizer, data_dir, 8, 32)
    batches = list(measuring.batches(rows, 4))
    module = dict(model.named_modules())[path]
    model.freeze()
    module.unfreeze(keys=["weight"], recurse=False)
    grad_fn = nn.value_and_grad(model, gradient.next_token_loss)
    total = 0
    for tokens, mask in batches:
        _, grads = grad_fn(model, tokens, mask)
        total = total + dict(_flat(grads))[f"{path}.weight"]
    return np.array(total / len(batches)), np.array(module.weight)


def _flat(tree):
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


def test_the_signal_is_the_weight_gradient_and_its_top_directions(fp_signal, data_dir):
    doc = read_json(fp_signal / "optiq" / "gradient.json")
    right = load_tensors(fp_signal / "optiq" / "gradient.safetensors")
    assert len(doc["modules"]) == 28 and doc["complete"]
    for path in ("model.layers.1.self_attn.k_proj", "model.layers.3.mlp.down_proj"):
        g, w = weight_gradient(fp_signal, data_dir, path)
        entry = doc["modules"][path]
        assert entry["grad_norm"] == pytest.approx(np.linalg.norm(g), rel=1e-4)
        assert entry["importance"] == pytest.approx(np.abs(w * g).mean(), rel=1e-4)
        _, s, vt = np.linalg.svd(g)
        assert entry["sigma"][:3] == pytest.approx(s[:3].tolist(), rel=1e-3)
        mine = np.array(right[f"{path}.right"])
        assert mine.shape == (min(32, *g.shape), g.shape[1])
        cosines = np.abs((mine[:3] * vt[:3]).sum(axis=1))
        assert cosines.min() > 0.999, cosines
        assert np.allclose(mine @ mine.T, np.eye(len(mine)), atol=1e-3)


def test_the_pass_is_deterministic_and_resumes(fp_signal, data_dir, tmp_path):
    again = tmp_path / "again.json"
    signal(fp_signal, data_dir, "-o", again)
    first = fp_signal / "optiq" / "gradient"
    assert (
        json.loads(again.read_text())["modules"]
        == read_json(f"{first}.json")["modules"]
    )
    assert (tmp_path / "again.safetensors").read_bytes() == first.with_suffix(".safetensors").read_bytes()  # fmt: skip

    part = tmp_path / "part.json"
    signal(fp_signal, data_dir, "-o", part, "--layers", "0-1")
    assert {int(p.split(".")[2]) for p in read_json(part)["modules"]} == {0, 1}
    rest = signal(fp_signal, data_dir, "-o", part, "--cache-gb", "1e-9")
    assert "resuming: 14 modules already measured" in rest.stdout
    assert "14 modules in 2 group(s) of blocks" in rest.stdout  # a block per group
    resumed = read_json(part)["modules"]
    full = read_json(again)["modules"]
    assert list(resumed) == list(full)
    for path, entry in full.items():
        assert resumed[path]["importance"] == pytest.approx(
            entry["importance"], rel=1e-5
        )


def test_a_quantized_base_is_left_as_it_is_on_disk(mixed_model, data_dir, tmp_path):
    model = tmp_path / "q"
    shutil.copytree(mixed_model, model)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in model.iterdir() if p.is_file()}  # fmt: skip
    signal(model, data_dir)
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in model.iterdir() if p.is_file()}  # fmt: skip
    assert before == after
    doc = read_json(model / "optiq" / "gradient.json")
    assert len(doc["modules"]) == 28
    assert all(m["importance"] > 0 for m in doc["modules"].values())


def test_by_grad_spreads_the_budget_by_importance_and_loads_everywhere(
    fp_signal, data_dir, tmp_path
):
    adapter = tmp_path / "a"
    proc = lora(
        "--model", fp_signal, "--data", data_dir, *TRAIN_ARGS, "--num-layers", "-1",
        "--rank-scaling", "by_grad", "--rank-budget", "default", "--adapter-path", adapter,
    )  # fmt: skip
    assert "rank scaling: by_grad" in proc.stdout
    record = read_json(adapter / "optiq_lora_config.json")
    importance = {p: m["importance"] for p, m in read_json(fp_signal / "optiq" / "gradient.json")["modules"].items()}  # fmt: skip
    ranks = {p: m["rank"] for p, m in record["modules"].items()}
    assert {m["grad"] for m in record["modules"].values()} == set(importance.values())
    assert parameter_count(ranks, record["units"]) <= record["budget_parameters"]
    assert len(set(ranks.values())) > 3  # really spread
    # more importance never gets a smaller rank (but for the budget's last
    # single steps), except where a module's smaller dimension caps it
    capped = {p for p, r in ranks.items() if r == min(tiny_model.linear_dims(fp_signal)[p])}  # fmt: skip
    for p in ranks:
        for q in ranks:
            if importance[p] > importance[q] and p not in capped:
                assert ranks[p] >= ranks[q] - 1, (p, q)
    info = run([BIN / "mlx_lm_optiq.info", adapter]).stdout
    assert "scaling: by_grad" in info

    hf_dir = to_transformers(fp_signal, tmp_path / "hf")
    expected = mlx_logits(mlx_lm.load(str(fp_signal), adapter_path=str(adapter))[0])
    peft_model = peft.PeftModel.from_pretrained(hf_base(hf_dir), str(adapter)).eval()
    assert np.abs(hf_logits(peft_model) - expected).max() <= 1e-4


def test_by_grad_without_the_signal_says_how_to_get_it(mixed_model, data_dir, tmp_path):
    proc = lora(
        "--model", mixed_model, "--data", data_dir, *TRAIN_ARGS,
        "--rank-scaling", "by_grad", "--adapter-path", tmp_path / "a", check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "--signal gradient first" in proc.stderr
    assert not (tmp_path / "a").exists()


def test_top_right_singular_matches_numpy_on_both_shapes():
    rng = np.random.default_rng(0)
    for shape in ((12, 40), (40, 12)):
        g = rng.normal(size=shape).astype(np.float32)
        sigma, right = gradient.top_right_singular(mx.array(g), 5)
        _, s, vt = np.linalg.svd(g)
        assert np.allclose(np.array(sigma), s[:5], rtol=1e-4)
        assert np.abs((np.array(right) * vt[:5]).sum(axis=1)).min() > 0.9999
        peaks = np.array(right)[np.arange(5), np.abs(np.array(right)).argmax(axis=1)]
        assert (peaks > 0).all()


def test_lora_init_gradient_starts_lora_a_on_the_top_directions(
    fp_signal, data_dir, tmp_path
):
    start = tmp_path / "start"
    proc = lora(
        "--model", fp_signal, "--data", data_dir, *TRAIN_ARGS, "--iters", "1",
        "--learning-rate", "0", "--num-layers", "-1", "--rank-scaling", "constant",
        "--lora-init", "gradient", "--adapter-path", start,
    )  # fmt: skip
    assert "lora_a of 28 modules from the gradient's top right singular vectors" in proc.stdout  # fmt: skip
    right = load_tensors(fp_signal / "optiq" / "gradient.safetensors")
    saved = mx.load(str(start / "adapters.safetensors"))
    for path in tiny_model.linear_dims(fp_signal):
        expected = right[f"{path}.right"][:8].T / np.sqrt(3)
        assert mx.allclose(saved[f"{path}.lora_a"], expected, atol=1e-6), path
        assert mx.abs(saved[f"{path}.lora_b"]).max().item() == 0  # starts as the base
    assert read_json(start / "optiq_lora_config.json")["settings"]["lora_init"] == "gradient"  # fmt: skip

    # trained on, it is an ordinary adapter: mlx-lm, PEFT, serve, info
    adapter = tmp_path / "a"
    lora(
        "--model", fp_signal, "--data", data_dir, *TRAIN_ARGS, "--num-layers", "-1",
        "--rank-scaling", "by_grad", "--lora-init", "gradient", "--lora-plus-ratio", "4",
        "--adapter-path", adapter,
    )  # fmt: skip
    info = run([BIN / "mlx_lm_optiq.info", adapter]).stdout
    assert "trained with: lora_init gradient, lora_plus_ratio 4.0" in info
    model = mlx_lm.load(str(fp_signal), adapter_path=str(adapter))[0]
    expected = mlx_logits(model)
    hf_dir = to_transformers(fp_signal, tmp_path / "hf")
    peft_model = peft.PeftModel.from_pretrained(hf_base(hf_dir), str(adapter)).eval()
    assert np.abs(hf_logits(peft_model) - expected).max() <= 1e-4
    from test_serve import complete, expected_outputs, start_server

    proc, client, _ = start_server(fp_signal, {"g": adapter})
    try:
        expected = expected_outputs(fp_signal, {"g": adapter})
        assert expected["g"][0] != expected[None][0]  # the adapter changes answers
        assert complete(client, "g") == expected["g"][0]
        assert complete(client, None) == expected[None][0]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_lora_init_gradient_without_the_signal_says_how_to_get_it(
    mixed_model, data_dir, tmp_path
):
    proc = lora(
        "--model", mixed_model, "--data", data_dir, *TRAIN_ARGS, "--lora-init", "gradient",
        "--adapter-path", tmp_path / "a", check=False,
    )  # fmt: skip
    assert proc.returncode == 1 and "--signal gradient first" in proc.stderr
