"""Training ceiling on one GPU: longest sequence, peak memory, tokens/s per model size.

For each model size (random-init configs of real architectures: weights don't
change speed or memory), quantized 4/8-bit mixed the way OptiQ leaves a model
(``v_proj`` and ``down_proj`` at 8 bits), QLoRA with ``--rank-scaling
by_bits`` (rank 8, 16 layers, gradient checkpointing) at a fixed batch and
doubling sequence lengths: peak memory, tokens/s, seconds per iteration. The
search stops before a length whose peak memory, extrapolated from the lengths
measured, would pass ``--memory-fraction`` of the GPU (running out of GPU
memory is not a clean failure on every backend); it then measures the longest
multiple of ``--step`` predicted to fit, so the longest length in the table
is one that ran. Every measurement is its own process.

Also, in the same call: the bf16 matmul ceiling, and for the same
architecture, ranks and tokens, MLX LoRA against PyTorch + PEFT LoRA on a
bf16 base (there is no 4-bit PyTorch kernel on that machine), as a ratio.

    python benchmarks/ceiling.py --tokenizer DIR [--sizes 135M,1B,3B,8B] [--batch-size 1]

Writes ``benchmarks/results/ceiling.json``.
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import print_table, write_result  # noqa: E402

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
ARCHITECTURE = {
    "tiny": "Llama (tiny)", "135M": "SmolLM2-135M", "360M": "SmolLM2-360M",
    "1B": "Llama-3.2-1B", "3B": "Llama-3.2-3B", "8B": "Llama-3.1-8B",
}  # fmt: skip
EIGHT_BIT = ("self_attn.v_proj", "mlp.down_proj")
KINDS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip
LORA_LAYERS = 16
RANK = 8


# -- one measurement (runs in its own process) ------------------------------


def config_of(size):
    return {"model_type": "llama", "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": True, "max_position_embeddings": 262144, **SIZES[size]}  # fmt: skip


def bits_of(path):
    return 8 if path.endswith(EIGHT_BIT) else 4


def build(size, quantized):
    """A random-init model of ``size`` in this process, bf16 or 4/8-bit mixed."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models import llama
    from mlx_lm.utils import quantize_model

    config = config_of(size)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    model.set_dtype(mx.bfloat16)
    if quantized:
        pred = lambda p, m: isinstance(m, nn.Linear) and {
            "bits": bits_of(p),
            "group_size": 64,
        }  # noqa: E731
        model, config = quantize_model(model, config, 64, 4, quant_predicate=pred)
    mx.eval(model.parameters())
    mx.clear_cache()
    return model, config


def model_dir(size, config, tokenizer_dir, out):
    """What ``--model`` names for the plugin: config, tokenizer, OptiQ bits.

    The bf16 model has no live bits, so ``optiq/metadata.json`` gives it the
    bits its quantized twin has: both (and PEFT) train the same ranks.
    """
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(config))
    for f in Path(tokenizer_dir).iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, out / f.name)
    (out / "optiq").mkdir()
    per_layer = {p: {"bits": bits_of(p), "group_size": 64} for p in adapted(size, all_layers=True)}  # fmt: skip
    (out / "optiq" / "metadata.json").write_text(json.dumps({"per_layer": per_layer}))
    return out


