"""The training-ceiling map on one GPU: stock mlx-lm, the plugin's lean step, PyTorch + PEFT.

Random-init bf16 models of Llama shapes (weights don't change speed or
memory), LoRA rank 8 on all 7 projections of the last 16 layers (PEFT: the
same modules and ranks, ``lora_alpha`` 160 for mlx-lm's scale 20), Adam,
gradient checkpointing. Variants, each through mlx-lm's own ``train()``
except PEFT:

- ``stock``: as a user runs it, ``--max-seq-length L``: mlx-lm truncates a
  row to L tokens and feeds L - 1 to the model;
- ``stock_aligned``: stock with its best setting, ``--max-seq-length L + 1``:
  the model's input is L, a multiple of 128;
- ``plugin``: the plugin's training step as ``auto`` chooses it on CUDA:
  inputs aligned to 128, the chunked loss, the LoRA matmuls in bf16
  (``--align-inputs on --loss-chunk on --lora-compute input``),
  ``--max-seq-length L``;
- ``plugin_f32_lora`` (speed only): the same with mlx-lm's float32 LoRA
  matmuls (``--lora-compute float32``), which is what 2026-12-01's run
  called ``plugin`` (and its ``plugin_bf16_lora`` is today's ``plugin``).
- ``peft``: transformers + PEFT, ``sdpa`` attention, ``labels=input_ids``.

``--base-bits N`` adds speed rows on the same shapes with the base
quantized (``nn.quantize``, N bits, group 64) and run by MLX's quantized
kernels (``--base-compute quantized``): ``stock_aligned_qN`` and
``plugin_qN``, what a QLoRA user of mlx-lm trains with, against the same
bf16 PEFT row.

Plans, in the order they run (``--plans``):

- ``speed``: tokens/s (median over the timed steps) and peak memory at
  4 x 2048 and 1 x 8192, per size and variant;
- ``memory``: batch 1, doubling lengths from ``--start`` while the peak
  extrapolated from the lengths measured stays under ``--memory-fraction``
  of the GPU and under ``--max-length``, then one refinement to the longest
  ``--step`` multiple predicted to fit with a margin: peak per doubling and
  the longest length that ran.

Each (framework, size) runs in its own process, which reports every
measurement as it finishes, so a crash (out of memory) loses only the rest.

    python benchmarks/step_speed.py --plans speed,memory [--sizes 1B,8B,3B]

Writes ``benchmarks/results/step_speed.json`` and ``.png``.
"""

import argparse
import json
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

from ceiling import ARCHITECTURE, KINDS, LORA_LAYERS, SIZES, extrapolate  # noqa: E402
from common import print_table, write_result  # noqa: E402

RANK = 8
MLX_VARIANTS = ("stock", "stock_aligned", "plugin", "plugin_f32_lora")
# on a quantized base: the plugin as it runs (auto: float copies of the base
# on the GPU) and with --base-compute quantized (MLX's quantized matmuls)
QUANTIZED_VARIANTS = ("stock_aligned", "plugin", "plugin_quantized_base")


# -- one process: one framework, one model size --------------------------------


def lora_targets(size):
    n = SIZES[size]["num_hidden_layers"]
    return [f"model.layers.{i}.{k}" for i in range(max(0, n - LORA_LAYERS), n) for k in KINDS]  # fmt: skip


