"""The training step: aligned batches and the chunked loss equal mlx-lm's.

Float32 tiny models of three architectures built in code; the loss and the
gradients of every LoRA parameter are compared with mlx-lm's
``default_loss``, and whole training runs through ``train_model`` with
mlx-lm's per-step losses.
"""

import importlib
import types

import mlx.core as mx
import mlx.nn as nn
import mlx_lm.lora
import numpy as np
import pytest
import tiny_model
from conftest import TRAIN_ARGS, lora
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.trainer import default_loss, iterate_batches
from mlx_lm.tuner.utils import linear_to_lora_layers

from mlx_lm_optiq import train_step
from mlx_lm_optiq.settings import RunSettings

ARCHITECTURES = {
    "llama": dict(tie_word_embeddings=True, head_dim=16),
    "qwen2": dict(tie_word_embeddings=False),
    "gemma2": dict(head_dim=16, final_logit_softcapping=5.0, query_pre_attn_scalar=16),
}


def tiny(arch, seed=0):
    """A float32 model of ``arch`` with LoRA layers whose ``lora_b`` is not 0."""
    module = importlib.import_module(f"mlx_lm.models.{arch}")
    config = {
        "model_type": arch, "hidden_size": 64, "num_hidden_layers": 2,
        "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "vocab_size": 300, "rope_theta": 10000.0,
        **ARCHITECTURES[arch],
    }  # fmt: skip
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 10.0, "dropout": 0.0})
    noise = [
        (path, mx.random.normal(value.shape) * 0.05)
        for path, value in tree_flatten(model.trainable_parameters())
        if path.endswith("lora_b")
    ]  # so that every gradient is non-zero
    model.update(tree_unflatten(noise))
    mx.eval(model.parameters())
    return model


def batch_of(rows=3, width=41, vocab=300, seed=1):
    rng = np.random.default_rng(seed)
    batch = mx.array(rng.integers(0, vocab, (rows, width)), dtype=mx.int32)
    # (offset, length): a prompt masked in the second row, a short third row
    lengths = mx.array([[0, width], [7, width - 3], [0, 12]][:rows])
    return batch, lengths


def value_and_grads(model, loss, batch, lengths):
    (value, ntoks), grads = nn.value_and_grad(model, loss)(model, batch, lengths)
    return value.item(), ntoks.item(), dict(tree_flatten(grads))


def relative(a, b):
    return float(mx.abs(a - b).max() / (mx.abs(b).max() + 1e-12))


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("chunk", [16, 37, 1024])
def test_chunked_loss_equals_mlx_lm_loss_and_gradients(arch, chunk):
    model = tiny(arch)
    head, vocab = train_step.find_head(model)
    assert head is not None and vocab == 300
    batch, lengths = batch_of()
    want, want_tokens, want_grads = value_and_grads(model, default_loss, batch, lengths)
    loss = train_step.chunked_loss(head, chunk)
    got, got_tokens, got_grads = value_and_grads(model, loss, batch, lengths)
    assert got_tokens == want_tokens == 40 + 32 + 12
    assert train_step.target_tokens(lengths, batch.shape[1]) == want_tokens
    assert abs(got - want) <= 1e-4 * abs(want)
    assert set(got_grads) == set(want_grads) and len(got_grads) == 2 * 2 * 7
    for name, grad in want_grads.items():
        assert relative(got_grads[name], grad) <= 1e-4, name
    # evaluation (no gradient) gives the same value
    model.eval()
    value, _ = loss(model, batch, lengths)
    model.train()
    assert abs(value.item() - want) <= 1e-4 * abs(want)


def test_chunked_loss_compiles_as_mlx_lm_compiles_its_step():
    model = tiny("llama")
    head, _ = train_step.find_head(model)
    batch, lengths = batch_of()
    state = [model.state]
    step = mx.compile(
        lambda b, l: nn.value_and_grad(model, train_step.chunked_loss(head, 8))(
            model, b, l
        ),
        inputs=state,
        outputs=state,
    )
    (value, _), grads = step(batch, lengths)
    want, _, want_grads = value_and_grads(model, default_loss, batch, lengths)
    assert abs(value.item() - want) <= 1e-4 * abs(want)
    for name, grad in dict(tree_flatten(grads)).items():
        assert relative(grad, want_grads[name]) <= 1e-4, name


def _attention_case(batch=2, heads=8, kv_heads=2, length=16, dim=8, seed=3):
    mx.random.seed(seed)
    q = mx.random.normal((batch, heads, length, dim))
    k, v = (mx.random.normal((batch, kv_heads, length, dim)) for _ in range(2))
    return q, k, v