def synthetic_data(out, length, rows):
    """``rows`` rows of at least ``length`` tokens of plain words, train and valid."""
    out.mkdir(parents=True, exist_ok=True)
    words = ("the cat sat on a mat and looked at the moon while " * (length // 10 + 4)).split()  # fmt: skip
    text = " ".join(words[: length + 32])
    for name in ("train", "valid"):
        with open(out / f"{name}.jsonl", "w") as f:
            for _ in range(rows):
                f.write(json.dumps({"text": text}) + "\n")
    return out


def mlx_probe(spec):
    import mlx.core as mx
    from common import train_in_process
    from mlx_lm.utils import load_tokenizer

    size, length, batch = spec["size"], spec["length"], spec["batch"]
    work = Path(tempfile.mkdtemp())
    tic = time.perf_counter()
    model, config = build(size, quantized=spec["quantized"])
    built = time.perf_counter() - tic
    mdir = model_dir(size, config, spec["tokenizer"], work / "model")
    data = synthetic_data(work / "data", length, rows=max(2 * batch, 4))
    # mlx-lm truncates a batch to max_seq_length tokens and feeds all but the
    # last to the model: "exact" makes the model's input ``length`` tokens.
    max_seq_length = length + 1 if spec.get("exact") else length
    result = train_in_process(
        True, loaded=(model, load_tokenizer(mdir)),
        model=str(mdir), data=str(data), adapter_path=str(work / "adapter"),
        iters=spec["iters"], batch_size=batch, num_layers=min(LORA_LAYERS, SIZES[size]["num_hidden_layers"]),
        max_seq_length=max_seq_length, steps_per_report=1, steps_per_eval=10**9, val_batches=1,
        save_every=10**9, rank_scaling="by_bits", grad_checkpoint=spec.get("grad_checkpoint", True),
        base_compute=spec.get("base_compute"),
        lora_parameters={"rank": RANK, "dropout": 0.0, "scale": 20.0},
    )  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)
    steady = result["train"][1:] or result["train"]  # the first compiles
    tps = median(r["tokens_per_second"] for r in steady)
    its = median(r["iterations_per_second"] for r in steady)
    return {
        "tokens_per_second": tps,
        "seconds_per_iteration": 1 / its,
        "tokens_per_iteration": tps / its,
        "peak_memory_gb": result["peak_memory_gb"],
        "trainable": result["trainable_parameters"],
        "build_seconds": built,
        "device_memory_gb": device_memory_gb(mx),
    }


def torch_probe(spec):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    size, length, batch = spec["size"], spec["length"], spec["batch"]
    config = LlamaConfig(rms_norm_eps=1e-5, tie_word_embeddings=True, **SIZES[size])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    ranks = {p: RANK * (2 if bits_of(p) == 8 else 1) for p in adapted(size)}
    lora = LoraConfig(r=RANK, lora_alpha=20 * RANK, target_modules=sorted(ranks),
                      rank_pattern={p: r for p, r in ranks.items() if r != RANK},
                      alpha_pattern={p: 20 * r for p, r in ranks.items() if r != RANK})  # fmt: skip
    model = get_peft_model(model, lora)
    if spec.get("grad_checkpoint", True):
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    tokens = torch.randint(0, SIZES[size]["vocab_size"], (batch, length), device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(spec["iters"]):
        sync()
        tic = time.perf_counter()
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - tic)
    steady = median(times[1:] or times)
    return {
        "tokens_per_second": batch * (length - 1) / steady,
        "seconds_per_iteration": steady,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None,
        "trainable": trainable, "device": device, "torch": torch.__version__,
    }  # fmt: skip


def matmul_probe(spec):
    import mlx.core as mx

    n = spec["n"]
    a = mx.random.normal((n, n)).astype(mx.bfloat16)
    b = mx.random.normal((n, n)).astype(mx.bfloat16)
    for _ in range(3):
        mx.eval(a @ b)
    times = []
    for _ in range(20):  # each product evaluated: a lazy graph would skip them
        tic = time.perf_counter()
        mx.eval(a @ b)
        times.append(time.perf_counter() - tic)
    return {"tflops": 2 * n**3 / median(times) / 1e12, "device_memory_gb": device_memory_gb(mx)}  # fmt: skip


def device_memory_gb(mx):
    """The GPU's memory (CUDA: ``total_memory``, Metal: ``memory_size``), or None."""
    info = mx.device_info()
    size = info.get("total_memory") or info.get("memory_size")
    return size / 1e9 if size else None


PROBES = {"mlx": mlx_probe, "torch": torch_probe, "matmul": matmul_probe}


# -- the search (runs in the parent, which never touches the GPU) ------------


def probe(spec, timeout):
    """Run one measurement in a fresh process; its result, or why it has none."""
    tic = time.monotonic()
    cmd = [sys.executable, __file__, "--probe", json.dumps(spec)]
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=max(timeout, 1)
        )
    except subprocess.TimeoutExpired:
        return {"error": f"took over {timeout:.0f} s"}
    wall = time.monotonic() - tic
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("RESULT "):
            return {**json.loads(line[7:]), "wall_seconds": wall}
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit {done.returncode}: {tail}"[:300], "wall_seconds": wall}