class Rows:
    """Rows of exactly ``length + 1`` tokens, as mlx-lm's datasets hand them over."""

    def __init__(self, count, length, vocab):
        import numpy as np

        rng = np.random.default_rng(0)
        self.rows = [(rng.integers(0, vocab, length + 1).tolist(), 0) for _ in range(count)]  # fmt: skip

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def mlx_model(size, bits=None):
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models import llama
    from mlx_lm.tuner.utils import linear_to_lora_layers

    config = {"model_type": "llama", "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "tie_word_embeddings": True, **SIZES[size]}  # fmt: skip
    model = llama.Model(llama.ModelArgs.from_dict(config))
    model.set_dtype(mx.bfloat16)
    if bits:
        nn.quantize(model, group_size=64, bits=bits)
    model.freeze()
    linear_to_lora_layers(model, LORA_LAYERS, {"rank": RANK, "scale": 20.0, "dropout": 0.0})  # fmt: skip
    mx.eval(model.parameters())
    return model


def mlx_measure(model, size, variant, batch, length, iters):
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import TrainingArgs, TrainingCallback, train

    import mlx.nn as nn

    from mlx_lm_optiq import lora_layers, train_step
    from mlx_lm_optiq.settings import RunSettings

    functions = {}
    quantized = [(path, m) for path, m in model.named_modules()
                 if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]  # fmt: skip
    if variant.startswith("plugin"):
        lora_compute = "float32" if variant == "plugin_f32_lora" else "input"
        base_compute = "quantized" if variant == "plugin_quantized_base" else "auto"
        asked = RunSettings(align_inputs="on", loss_chunk="on", lora_compute=lora_compute,
                            base_compute=base_compute, given=frozenset({"align_inputs"}))  # fmt: skip
        # as a run does: auto trains a quantized base against float copies
        # where they fit in a quarter of the memory (the H200: every size here)
        train_step.apply_base_compute(asked, model, report=lambda line: None)
        functions = train_step.training_functions(asked, model, report=lambda line: None)  # fmt: skip
    still = any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())  # fmt: skip
    base = "quantized" if still else "float copies" if quantized else "float"
    max_seq = length + 1 if variant == "stock_aligned" else length
    reports = []

    class Record(TrainingCallback):
        def on_train_loss_report(self, info):
            reports.append(info)

    work = Path(tempfile.mkdtemp())
    args = TrainingArgs(batch_size=batch, iters=iters, steps_per_report=1, steps_per_eval=10**9,
                        steps_per_save=10**9, max_seq_length=max_seq, grad_checkpoint=True,
                        adapter_file=str(work / "adapters.safetensors"))  # fmt: skip
    block = type(model.layers[0])
    call = (
        block.__call__
    )  # train() checkpoints the class each time it runs: undo it after
    mx.clear_cache()
    mx.reset_peak_memory()
    try:
        train(model, optim.Adam(learning_rate=1e-5), Rows(2 * batch, length, SIZES[size]["vocab_size"]),
              None, args, training_callback=Record(), **functions)  # fmt: skip
    finally:
        block.__call__ = call
        _plain_lora(model)  # the next variant starts from mlx-lm's layers
        lora_layers.swap_in(model, quantized)  # and the quantized base
        train_step.set_attention_limit(None)  # and mx.fast's whole attention
        shutil.rmtree(work, ignore_errors=True)
    steady = reports[1:] or reports
    seconds = median(1 / r["iterations_per_second"] for r in steady)
    return {"tokens_per_second": batch * length / seconds, "seconds_per_step": seconds,
            "peak_memory_gb": mx.get_peak_memory() / 1e9,
            "model_input": length - 1 if variant == "stock" else length, "base": base}  # fmt: skip


def _plain_lora(model):
    from mlx_lm.tuner.lora import LoRALinear

    for _, module in model.named_modules():
        if isinstance(module, LoRALinear):
            module.__class__ = LoRALinear


def torch_model(size):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(rms_norm_eps=1e-5, tie_word_embeddings=True, **SIZES[size])
    config._attn_implementation = "sdpa"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=20 * RANK, target_modules=lora_targets(size)))  # fmt: skip
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    return model


def torch_measure(model, size, variant, batch, length, iters):
    import torch

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    device = next(model.parameters()).device
    tokens = torch.randint(0, SIZES[size]["vocab_size"], (batch, length), device=device)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        sync()
        tic = time.perf_counter()
        model(input_ids=tokens, labels=tokens).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - tic)
    seconds = median(times[1:] or times)
    return {"tokens_per_second": batch * length / seconds, "seconds_per_step": seconds,
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
            "model_input": length, "torch": torch.__version__}  # fmt: skip


