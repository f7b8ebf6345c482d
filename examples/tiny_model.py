"""Build a tiny mixed 4/8-bit mlx-lm model and a toy dataset, in code.

Used by ``examples/train_tiny.py`` and by the tests. The model is a real
mlx-lm architecture (Llama or Qwen2, GQA) with random weights, quantized the
way a mixed-precision quantizer leaves a model: most projections at 4 bits,
the sensitive ones (here ``v_proj`` and ``down_proj``) kept at 8. The
tokenizer is a ``tokenizers`` byte-level BPE trained on the toy corpus.
"""

import json
import random
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import quantize_model, save_config, save_model

WORDS = (
    "the a one two three four five six seven eight nine ten cat dog bird fish "
    "red blue green small big runs sees eats likes and is has on under near "
    "house tree river hill day night sun moon"
).split()
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]

VOCAB_SIZE = 400
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant {% endif %}"
)
EIGHT_BIT = ("self_attn.v_proj", "mlp.down_proj")
GROUP_SIZE = 32


def model_config(arch="llama", layers=4, hidden=64, intermediate=128):
    config = {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": intermediate,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": VOCAB_SIZE,
        "max_position_embeddings": 512,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "bos_token_id": 2,
        "eos_token_id": 3,
        "architectures": [
            "LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"
        ],
    }
    if arch == "llama":
        config["head_dim"] = hidden // 4
    return config


def mixed_predicate(path, module):
    """8 bits for the sensitive projections, 4 for the rest, none for embeddings."""
    if not isinstance(module, nn.Linear):
        return False
    bits = 8 if path.endswith(EIGHT_BIT) else 4
    return {"bits": bits, "group_size": GROUP_SIZE}


def save_tokenizer(path: Path, vocab_size=VOCAB_SIZE):
    """A byte-level BPE tokenizer trained on the toy corpus, as ``tokenizer.json``.

    Byte-level BPE is what transformers' per-architecture tokenizer classes
    (e.g. ``Qwen2Tokenizer``) rebuild from ``tokenizer.json``, so the same
    files tokenize the same way whichever class loads them.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    rng = random.Random(0)
    tokenizer.train_from_iterator([sentence(rng) for _ in range(2000)], trainer)
    tokenizer.save(str(path / "tokenizer.json"))
    with open(path / "tokenizer_config.json", "w") as f:
        json.dump(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": "<pad>",
                "chat_template": CHAT_TEMPLATE,
            },
            f,
        )


def make_fragile(model, path, factor=40.0):
    """Give one linear module outliers: one weight in every 32 scaled by
    ``factor``, so low-bit group quantization of it costs far more than of
    any other module."""
    module = dict(model.named_modules())[path]
    weight = module.weight
    outliers = (mx.arange(weight.shape[1]) % 32 == 0).astype(weight.dtype)
    module.weight = weight * (1 + (factor - 1) * outliers)


def build_model(path, arch="llama", quantize="mixed", seed=0, fragile=None, **dims):
    """Write a tiny model directory that ``mlx_lm.load`` opens.

    Args:
        path: the directory to write.
        arch: ``"llama"`` or ``"qwen2"``.
        quantize: ``"mixed"`` (4/8 bits), ``"4bit"`` or ``None`` (float32).
        seed: weights seed.
        fragile: a module path to give outliers (see :func:`make_fragile`).

    Returns:
        The directory, as a ``Path``.
    """
    import importlib

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model_config(arch, **dims)
    module = importlib.import_module(f"mlx_lm.models.{arch}")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    if fragile:
        make_fragile(model, fragile)
    mx.eval(model.parameters())
    if quantize == "mixed":
        model, config = quantize_model(
            model, config, GROUP_SIZE, 4, quant_predicate=mixed_predicate
        )
    elif quantize == "4bit":
        model, config = quantize_model(
            model,
            config,
            GROUP_SIZE,
            4,
            quant_predicate=lambda p, m: isinstance(m, nn.Linear),
        )
    save_model(path, model)
    save_config(config, path / "config.json")
    save_tokenizer(path)
    return path


def sentence(rng):
    n = rng.randint(4, 12)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def build_dataset(path, n_train=64, n_valid=16, n_test=8, seed=0):
    """Write ``train/valid/test.jsonl`` with ``{"text": ...}`` rows."""
    rng = random.Random(seed)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        with open(path / f"{name}.jsonl", "w") as f:
            for _ in range(n):
                f.write(json.dumps({"text": sentence(rng)}) + "\n")
    return path


def linear_dims(model_path):
    """``{module path: (in, out)}`` of every linear layer, from the config."""
    cfg = json.loads((Path(model_path) / "config.json").read_text())
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    shapes = {
        "self_attn.q_proj": (h, h),
        "self_attn.k_proj": (h, kv),
        "self_attn.v_proj": (h, kv),
        "self_attn.o_proj": (h, h),
        "mlp.gate_proj": (h, i),
        "mlp.up_proj": (h, i),
        "mlp.down_proj": (i, h),
    }
    return {
        f"model.layers.{l}.{name}": dims
        for l in range(cfg["num_hidden_layers"])
        for name, dims in shapes.items()
    }


def parameter_count(model):
    return sum(v.size for _, v in tree_flatten(model.parameters()))