def extrapolate(points, length):
    """Peak (or time) at ``length`` from the measured ``[(length, value)]``.

    A line through the last two points, or a parabola through the last three
    (attention and logits grow faster than linearly), whichever is larger:
    a guess that errs towards stopping early.
    """
    if len(points) < 2:
        return None
    (x1, y1), (x2, y2) = points[-2:]
    guess = y2 + (y2 - y1) / (x2 - x1) * (length - x2)
    if len(points) >= 3:
        x0, y0 = points[-3]
        quad = sum(
            yi * math.prod((length - xj) / (xi - xj) for xj in (x0, x1, x2) if xj != xi)
            for xi, yi in ((x0, y0), (x1, y1), (x2, y2))
        )
        guess = max(guess, quad)
    return guess


class Search:
    """The lengths of one model size: doubling while they fit, then one refinement.

    ``double`` measures ``--start``, twice that, ... until a length is over
    ``--max-length``, is predicted to pass the memory limit or the time left,
    or fails. ``refine`` then measures the longest ``--step`` multiple between
    the last length that ran and that stop which is predicted to fit, so
    "longest" is always a length that ran.
    """

    def __init__(self, size, args, limit_gb, log):
        self.size, self.args, self.limit_gb, self.log = size, args, limit_gb, log
        self.rows, self.mem, self.secs = {}, [], []
        self.stop = {"length": args.start, "why": None}

    def measure(self, length, deadline):
        args = self.args
        spec = dict(size=self.size, length=length, batch=args.batch_size, iters=args.iters,
                    quantized=True, tokenizer=args.tokenizer)  # fmt: skip
        r = probe(spec, min(args.probe_seconds, deadline - time.monotonic()))
        self.rows[length] = r
        self.log(f"{self.size} @ {length}: " + (r.get("error") or
                 f"{r['peak_memory_gb']:.1f} GB, {r['tokens_per_second']:,.0f} tok/s, "
                 f"{r['seconds_per_iteration']:.2f} s/iter ({r['wall_seconds']:.0f} s)"))  # fmt: skip
        if "error" in r:
            return False
        self.mem.append((length, r["peak_memory_gb"]))
        self.secs.append((length, r["wall_seconds"]))
        return True

    def why_not(self, length, deadline):
        """Why ``length`` is not measured now, or None."""
        if length > self.args.max_length:
            return f"over --max-length {self.args.max_length}"
        peak = extrapolate(self.mem, length)
        if peak is not None and peak > self.limit_gb:
            return f"predicted {peak:.1f} GB > {self.limit_gb:.1f} GB"
        wall = extrapolate(self.secs, length)
        left = min(self.args.probe_seconds, deadline - time.monotonic())
        if wall is not None and wall > left:
            return f"predicted {wall:.0f} s > {left:.0f} s left for it"
        if left < 20:
            return "time budget"
        return None

    def double(self, deadline):
        length = self.args.start
        while not (why := self.why_not(length, deadline)):
            if not self.measure(length, deadline):
                why = "error"
                break
            length *= 2
        self.stop = {"length": length, "why": why}

    def refine(self, deadline):
        if not (self.mem and "GB" in (self.stop["why"] or "")):
            return
        # the parabola underestimated the measured peak by up to 14% on the
        # H200 (benchmarks/README.md), so the refinement keeps a margin
        step, last = self.args.step, self.mem[-1][0]
        limit = self.limit_gb / self.args.refine_margin
        fits = [n for n in range(last + step, self.stop["length"], step)
                if extrapolate(self.mem, n) <= limit]  # fmt: skip
        if fits and not self.why_not(fits[-1], deadline):
            predicted = extrapolate(self.mem, fits[-1])
            self.measure(fits[-1], deadline)
            self.rows[fits[-1]]["predicted_peak_gb"] = predicted

    def result(self):
        ok = [n for n, r in self.rows.items() if "error" not in r]
        return {
            "lengths": {str(n): r for n, r in sorted(self.rows.items())},
            "longest_that_ran": max(ok) if ok else None,
            "next_not_run": self.stop,
        }


