"""Training ceiling on one GPU: longest sequence, peak memory, tokens/s per model size.

For each model size (random-init configs of real architectures — weights
don't change speed or memory), quantized 4/8-bit mixed the way OptiQ leaves a
model (``v_proj`` and ``down_proj`` at 8 bits), QLoRA with
``--rank-scaling by_bits`` (rank 8, 16 layers, batch 4) at growing sequence
lengths: peak memory, tokens/s and seconds per iteration, and the longest
length that fits. Then, for the same architecture, ranks and tokens, PyTorch
+ PEFT LoRA (on a bf16 base: there is no 4-bit PyTorch kernel on this machine)
and MLX LoRA on the same bf16 base, as ratios; and the bf16 matmul ceiling
measured in the same process.

    python benchmarks/ceiling.py --tokenizer DIR [--sizes 135M,1B,3B,8B] [--lengths 1024,4096,16384]

Writes ``benchmarks/results/ceiling.json``.
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import (  # noqa: E402
    environment,
    print_table,
    train_in_process,
    write_result,
)

# Real architectures' shapes (Llama family).
SIZES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=4, intermediate_size=128,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=49152),
    "135M": dict(hidden_size=576, num_hidden_layers=30, intermediate_size=1536,
                 num_attention_heads=9, num_key_value_heads=3, vocab_size=49152),
    "360M": dict(hidden_size=960, num_hidden_layers=32, intermediate_size=2560,
                 num_attention_heads=15, num_key_value_heads=5, vocab_size=49152),
    "1B": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "3B": dict(hidden_size=3072, num_hidden_layers=28, intermediate_size=8192,
               num_attention_heads=24, num_key_value_heads=8, vocab_size=128256),
    "8B": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
}  # fmt: skip
EIGHT_BIT = ("self_attn.v_proj", "mlp.down_proj")


def build(size, tokenizer_dir, out, quantized):
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models import llama
    from mlx_lm.utils import quantize_model, save_config, save_model

    config = {"model_type": "llama", "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "tie_word_embeddings": True, "max_position_embeddings": 131072, **SIZES[size]}  # fmt: skip
    model = llama.Model(llama.ModelArgs.from_dict(config))
    model.set_dtype(mx.bfloat16)
    mx.eval(model.parameters())
    if quantized:
        pred = lambda p, m: isinstance(m, nn.Linear) and {
            "bits": 8 if p.endswith(EIGHT_BIT) else 4,
            "group_size": 64,
        }  # noqa: E731
        model, config = quantize_model(model, config, 64, 4, quant_predicate=pred)
    out.mkdir(parents=True)
    save_model(out, model)
    save_config(config, out / "config.json")
    for f in Path(tokenizer_dir).iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, out / f.name)
    if not quantized:
        # by_bits reads the OptiQ bits that the quantized copy has, so both
        # runs (and PEFT) train the same ranks
        (out / "optiq").mkdir()
        per_layer = {p: {"bits": 8 if p.endswith(EIGHT_BIT) else 4, "group_size": 64}
                     for p in _adapted(size, all_layers=True)}  # fmt: skip
        (out / "optiq" / "metadata.json").write_text(
            json.dumps({"per_layer": per_layer})
        )
    return out


def synthetic_data(out, length, rows=64):
    """Rows of ``length`` tokens of plain words (``{"text"}``), train and valid."""
    out.mkdir(parents=True, exist_ok=True)
    words = (
        "the cat sat on a mat and looked at the moon while " * (length // 10 + 2)
    ).split()
    text = " ".join(words[:length])
    for name in ("train", "valid"):
        with open(out / f"{name}.jsonl", "w") as f:
            for _ in range(rows):
                f.write(json.dumps({"text": text}) + "\n")
    return out


def mlx_run(model_dir, data, length, iters, scaling, size):
    import mlx.core as mx

    mx.clear_cache()
    result = train_in_process(
        True, model=str(model_dir), data=str(data), adapter_path=tempfile.mkdtemp(),
        iters=iters, batch_size=4, num_layers=min(16, SIZES[size]["num_hidden_layers"]),
        max_seq_length=length,
        steps_per_report=1, steps_per_eval=10**9, val_batches=1, save_every=10**9,
        rank_scaling=scaling, grad_checkpoint=True,
        lora_parameters={"rank": 8, "dropout": 0.0, "scale": 20.0},
    )  # fmt: skip
    steady = result["train"][3:] or result["train"]
    tps = sorted(r["tokens_per_second"] for r in steady)[len(steady) // 2]
    its = sorted(r["iterations_per_second"] for r in steady)[len(steady) // 2]
    return {"tokens_per_second": tps, "seconds_per_iteration": 1 / its,
            "peak_memory_gb": result["peak_memory_gb"], "trainable": result["trainable_parameters"]}  # fmt: skip


def torch_peft_run(size, length, iters, ranks):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(rms_norm_eps=1e-5, tie_word_embeddings=True, **SIZES[size])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    n = SIZES[size]["num_hidden_layers"]
    targets = sorted(ranks)
    lora = LoraConfig(r=8, lora_alpha=160, target_modules=targets,
                      rank_pattern={p: r for p, r in ranks.items() if r != 8},
                      alpha_pattern={p: 20 * r for p, r in ranks.items() if r != 8})  # fmt: skip
    model = get_peft_model(model, lora)
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    tokens = torch.randint(0, 49152, (4, length), device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(iters):
        sync()
        tic = time.perf_counter()
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - tic)
    steady = sorted(times[3:] or times)[len(times[3:] or times) // 2]
    peak = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None
    del model, opt
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"tokens_per_second": 4 * length / steady, "seconds_per_iteration": steady,
            "peak_memory_gb": peak, "layers": n, "device": device}  # fmt: skip


def matmul_ceiling(n):
    import mlx.core as mx

    a = mx.random.normal((n, n)).astype(mx.bfloat16)
    b = mx.random.normal((n, n)).astype(mx.bfloat16)
    for _ in range(3):
        mx.eval(a @ b)
    times = []
    for _ in range(20):  # each product evaluated: a lazy graph would skip them
        tic = time.perf_counter()
        mx.eval(a @ b)
        times.append(time.perf_counter() - tic)
    return 2 * n**3 / sorted(times)[len(times) // 2] / 1e12


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tokenizer", required=True, help="a model dir with tokenizer files"
    )
    parser.add_argument("--sizes", default="135M,1B,3B,8B")
    parser.add_argument("--lengths", default="1024,4096,16384")
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--compare-length", type=int, default=1024)
    parser.add_argument("--compare-sizes", default="135M,1B")
    parser.add_argument("--matmul-size", type=int, default=8192)
    parser.add_argument("--budget-seconds", type=float, default=float("inf"))
    parser.add_argument("--out", default=str(HERE / "results" / "ceiling.json"))
    args = parser.parse_args()
    start = time.monotonic()
    work = Path(tempfile.mkdtemp())
    ceiling = matmul_ceiling(args.matmul_size)
    print(f"bf16 matmul {args.matmul_size}^3: {ceiling:.1f} TFLOP/s", flush=True)

    rows, results, comparisons = [], {}, {}
    lengths = [int(x) for x in args.lengths.split(",")]
    for size in args.sizes.split(","):
        model_dir = build(size, args.tokenizer, work / f"{size}-q", quantized=True)
        results[size] = {}
        for length in lengths:
            if time.monotonic() - start > args.budget_seconds:
                results[size][length] = {"skipped": "time budget"}
                continue
            data = synthetic_data(work / f"data-{length}", length)
            try:
                r = mlx_run(model_dir, data, length, args.iters, "by_bits", size)
            except Exception as e:  # noqa: BLE001 - out of memory ends this size
                results[size][length] = {"error": f"{type(e).__name__}: {e}"[:300]}
                break
            results[size][length] = r
            print(f"{size} @ {length}: {r}", flush=True)
            rows.append((size, length, f"{r['peak_memory_gb']:.1f}", f"{r['tokens_per_second']:,.0f}",
                         f"{r['seconds_per_iteration']:.3f}"))  # fmt: skip
        shutil.rmtree(model_dir, ignore_errors=True)

    for size in args.compare_sizes.split(","):
        if time.monotonic() - start > args.budget_seconds:
            break
        length = args.compare_length
        data = synthetic_data(work / f"data-{length}", length)
        bf16_dir = build(size, args.tokenizer, work / f"{size}-bf16", quantized=False)
        mlx_lora = mlx_run(bf16_dir, data, length, args.iters, "by_bits", size)
        shutil.rmtree(bf16_dir, ignore_errors=True)
        ranks = {p: 8 * (2 if p.endswith(EIGHT_BIT) else 1) for p in _adapted(size)}
        torch_lora = torch_peft_run(size, length, args.iters, ranks)
        comparisons[size] = {"length": length, "mlx_lora_bf16": mlx_lora, "torch_peft_bf16": torch_lora,
                             "mlx_over_torch_tokens_per_second": mlx_lora["tokens_per_second"] / torch_lora["tokens_per_second"]}  # fmt: skip
        print(f"{size} @ {length}: MLX LoRA {mlx_lora['tokens_per_second']:,.0f} tok/s, "
              f"PyTorch+PEFT {torch_lora['tokens_per_second']:,.0f} tok/s", flush=True)  # fmt: skip

    print_table(["size", "seq len", "peak GB", "tokens/s", "s/iter"], rows)
    for size, c in comparisons.items():
        print(
            f"{size}: MLX/PyTorch tokens/s = {c['mlx_over_torch_tokens_per_second']:.2f}"
        )
    write_result(args.out, {
        "benchmark": "ceiling", "command": " ".join(sys.argv), "environment": environment(),
        "bf16_matmul_tflops": ceiling, "qlora_by_bits": results, "lora_bf16_vs_torch_peft": comparisons,
        "note": "random-init weights of real architectures; 4/8-bit mixed base for QLoRA; "
                "batch 4, rank 8 (by_bits), 16 layers, gradient checkpointing",
    })  # fmt: skip


def _adapted(size, all_layers=False):
    """The 7 projections of the last 16 layers (what LoRA adapts here), or of all."""
    n = SIZES[size]["num_hidden_layers"]
    kinds = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip
    first = 0 if all_layers else max(0, n - 16)
    return [f"model.layers.{i}.{k}" for i in range(first, n) for k in kinds]


if __name__ == "__main__":
    main()
