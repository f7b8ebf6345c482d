"""``--base-compute dequantized``: the quantized base's function, faster layers,
an adapter for the quantized model."""

import types

import mlx.core as mx
import mlx_lm
import mlx_lm.lora
import numpy as np
from conftest import TRAIN_ARGS, lora, read_json
from mlx.utils import tree_flatten
from mlx_lm.tuner.datasets import load_dataset
from mlx_lm.tuner.trainer import TrainingCallback

TOKENS = [4, 17, 9, 23, 31, 8, 12, 40, 5, 11]


class Losses(TrainingCallback):
    def __init__(self):
        self.train = []

    def on_train_loss_report(self, info):
        self.train.append(info["train_loss"])


def train(model_path, data, adapter, base_compute):
    config = dict(mlx_lm.lora.CONFIG_DEFAULTS)
    config.update(
        model=str(model_path), data=str(data), adapter_path=str(adapter), train=True,
        iters=8, batch_size=2, val_batches=1, steps_per_eval=100, steps_per_report=1,
        num_layers=4, learning_rate=1e-3, seed=5, rank_scaling="by_bits", rank=4,
        rank_budget=None, base_compute=base_compute,
    )  # fmt: skip
    args = types.SimpleNamespace(**config)
    model, tokenizer = mlx_lm.load(str(model_path))
    train_set, valid_set, _ = load_dataset(args, tokenizer)
    losses = Losses()
    np.random.seed(args.seed)
    mlx_lm.lora.train_model(args, model, train_set, valid_set, losses)
    return model, losses.train


def logits(model):
    return np.array(model(mx.array([TOKENS]))[0].astype(mx.float32))


def test_dequantized_base_trains_the_same_adapter(mixed_model, data_dir, tmp_path):
    q_model, q_losses = train(mixed_model, data_dir, tmp_path / "q", "quantized")
    d_model, d_losses = train(mixed_model, data_dir, tmp_path / "d", "dequantized")
    assert len(q_losses) == len(d_losses) == 8
    # the same function up to float rounding: per-step losses within 1e-4
    assert np.allclose(d_losses, q_losses, rtol=1e-4, atol=0), (q_losses, d_losses)
    assert q_losses[-1] < q_losses[0]  # it trained
    kinds = {type(m).__name__ for _, m in d_model.named_modules()}
    assert "QuantizedLinear" not in kinds and "QuantizedEmbedding" not in kinds
    # only the LoRA matrices train
    trainable = tree_flatten(d_model.trainable_parameters())
    assert {name.rsplit(".", 1)[-1] for name, _ in trainable} == {"lora_a", "lora_b"}

    # the adapter is for the quantized model: it loads there and computes
    # what the dequantized training model computed
    loaded, _ = mlx_lm.load(str(mixed_model), adapter_path=str(tmp_path / "d"))
    assert np.abs(logits(loaded) - logits(d_model)).max() <= 1e-3
    assert np.abs(logits(loaded) - logits(q_model)).max() <= 1e-3
    config = read_json(tmp_path / "d" / "adapter_config.json")
    assert config["base_compute"] == "dequantized"


def test_auto_says_what_it_chose(mixed_model, data_dir, tmp_path):
    proc = lora(
        "--model", mixed_model, "--data", data_dir, *TRAIN_ARGS,
        "--base-compute", "auto", "--adapter-path", tmp_path / "a",
    )  # fmt: skip
    assert (
        "base compute (auto): dequantized: float copies of the quantized "
        in proc.stdout
    )
    assert "quantized layers run as" in proc.stdout


def test_bad_choice_in_yaml_is_refused(mixed_model, data_dir, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        f"model: {mixed_model}\ndata: {data_dir}\nbase_compute: fast\n"
        f"adapter_path: {tmp_path / 'x'}\n"
    )
    proc = lora("-c", config, *TRAIN_ARGS, check=False)
    assert proc.returncode == 1
    assert (
        "--base-compute 'fast': choose one of quantized, dequantized, auto"
        in proc.stderr
    )