def adapted(size, all_layers=False):
    """The 7 projections of the last 16 layers (what LoRA adapts here), or of all."""
    n = SIZES[size]["num_hidden_layers"]
    first = 0 if all_layers else max(0, n - LORA_LAYERS)
    return [f"model.layers.{i}.{k}" for i in range(first, n) for k in KINDS]


def train_flops_per_token(size, length):
    """Rough training FLOPs per token for this setup (for utilization only).

    Forward through every layer, and for the adapted layers (the gradient
    stops below them) the recomputation of gradient checkpointing plus the
    input gradients: about twice their forward again. Matmuls as 2 FLOPs per
    weight, causal attention as 2·L·d per layer (QKᵀ and AV, half masked),
    the LM head as 2·d·vocab forward and again backward. LoRA's own matmuls
    are under 1% and left out.
    """
    s = SIZES[size]
    d, n, inter, vocab = s["hidden_size"], s["num_hidden_layers"], s["intermediate_size"], s["vocab_size"]  # fmt: skip
    kv = d // s["num_attention_heads"] * s["num_key_value_heads"]
    layer = 2 * (d * d * 2 + d * kv * 2 + 3 * d * inter) + 2 * length * d
    adapted_layers = min(LORA_LAYERS, n)
    return n * layer + 2 * adapted_layers * layer + 2 * 2 * d * vocab


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", help="a model dir with tokenizer files")
    parser.add_argument("--sizes", default="135M,1B,3B,8B")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--start", type=int, default=4096, help="first length")
    parser.add_argument("--max-length", type=int, default=131072)
    parser.add_argument(
        "--step", type=int, default=4096, help="grain of the last search step"
    )
    parser.add_argument("--memory-fraction", type=float, default=0.85,
                        help="of the GPU's memory that a predicted peak may reach")  # fmt: skip
    parser.add_argument("--refine-margin", type=float, default=1.2,
                        help="the refinement's predicted peak stays under the limit divided by this")  # fmt: skip
    parser.add_argument(
        "--memory-gb", type=float, help="the GPU's memory (default: what MLX reports)"
    )
    parser.add_argument(
        "--iters", type=int, default=3, help="per measurement; the first is not timed"
    )
    parser.add_argument(
        "--probe-seconds", type=float, default=150, help="per measurement"
    )
    parser.add_argument("--compare-sizes", default="135M,1B")
    parser.add_argument("--compare-length", type=int, default=1024)
    parser.add_argument("--compare-batch", type=int, default=4)
    parser.add_argument("--compare-iters", type=int, default=6)
    parser.add_argument("--matmul-size", type=int, default=8192)
    parser.add_argument("--budget-seconds", type=float, default=3600.0,
                        help="no measurement starts after this: each size doubles in a share, what is left refines")  # fmt: skip
    parser.add_argument("--out", default=str(HERE / "results" / "ceiling.json"))
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:  # a child process: one measurement, one RESULT line
        spec = json.loads(args.probe)
        print("RESULT " + json.dumps(PROBES[spec.pop("kind", "mlx")](spec)), flush=True)
        return
    if not args.tokenizer:
        parser.error("--tokenizer is required")
    start = time.monotonic()
    end = start + args.budget_seconds
    log = lambda msg: print(
        f"[{time.monotonic() - start:6.0f} s] {msg}", flush=True
    )  # noqa: E731

    matmul = probe({"kind": "matmul", "n": args.matmul_size}, 120)
    log(f"bf16 matmul {args.matmul_size}^3: {matmul.get('tflops', 0):.1f} TFLOP/s")
    memory_gb = args.memory_gb or matmul.get("device_memory_gb")
    if not memory_gb:
        sys.exit(
            f"ceiling: MLX reports no GPU memory size ({matmul.get('error', 'not a GPU')}); pass --memory-gb"
        )
    limit_gb = args.memory_fraction * memory_gb

    comparisons = {}
    for size in [s for s in args.compare_sizes.split(",") if s]:
        if time.monotonic() > end - 60:
            break
        spec = dict(size=size, length=args.compare_length, batch=args.compare_batch,
                    iters=args.compare_iters, tokenizer=args.tokenizer)  # fmt: skip
        mlx = probe({**spec, "kind": "mlx", "quantized": False}, args.probe_seconds)
        torch = probe({**spec, "kind": "torch"}, args.probe_seconds)
        c = {"length": args.compare_length, "batch": args.compare_batch,
             "mlx_lora_bf16": mlx, "torch_peft_bf16": torch}  # fmt: skip
        if "error" not in mlx and "error" not in torch:
            c["mlx_over_torch_tokens_per_second"] = mlx["tokens_per_second"] / torch["tokens_per_second"]  # fmt: skip
        comparisons[size] = c
        log(f"{size} bf16 LoRA @ {args.compare_batch}x{args.compare_length}: MLX "
            f"{mlx.get('tokens_per_second', 0):,.0f} tok/s, PyTorch+PEFT {torch.get('tokens_per_second', 0):,.0f} tok/s"
            + (f" ({mlx.get('error') or torch.get('error')})" if "mlx_over_torch_tokens_per_second" not in c else ""))  # fmt: skip

    # every size doubles in its share of the time; what is left refines them
    searches = [Search(size, args, limit_gb, log) for size in args.sizes.split(",")]
    for i, search in enumerate(searches):
        share = (end - time.monotonic()) / (len(searches) - i)
        search.double(time.monotonic() + share)
    for search in searches:
        search.refine(end)
    results = {search.size: search.result() for search in searches}

    rows = []
    for size, res in results.items():
        for length, r in res["lengths"].items():
            if "error" in r:
                rows.append(
                    (ARCHITECTURE[size], length, "-", "-", "-", "-", r["error"][:60])
                )
                continue
            tflops = (
                r["tokens_per_second"] * train_flops_per_token(size, int(length)) / 1e12
            )
            longest = " longest" if int(length) == res["longest_that_ran"] else ""
            rows.append((ARCHITECTURE[size], length, f"{r['peak_memory_gb']:.1f}", f"{r['tokens_per_second']:,.0f}",
                         f"{r['seconds_per_iteration']:.2f}", f"{tflops / matmul['tflops']:.2f}", longest))  # fmt: skip
            r["utilization_of_matmul_ceiling"] = tflops / matmul["tflops"]
        if res["next_not_run"]["why"] != "error":
            rows.append((ARCHITECTURE[size], res["next_not_run"]["length"], "-", "-", "-", "-",
                         f"not run: {res['next_not_run']['why']}"))  # fmt: skip
    print_table(
        ["model shape", "seq len", "peak GB", "tokens/s", "s/iter", "of matmul", ""],
        rows,
    )
    for size, c in comparisons.items():
        if "mlx_over_torch_tokens_per_second" in c:
            print(
                f"{size}: MLX / PyTorch+PEFT tokens/s = {c['mlx_over_torch_tokens_per_second']:.2f}"
            )
    write_result(args.out, {
        "benchmark": "ceiling", "command": " ".join(sys.argv),
        "environment": environment_of_children(),
        "bf16_matmul": matmul, "gpu_memory_limit_gb": limit_gb,
        "qlora_by_bits": results, "lora_bf16_vs_torch_peft": comparisons,
        "elapsed_seconds": time.monotonic() - start,
        "note": f"random-init weights of real architectures; 4/8-bit mixed base (v_proj, down_proj 8-bit); "
                f"QLoRA by_bits rank {RANK}/{2 * RANK}, last {LORA_LAYERS} layers, all 7 projections, "
                f"batch {args.batch_size}, gradient checkpointing; 'of matmul' = estimated training "
                "FLOP/s (train_flops_per_token) over the bf16 matmul ceiling",
    })  # fmt: skip


def environment_of_children():
    """The environment the measurements ran in (the parent never imports MLX)."""
    done = subprocess.run([sys.executable, "-c", "import json, sys; sys.path.insert(0, sys.argv[1]); "
                           "from common import environment; print(json.dumps(environment()))", str(HERE)],
                          capture_output=True, text=True)  # fmt: skip
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"error": done.stderr[-300:]}


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