def _lengths(spec, points, deadline):
    """The lengths a memory series measures: doubling, then one refinement.

    The caller sends back each length's seconds per step, or ``None`` when it
    failed (out of memory): the refinement is then halfway between the
    longest that ran and the one that failed, where the prediction had said
    it would fit.
    """
    length, last_seconds, failed = spec["start"], 0.0, None
    while length <= spec["max_length"]:
        predicted = extrapolate(points, length)
        if predicted is not None and predicted > spec["limit_gb"]:
            break
        if time.time() + 4 * 2 * last_seconds > deadline:
            yield None, f"time: {length} not started"
            return
        seconds = yield length, None
        if seconds is None:
            failed = length
            break
        last_seconds = seconds
        length *= 2
    step, measured = spec["step"], [n for n, _ in points]
    if not measured or time.time() + 4 * 2 * last_seconds > deadline:
        return
    if failed:
        middle = (measured[-1] + failed) // 2 // step * step
        if measured[-1] < middle < failed:
            yield middle, f"refinement after {failed} failed"
        return
    fits = [n for n in range(measured[-1] + step, min(length, spec["max_length"] + 1), step)
            if extrapolate(points, n) <= spec["limit_gb"] / spec["margin"]]  # fmt: skip
    if fits:
        yield fits[-1], "refinement"


def child(spec):
    """Measure ``spec`` in this process; print one RESULT line per measurement."""
    framework, size = spec["framework"], spec["size"]
    build, measure = {"mlx": (mlx_model, mlx_measure), "torch": (torch_model, torch_measure)}[framework]  # fmt: skip
    bits = spec.get("bits")
    model = build(size, bits) if bits else build(size)
    deadline = spec["deadline"]

    def run(variant, batch, length, iters, note=None):
        tic = time.time()
        try:
            result = measure(model, size, variant, batch, length, iters)
        except Exception as e:  # out of memory in PyTorch; MLX may abort instead
            result = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            if framework == "mlx":  # what MLX held when it was raised
                result["memory_at_error_gb"] = mlx_memory_counters()
        if bits:
            variant = f"{variant}_q{bits}"
        result.update(variant=variant, batch=batch, length=length, note=note, wall_seconds=time.time() - tic)  # fmt: skip
        print("RESULT " + json.dumps(result), flush=True)
        return result

    for variant, batch, length in spec.get("measure", []):
        if time.time() > deadline:
            break
        run(variant, batch, length, spec["iters"], spec.get("note"))
    series = spec.get("series")
    if series:
        points = []
        lengths = _lengths(series, points, deadline)
        sent = None
        while True:
            try:
                length, note = lengths.send(sent)
            except StopIteration:
                break
            if length is None:
                print("RESULT " + json.dumps({"variant": series["variant"], "note": note}), flush=True)  # fmt: skip
                break
            if sent is None and points and framework == "mlx" and note:
                # after an out-of-memory MLX's allocator is not what it was
                # (2026-12-02: each refinement failed in the same process)
                print("RESULT " + json.dumps({"variant": series["variant"], "retry": [length, note]}), flush=True)  # fmt: skip
                break
            result = run(series["variant"], 1, length, series["iters"], note)
            if "error" in result:
                sent = None
                continue
            points.append((length, result["peak_memory_gb"] or 0.0))
            sent = result["seconds_per_step"]


def mlx_memory_counters():
    """MLX's allocator counters now, in GB: ``active``, ``cache``, ``peak``."""
    import mlx.core as mx

    return {"active": mx.get_active_memory() / 1e9, "cache": mx.get_cache_memory() / 1e9,
            "peak": mx.get_peak_memory() / 1e9}  # fmt: skip


# -- the parent: plans, processes, tables ---------------------------------------


def spawn(spec, timeout):
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=max(timeout, 5)
        )
        out, err, code = done.stdout, done.stderr, done.returncode
    except subprocess.TimeoutExpired as e:
        out, err, code = (e.stdout or b"").decode(), "timeout", None
    results = [json.loads(l[7:]) for l in out.splitlines() if l.startswith("RESULT ")]
    if code != 0:
        tail = (err.strip().splitlines() or ["no output"])[-1][:300]
        results.append(
            {"error": f"process ended ({code}): {tail}", "after": len(results)}
        )
    return results