MASKS = {
    "none": lambda b, h, n: None,
    "causal": lambda b, h, n: "causal",
    "per row": lambda b, h, n: mx.random.normal((b, 1, n, n)),
    "per head": lambda b, h, n: mx.random.normal((1, h, n, n)),
    "2-D": lambda b, h, n: mx.random.normal((n, n)),
}


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("per_call", [10**6, 8, 4, 2, 1], ids=lambda n: f"{n}-heads")
def test_attention_in_pieces_is_the_whole_attention(mask, per_call):
    """Outputs and gradients equal the whole call's, whatever the pieces:
    rows of the batch, groups of key/value heads, parts of one's query heads."""
    q, k, v = _attention_case()
    arguments = {"scale": 0.3, "mask": MASKS[mask](2, 8, 16)}
    whole = mx.fast.scaled_dot_product_attention
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return whole(*args, **kwargs)

    pieces = train_step.attention_in_pieces(counted, limit=per_call * 16 * 8)

    def loss(attention, q, k, v):
        return (attention(q, k, v, **arguments) * mx.cos(mx.arange(8.0))).sum()

    want = whole(q, k, v, **arguments)
    assert mx.allclose(pieces(q, k, v, **arguments), want, atol=1e-6)
    expected = [(2, 8, 16, 8)] if per_call > 16 else [(1, per_call, 16, 8)] * (16 // per_call)  # fmt: skip
    assert calls == expected
    grads = mx.grad(lambda *a: loss(pieces, *a), argnums=(0, 1, 2))(q, k, v)
    wants = mx.grad(lambda *a: loss(whole, *a), argnums=(0, 1, 2))(q, k, v)
    for got, wanted in zip(grads, wants):
        assert relative(got, wanted) <= 1e-5


def test_attention_in_pieces_splits_the_sinks_with_the_heads():
    q, k, v = _attention_case(batch=1)
    sinks = mx.random.normal((8,))
    whole = mx.fast.scaled_dot_product_attention
    pieces = train_step.attention_in_pieces(whole, limit=2 * 16 * 8)
    got = pieces(q, k, v, scale=0.3, mask="causal", sinks=sinks)
    assert mx.allclose(got, whole(q, k, v, scale=0.3, mask="causal", sinks=sinks), atol=1e-6)  # fmt: skip


@pytest.fixture(autouse=True)
def whole_attention():
    """mx.fast's attention as it was before each test, put back after it
    (a run with --attention-piece leaves its own installed)."""
    whole = mx.fast.scaled_dot_product_attention
    yield whole
    mx.fast.scaled_dot_product_attention = whole


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_a_loss_with_attention_in_pieces_is_mlx_lm_loss(arch, whole_attention):
    """Through mlx-lm's models (each calls mx.fast's attention): the loss and
    every LoRA gradient of the chunked loss and of mlx-lm's, attention in
    pieces of one query head; a limit of None is the whole call again."""
    model = tiny(arch)
    batch, lengths = batch_of()
    want, _, want_grads = value_and_grads(model, default_loss, batch, lengths)
    head, _ = train_step.find_head(model)
    for loss in (default_loss, train_step.chunked_loss(head, 16)):
        train_step.set_attention_limit(41 * 16)
        got, _, got_grads = value_and_grads(model, loss, batch, lengths)
        assert abs(got - want) <= 1e-5 * abs(want)
        for name, grad in want_grads.items():
            assert relative(got_grads[name], grad) <= 1e-4, name
    installed = mx.fast.scaled_dot_product_attention
    train_step.set_attention_limit(None)
    assert mx.fast.scaled_dot_product_attention is installed  # installed once
    assert installed.limit is None and installed.whole is whole_attention


def test_the_backward_of_checkpointed_blocks_is_in_pieces_too(fp_model, data_dir, tmp_path, whole_attention):  # fmt: skip
    """With --grad-checkpoint mlx-lm calls each block again while the gradient
    is built, after the loss has returned: that call's attention, whose
    gradient is the backward, must be in pieces as well (it was whole)."""
    calls = []

    def counted(q, k, v, **kwargs):
        calls.append(q.shape[:2])
        return whole_attention(q, k, v, **kwargs)

    mx.fast.scaled_dot_product_attention = counted
    stock = _train(fp_model, data_dir, tmp_path / "stock", grad_checkpoint=True)
    whole = set(calls)
    calls.clear()
    ours = _train(fp_model, data_dir, tmp_path / "ours", grad_checkpoint=True, attention_piece=1)  # fmt: skip
    assert any(heads > 1 for _, heads in whole)
    assert calls and set(calls) == {(1, 1)}, set(calls)  # one row, one head a call
    assert np.allclose(ours, stock, rtol=1e-4, atol=0), (ours, stock)


def test_a_head_that_is_not_found_is_said():
    class Scaled(importlib.import_module("mlx_lm.models.llama").Model):
        def __call__(self, inputs, cache=None, input_embeddings=None):
            return 2 * super().__call__(inputs, cache, input_embeddings)

    args = importlib.import_module("mlx_lm.models.llama").ModelArgs.from_dict(
        tiny_model.model_config("llama")
    )
    head, why = train_step.find_head(Scaled(args))
    assert head is None and "not lm_head or the embeddings" in why
    said = []
    settings = RunSettings(loss_chunk=16, given=frozenset({"loss_chunk"}))
    chosen = train_step.training_functions(settings, Scaled(args), said.append)
    assert "loss" not in chosen
    assert [line for line in said if line.startswith("note:")] == [
        f"note: --loss-chunk is off for this model ({why}): mlx-lm's loss"
    ]


def test_aligned_batches_are_mlx_lm_batches_padded():
    data = [([1] * n, 0) for n in (5, 9, 40, 70, 130, 131, 200)] * 2
    stock = list(iterate_batches(data, 2, 2048, seed=3))
    skipped = train_step.SkippedBatches()
    ours = list(
        train_step.batch_iterator(iterate_batches, 128, skipped)(data, 2, 2048, seed=3)
    )
    assert len(ours) == len(stock) and skipped.count == 0
    for (b, l), (sb, sl) in zip(ours, stock):
        assert np.array_equal(np.array(l), np.array(sl))
        assert (b.shape[1] - 1) % 128 == 0  # the model's input
        width = min(b.shape[1], sb.shape[1])
        assert np.array_equal(np.array(b[:, :width]), np.array(sb[:, :width]))
        assert not np.array(b[:, width:]).any()  # the padding is zeros
    # --max-seq-length counts model-input tokens: rows keep 257 tokens
    data += [([1] * 300, 0)] * 2
    capped = list(
        train_step.batch_iterator(iterate_batches, 128, skipped)(data, 2, 256, seed=3)
    )
    assert max(b.shape[1] for b, _ in capped) == 257
    assert max(int(l[:, 1].max()) for _, l in capped) == 257


def _train(model_path, data_dir, tmp_path, **options):
    """Per-step training losses of ``train_model`` with these options."""
    from mlx_lm import load
    from mlx_lm.tuner.datasets import load_dataset

    argv = ["--model", str(model_path), "--data", str(data_dir), *TRAIN_ARGS,
            "--steps-per-report", "1", "--adapter-path", str(tmp_path)]  # fmt: skip
    args = vars(mlx_lm.lora.build_parser().parse_args(argv))
    args.update(options)
    for key, value in mlx_lm.lora.CONFIG_DEFAULTS.items():
        if args.get(key) is None:
            args[key] = value
    args = types.SimpleNamespace(**args)
    model, tokenizer = load(str(model_path))
    train_set, valid_set, _ = load_dataset(args, tokenizer)

    class Losses:
        def __init__(self):
            self.train = []

        def on_train_loss_report(self, info):
            self.train.append(info["train_loss"])

        def on_val_loss_report(self, info):
            pass

    losses = Losses()
    np.random.seed(args.seed)  # as mlx_lm.lora.run does: the batch order
    mlx_lm.lora.train_model(args, model, train_set, valid_set, losses)
    return losses.train


@pytest.mark.parametrize(
    "options",
    [
        {"align_inputs": 128},
        {"loss_chunk": 16},
        {"align_inputs": 64, "loss_chunk": 7},
        {"attention_piece": 64},
    ],
    ids=["aligned", "chunked", "both", "attention-in-pieces"],
)
def test_training_losses_are_mlx_lm_losses(options, fp_model, data_dir, tmp_path):
    """Data that fits: the per-step losses of a whole run are stock mlx-lm's."""
    stock = _train(fp_model, data_dir, tmp_path / "stock")
    ours = _train(fp_model, data_dir, tmp_path / "ours", **options)
    assert len(ours) == len(stock) == 4
    assert np.allclose(ours, stock, rtol=1e-4, atol=0), (ours, stock)


def test_the_step_options_in_help_and_yaml(mixed_model, data_dir, tmp_path):
    out = " ".join(lora("--help").stdout.split())
    assert "--align-inputs {auto,on,off,N}" in out
    assert "--loss-chunk {auto,on,off,N}" in out
    assert "--attention-piece {auto,on,off,N}" in out
    config = tmp_path / "c.yaml"
    config.write_text("align_inputs: 64\nloss_chunk: 16\nattention_piece: 4096\n")
    proc = lora(
        "--model", mixed_model, "--data", data_dir, *TRAIN_ARGS, "-c", config,
        "--adapter-path", tmp_path / "a",
    )  # fmt: skip
    assert (
        "training step (cpu): inputs aligned to 64 tokens, loss in chunks of 16 "
        "positions, attention in pieces of at most 4,096 elements" in proc.stdout
    )
    # off (YAML reads it as false) and auto on the CPU: mlx-lm's own
    config.write_text("align_inputs: off\nloss_chunk: auto\n")
    proc = lora(
        "--model", mixed_model, "--data", data_dir, *TRAIN_ARGS, "-c", config,
        "--adapter-path", tmp_path / "b",
    )  # fmt: skip
    assert "training step (cpu): inputs as mlx-lm pads them, mlx-lm's loss" in (
        proc.stdout
    )


def test_lora_in_the_input_dtype():
    """Float32: the very function; bf16: within bf16 rounding, the weights and
    their gradients still float32, the same parameter names."""
    model = tiny("llama")
    batch, lengths = batch_of()
    names = [n for n, _ in tree_flatten(model.trainable_parameters())]
    want, _, want_grads = value_and_grads(model, default_loss, batch, lengths)
    assert train_step.lora_in_input_dtype(model) == 2 * 7
    assert [n for n, _ in tree_flatten(model.trainable_parameters())] == names
    got, _, got_grads = value_and_grads(model, default_loss, batch, lengths)
    assert got == want  # float32 activations: the cast changes nothing
    for name, grad in want_grads.items():
        assert mx.array_equal(got_grads[name], grad), name

    stock = tiny("llama")
    for m in (model, stock):
        m.set_dtype(mx.bfloat16, lambda dtype: dtype == mx.float32)
        for _, layer in m.named_modules():
            if hasattr(
                layer, "lora_a"
            ):  # LoRA weights stay float32, as mlx-lm keeps them
                layer.lora_a = layer.lora_a.astype(mx.float32)
                layer.lora_b = layer.lora_b.astype(mx.float32)
    want, _, want_grads = value_and_grads(stock, default_loss, batch, lengths)
    got, _, got_grads = value_and_grads(model, default_loss, batch, lengths)
    assert abs(got - want) <= 2e-2 * abs(want)
    for name, grad in want_grads.items():
        assert got_grads[name].dtype == mx.float32
        assert relative(got_grads[name], grad) <= 5e-2, name


def test_lora_compute_through_the_cli(fp_model, data_dir, tmp_path):
    proc = lora(
        "--model", fp_model, "--data", data_dir, *TRAIN_ARGS,
        "--lora-compute", "input", "--adapter-path", tmp_path / "a",
    )  # fmt: skip
    assert "LoRA matmuls in the activations' dtype" in proc.stdout
    lora(
        "--model", fp_model, "--data", data_dir, *TRAIN_ARGS,
        "--adapter-path", tmp_path / "b",
    )  # fmt: skip
    # a float32 model: the same losses, the same kind of adapter file
    ours = mx.load(str(tmp_path / "a" / "adapters.safetensors"))
    theirs = mx.load(str(tmp_path / "b" / "adapters.safetensors"))
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name].dtype == mx.float32
        assert mx.allclose(ours[name], theirs[name], atol=1e-5), name


def test_lora_plus_keeps_the_schedule_and_weight_decay_of_any_optimizer():
    """One AdamW step under a cosine schedule: lora_b moves 3x, lora_a and
    everything else as before, and the schedule is the optimizer's own."""
    import mlx.nn as nn
    import mlx.optimizers as optim

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.lora_a = mx.ones((4, 2))
            self.lora_b = mx.full((2, 3), 0.5)

    grads = {"lora_a": mx.full((4, 2), 0.2), "lora_b": mx.full((2, 3), -0.1)}
    moved = []
    for ratio in (None, 3.0):
        model = Pair()
        schedule = optim.cosine_decay(1e-2, 10)
        opt = optim.AdamW(learning_rate=schedule, weight_decay=0.1)
        if ratio:
            opt = train_step.lora_plus(opt, ratio)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        moved.append((model.lora_a - 1.0, model.lora_b - 0.5, opt.learning_rate.item()))
    (a0, b0, lr0), (a3, b3, lr3) = moved
    assert mx.allclose(a3, a0, rtol=1e-6) and mx.abs(a0).max().item() > 0
    assert mx.allclose(b3, 3 * b0, rtol=1e-5)
    assert lr3 == lr0  # the schedule is untouched
