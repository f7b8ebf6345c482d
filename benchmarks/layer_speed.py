"""Where a LoRA training step spends its time: the pieces, MLX against PyTorch.

The smallest reproductions of one step's parts, in each framework alone, on
the same shapes (bf16, one Llama decoder layer of a given size, B x L
tokens): a projection GEMM forward and backward, causal attention forward
and backward, the whole decoder layer forward and backward with frozen
weights, a LoRA projection with float32 and bf16 adapters, and the
cross-entropy over the vocabulary. Each is timed after warm-up (MLX compiles
its kernels on first use), the median of ``--repeats``, synchronised.

    python benchmarks/layer_speed.py [--size 1B] [--batch 4] [--length 2048]

Writes ``benchmarks/results/layer_speed.json``; the last table printed is
milliseconds per piece and the MLX / PyTorch ratio.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from ceiling import SIZES  # noqa: E402
from common import print_table, write_result  # noqa: E402

PIECES = ("gemm_qkv", "gemm_mlp_up", "attention", "layer", "lora_f32", "lora_bf16", "cross_entropy")  # fmt: skip


def _time(run, sync, repeats):
    for _ in range(3):
        run()
    sync()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - tic)
    return 1e3 * median(times)


def mlx_pieces(size, batch, length, repeats):
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models import llama
    from mlx_lm.tuner.lora import LoRALinear

    s = SIZES[size]
    d, inter, vocab = s["hidden_size"], s["intermediate_size"], s["vocab_size"]
    heads, kv = s["num_attention_heads"], s["num_key_value_heads"]
    hd = d // heads
    bf = mx.bfloat16
    n = batch * length
    x = mx.random.normal((n, d)).astype(bf)
    out = {}

    def vjp_of(f, *primals):
        cotangent = mx.ones_like(f(*primals))
        mx.eval(cotangent)

        def run():
            mx.eval(mx.vjp(f, list(primals), [cotangent]))

        return run

    w = (mx.random.normal((d, d)) * d**-0.5).astype(bf)
    out["gemm_qkv"] = _time(vjp_of(lambda a: a @ w.T, x), lambda: None, repeats)
    up = (mx.random.normal((inter, d)) * d**-0.5).astype(bf)
    out["gemm_mlp_up"] = _time(vjp_of(lambda a: a @ up.T, x), lambda: None, repeats)
    q = mx.random.normal((batch, heads, length, hd)).astype(bf)
    k, v = (mx.random.normal((batch, kv, length, hd)).astype(bf) for _ in range(2))
    attention = lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=hd**-0.5, mask="causal")  # fmt: skip
    out["attention"] = _time(vjp_of(attention, q, k, v), lambda: None, repeats)
    args = llama.ModelArgs.from_dict({"model_type": "llama", "rms_norm_eps": 1e-5, "rope_theta": 10000.0, **s})  # fmt: skip
    layer = llama.TransformerBlock(args)
    layer.set_dtype(bf)
    layer.freeze()
    h = x.reshape(batch, length, d)
    out["layer"] = _time(vjp_of(lambda a: layer(a, mask="causal"), h), lambda: None, repeats)  # fmt: skip
    base = nn.Linear(d, d, bias=False)
    base.set_dtype(bf)
    lora = LoRALinear.from_base(base, r=8, scale=20.0)
    lora.lora_b = mx.random.normal(lora.lora_b.shape) * 0.01
    out["lora_f32"] = _time(vjp_of(lambda a: lora(a), x), lambda: None, repeats)
    lora.lora_a, lora.lora_b = lora.lora_a.astype(bf), lora.lora_b.astype(bf)
    out["lora_bf16"] = _time(vjp_of(lambda a: lora(a), x), lambda: None, repeats)
    head = (mx.random.normal((vocab, d)) * d**-0.5).astype(bf)
    targets = mx.random.randint(0, vocab, (n,))
    ce = lambda a: nn.losses.cross_entropy(a @ head.T, targets).astype(mx.float32).mean()  # fmt: skip
    out["cross_entropy"] = _time(vjp_of(ce, x), lambda: None, repeats)
    return out


def torch_pieces(size, batch, length, repeats):
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import (
        LlamaDecoderLayer,
        LlamaRotaryEmbedding,
    )

    s = SIZES[size]
    d, inter, vocab = s["hidden_size"], s["intermediate_size"], s["vocab_size"]
    heads, kv = s["num_attention_heads"], s["num_key_value_heads"]
    hd = d // heads
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    bf = torch.bfloat16
    n = batch * length
    out = {}

    def backward_of(f, *inputs):
        inputs = [i.detach().requires_grad_(True) for i in inputs]

        def run():
            y = f(*inputs)
            y.backward(torch.ones_like(y))

        return run

    x = torch.randn(n, d, device=dev, dtype=bf)
    w = torch.randn(d, d, device=dev, dtype=bf) * d**-0.5
    out["gemm_qkv"] = _time(backward_of(lambda a: a @ w.T, x), sync, repeats)
    up = torch.randn(inter, d, device=dev, dtype=bf) * d**-0.5
    out["gemm_mlp_up"] = _time(backward_of(lambda a: a @ up.T, x), sync, repeats)
    q = torch.randn(batch, heads, length, hd, device=dev, dtype=bf)
    k, v = (torch.randn(batch, kv, length, hd, device=dev, dtype=bf) for _ in range(2))
    attention = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # fmt: skip
    out["attention"] = _time(backward_of(attention, q, k, v), sync, repeats)
    config = LlamaConfig(rms_norm_eps=1e-5, **s)
    config._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(config, 0).to(dev, bf).requires_grad_(False)
    rope = LlamaRotaryEmbedding(config).to(dev)
    h = x.reshape(batch, length, d)
    positions = torch.arange(length, device=dev)[None].expand(batch, -1)
    emb = rope(h, positions)

    def decoder(a):
        y = layer(a, position_embeddings=emb)
        return y[0] if isinstance(y, tuple) else y

    out["layer"] = _time(backward_of(decoder, h), sync, repeats)
    from peft import LoraConfig, get_peft_model

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(d, d, bias=False, device=dev, dtype=bf)

        def forward(self, a):
            return self.proj(a)

    model = get_peft_model(One(), LoraConfig(r=8, lora_alpha=160, target_modules=["proj"]))  # fmt: skip
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)
    out["lora_f32"] = _time(backward_of(lambda a: model(a), x), sync, repeats)
    model = get_peft_model(One(), LoraConfig(r=8, lora_alpha=160, target_modules=["proj"]), autocast_adapter_dtype=False)  # fmt: skip
    out["lora_bf16"] = _time(backward_of(lambda a: model(a), x), sync, repeats)
    head = torch.randn(vocab, d, device=dev, dtype=bf) * d**-0.5
    targets = torch.randint(0, vocab, (n,), device=dev)
    ce = lambda a: torch.nn.functional.cross_entropy((a @ head.T).float(), targets)  # fmt: skip
    out["cross_entropy"] = _time(backward_of(ce, x), sync, repeats)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1B")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--frameworks", default="mlx,torch")
    parser.add_argument("--out", default=str(HERE / "results" / "layer_speed.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one framework in its own process
        pieces = {"mlx": mlx_pieces, "torch": torch_pieces}[args.child]
        result = pieces(args.size, args.batch, args.length, args.repeats)
        print("RESULT " + json.dumps(result), flush=True)
        return
    results = {}
    for framework in args.frameworks.split(","):
        cmd = [sys.executable, __file__, "--child", framework, "--size", args.size,
               "--batch", str(args.batch), "--length", str(args.length), "--repeats", str(args.repeats)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        line = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
        results[framework] = json.loads(line[-1][7:]) if line else {"error": done.stderr[-500:]}  # fmt: skip
    rows = []
    for piece in PIECES:
        m, t = results.get("mlx", {}).get(piece), results.get("torch", {}).get(piece)
        rows.append((piece, f"{m:.2f}" if m else "-", f"{t:.2f}" if t else "-",
                     f"{m / t:.2f}" if m and t else "-"))  # fmt: skip
    from common import environment

    write_result(args.out, {
        "benchmark": "layer_speed", "command": " ".join(sys.argv), "environment": environment(),
        "size": args.size, "batch": args.batch, "length": args.length, "milliseconds": results,
    })  # fmt: skip
    print_table(["piece (fwd+bwd)", "MLX ms", "PyTorch ms", "MLX / PyTorch"], rows)


if __name__ == "__main__":
    main()