def gpu_memory_gb():
    code = ("import mlx.core as mx; i = mx.device_info(); "
            "print((i.get('total_memory') or i.get('memory_size') or 0) / 1e9)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    try:
        return float(done.stdout.strip().splitlines()[-1]) or None
    except (IndexError, ValueError):
        return None


def plans(args, limit_gb, now):
    """``[(plan, size, spec)]`` in the order they run."""
    todo = []
    sizes = [s for s in args.sizes.split(",") if s]
    speed_shapes = [tuple(int(n) for n in s.split("x")) for s in args.speed_shapes.split(",")]  # fmt: skip
    if "speed" in args.plans:
        for size in sizes:
            if args.base_bits:  # first: the quantized rows are what the run adds
                shapes = [(v, b, l) for b, l in speed_shapes for v in QUANTIZED_VARIANTS]  # fmt: skip
                todo.append(("speed", size, {"framework": "mlx", "size": size, "measure": shapes,
                                             "iters": args.iters, "bits": args.base_bits}))  # fmt: skip
            shapes = [("peft", b, l) for b, l in speed_shapes]
            todo.append(("speed", size, {"framework": "torch", "size": size, "measure": shapes, "iters": args.iters}))  # fmt: skip
            shapes = [(v, b, l) for b, l in speed_shapes for v in MLX_VARIANTS]
            todo.append(("speed", size, {"framework": "mlx", "size": size, "measure": shapes, "iters": args.iters}))  # fmt: skip
    if "memory" in args.plans:
        for size in sizes:
            for variant in args.memory_variants.split(","):
                series = {"variant": variant, "start": args.start, "max_length": args.max_length,
                          "limit_gb": limit_gb, "step": args.step, "margin": args.margin, "iters": 2}  # fmt: skip
                framework = "torch" if variant == "peft" else "mlx"
                todo.append(("memory", size, {"framework": framework, "size": size, "series": series}))  # fmt: skip
    return todo


def table(results):
    rows = []
    for r in results:
        if "length" not in r:
            continue
        rows.append((r["plan"], ARCHITECTURE.get(r["size"], r["size"]), r["variant"],
                     f"{r['batch']}x{r['length']}",
                     f"{r['tokens_per_second']:,.0f}" if "tokens_per_second" in r else "-",
                     f"{r['peak_memory_gb']:.1f}" if r.get("peak_memory_gb") else "-",
                     (r.get("error") or r.get("note") or "")[:40]))  # fmt: skip
    return rows


def summary(results):
    """Ratios to PyTorch + PEFT, peak memory per doubling, longest per series."""
    by = {(r["plan"], r["size"], r["variant"], r["batch"], r["length"]): r
          for r in results if "tokens_per_second" in r}  # fmt: skip
    ratios = {}
    for (plan, size, variant, batch, length), r in by.items():
        peft = by.get((plan, size, "peft", batch, length))
        if plan == "speed" and variant != "peft" and peft:
            ratios[f"{size}/{batch}x{length}/{variant}"] = r["tokens_per_second"] / peft["tokens_per_second"]  # fmt: skip
    growth, longest = {}, {}
    for size in {r["size"] for r in results}:
        for variant in {r["variant"] for r in results if r.get("plan") == "memory" and "variant" in r}:  # fmt: skip
            points = sorted((r["length"], r["peak_memory_gb"]) for (p, s, v, b, l), r in by.items()
                            if p == "memory" and s == size and v == variant and r.get("peak_memory_gb"))  # fmt: skip
            if points:
                key = f"{size}/{variant}"
                growth[key] = {f"{a}->{b}": pb / pa for (a, pa), (b, pb) in zip(points, points[1:]) if b == 2 * a}  # fmt: skip
                longest[key] = {
                    "length": points[-1][0],
                    "peak_memory_gb": points[-1][1],
                }
    return {
        "over_peft_tokens_per_second": ratios,
        "memory_per_doubling": growth,
        "longest": longest,
    }


def plot(results, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = [
        r for r in results if r.get("plan") == "speed" and "tokens_per_second" in r
    ]
    memory = [
        r for r in results if r.get("plan") == "memory" and r.get("peak_memory_gb")
    ]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    groups = sorted(
        {(r["size"], f"{r['batch']}x{r['length']}") for r in speed}, key=str
    )
    quantized = sorted({r["variant"] for r in speed} - {*MLX_VARIANTS, "peft"})
    variants = [*MLX_VARIANTS, *quantized, "peft"]
    width = 0.8 / len(variants)
    for i, variant in enumerate(variants):
        values = [next((r["tokens_per_second"] for r in speed if (r["size"], f"{r['batch']}x{r['length']}") == g
                        and r["variant"] == variant), 0) for g in groups]  # fmt: skip
        left.bar(
            [x + width * i for x in range(len(groups))], values, width, label=variant
        )
    left.set_xticks([x + 0.4 - width / 2 for x in range(len(groups))], [f"{ARCHITECTURE.get(s, s)}\n{shape}" for s, shape in groups], fontsize=7)  # fmt: skip
    left.set_ylabel("tokens/s")
    left.legend(fontsize=7)
    left.set_title("LoRA training speed (bf16 base, checkpointing)", fontsize=9)
    for size in sorted({r["size"] for r in memory}):
        for variant in variants:
            points = sorted((r["length"], r["peak_memory_gb"]) for r in memory if r["size"] == size and r["variant"] == variant)  # fmt: skip
            if points:
                right.plot(*zip(*points), "o-", label=f"{ARCHITECTURE.get(size, size)} {variant}", markersize=3)  # fmt: skip
    right.set_xscale("log", base=2)
    right.set_yscale("log", base=2)
    right.set_xlabel("tokens (batch 1)")
    right.set_ylabel("peak GB")
    right.legend(fontsize=6)
    right.set_title("peak memory per length", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans", default="speed,memory")
    parser.add_argument("--sizes", default="1B,8B,3B")
    parser.add_argument("--memory-variants", default="plugin,peft,stock_aligned")
    parser.add_argument("--speed-shapes", default="4x2048,1x8192", help="batch x length, ...")  # fmt: skip
    parser.add_argument("--iters", type=int, default=5, help="per speed measurement; the first is not timed")  # fmt: skip
    parser.add_argument("--base-bits", type=int, help="also the speed rows on a base quantized to this many bits")  # fmt: skip
    parser.add_argument("--start", type=int, default=4096)
    parser.add_argument("--max-length", type=int, default=131072)
    parser.add_argument(
        "--step", type=int, default=16384, help="grain of the refinement"
    )
    parser.add_argument("--memory-fraction", type=float, default=0.85)
    parser.add_argument("--margin", type=float, default=1.15, help="the refinement's predicted peak stays under the limit / this")  # fmt: skip
    parser.add_argument("--memory-gb", type=float, help="the GPU's memory (default: what MLX reports)")  # fmt: skip
    parser.add_argument("--budget-seconds", type=float, default=1500)
    parser.add_argument("--out", default=str(HERE / "results" / "step_speed.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))
    from ceiling import environment_of_children

    start = time.time()
    memory = args.memory_gb or gpu_memory_gb()
    if not memory:
        sys.exit("step_speed: MLX reports no GPU memory; pass --memory-gb")
    limit = args.memory_fraction * memory
    results, not_run = [], []
    doc = {"benchmark": "step_speed", "command": " ".join(sys.argv), "environment": environment_of_children(),
           "gpu_memory_gb": memory, "limit_gb": limit, "rank": RANK, "lora_layers": LORA_LAYERS}  # fmt: skip
    for plan, size, spec in plans(args, limit, start):
        left = start + args.budget_seconds - time.time()
        if left < 30:
            not_run.append({"plan": plan, "size": size, **spec})
            continue
        spec["deadline"] = time.time() + left - 10
        found = spawn(spec, left)
        retry = next((r["retry"] for r in found if "retry" in r), None)
        found = [r for r in found if "retry" not in r]
        if retry and time.time() < start + args.budget_seconds - 30:
            again = {**spec, "series": None, "measure": [(spec["series"]["variant"], 1, retry[0])],
                     "iters": spec["series"]["iters"], "note": retry[1]}  # fmt: skip
            found += spawn(again, start + args.budget_seconds - time.time())
        for r in found:
            r.update(plan=plan, size=size, framework=spec["framework"])
            results.append(r)
            print(f"[{time.time() - start:5.0f} s] {plan} {size} {r.get('variant')} "
                  f"{r.get('batch')}x{r.get('length')}: {r.get('tokens_per_second', 0):,.0f} tok/s "
                  f"{r.get('peak_memory_gb') or 0:.1f} GB {r.get('error') or r.get('note') or ''}", flush=True)  # fmt: skip
        write_result(args.out, {**doc, "results": results, "summary": summary(results), "not_run": not_run,
                                "elapsed_seconds": time.time() - start})  # fmt: skip
    print_table(
        ["plan", "shape", "variant", "tokens", "tokens/s", "peak GB", ""],
        table(results),
    )
    print(json.dumps(summary(results), indent=1))
    plot(results, Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
