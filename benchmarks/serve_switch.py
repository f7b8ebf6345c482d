"""Hot-swap serving: adapter switch cost against a full reload, and tokens/s
with 1 vs 8 resident adapters.

The switch is what ``mlx_lm_optiq.serve`` does between requests for
different adapters (swap LoRA layers around the shared base layers); the
reload is what stock ``mlx_lm.server`` does (``mlx_lm.load`` with the other
adapter). Medians over repeats, in one process.

    python benchmarks/serve_switch.py [--model DIR] [--repeats 20] [--tokens 64]

Without ``--model`` it builds the tiny example model. Writes
``benchmarks/results/serve_switch.json``.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))

from common import environment, print_table, write_result  # noqa: E402


def make_adapters(model_dir, out, count, rank):
    """``count`` random adapters (non-zero ``lora_b``) of mixed ranks for ``model_dir``."""
    import json

    import mlx.core as mx
    import mlx_lm
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    paths = []
    for i in range(count):
        model, _ = mlx_lm.load(str(model_dir))
        model.freeze()
        n = len(model.layers)
        pattern = {
            f"model.layers.{n - 1}.self_attn.v_proj": rank * 2,
            f"model.layers.{n - 1}.mlp.down_proj": rank * 2,
        }
        params = {"rank": rank, "scale": 20.0, "dropout": 0.0, "rank_pattern": pattern}
        linear_to_lora_layers(model, min(8, n), params)
        mx.random.seed(i)
        weights = {
            k: (mx.random.normal(v.shape) * 0.01 if k.endswith("lora_b") else v)
            for k, v in tree_flatten(model.trainable_parameters())
        }
        path = out / f"adapter{i}"
        path.mkdir(parents=True)
        mx.save_safetensors(str(path / "adapters.safetensors"), weights)
        (path / "adapter_config.json").write_text(
            json.dumps(
                {
                    "fine_tune_type": "lora",
                    "num_layers": min(8, n),
                    "lora_parameters": params,
                }
            )
        )
        paths.append(path)
    return paths


def tokens_per_second(model, tokenizer, tokens):
    from mlx_lm import stream_generate

    last = None
    for last in stream_generate(
        model, tokenizer, "the cat sees a big red", max_tokens=tokens
    ):
        pass
    return last.generation_tps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", help="mlx-lm model directory (default: tiny example)"
    )
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--out", default=str(HERE / "results" / "serve_switch.json"))
    args = parser.parse_args()

    import mlx.core as mx
    import mlx_lm

    from mlx_lm_optiq.registry import AdapterRegistry

    work = Path(tempfile.mkdtemp())
    if args.model is None:
        import tiny_model

        args.model = tiny_model.build_model(work / "model", quantize="mixed", layers=8)
    adapters = make_adapters(args.model, work, 8, args.rank)

    reload_times = []
    for i in range(max(3, args.repeats // 4)):
        tic = time.perf_counter()
        model, _ = mlx_lm.load(str(args.model), adapter_path=str(adapters[i % 2]))
        mx.eval(model.parameters())
        reload_times.append(time.perf_counter() - tic)

    model, tokenizer = mlx_lm.load(str(args.model))
    registry = AdapterRegistry()
    for i, path in enumerate(adapters):
        registry.add(f"a{i}", path)
    registry.attach(model)
    registry.activate(model, "a0")
    registry.activate(model, "a1")  # layers built once, on first use
    switch_times = []
    for i in range(args.repeats):
        tic = time.perf_counter()
        registry.activate(model, f"a{i % 2}")
        mx.eval(model.parameters())
        switch_times.append(time.perf_counter() - tic)

    # tokens/s with adapter a0 active, 8 adapters resident vs only 1, interleaved
    registry.activate(model, "a0")
    tokens_per_second(model, tokenizer, 8)  # warm up
    samples = {1: [], 8: []}
    for round_ in range(6):
        for resident in (8, 1) if round_ % 2 == 0 else (1, 8):
            extra = [f"a{i}" for i in range(1, 8)]
            if resident == 1:
                for name in extra:
                    registry.remove(name)
            elif not registry.has("a1"):
                for i, name in enumerate(extra, start=1):
                    registry.add(name, adapters[i])
            samples[resident].append(tokens_per_second(model, tokenizer, args.tokens))
    one, eight = statistics.median(samples[1]), statistics.median(samples[8])

    reload_s, switch_s = statistics.median(reload_times), statistics.median(
        switch_times
    )
    summary = {
        "reload_seconds": reload_s,
        "switch_seconds": switch_s,
        "reload_over_switch": reload_s / switch_s,
        "tokens_per_second_1_resident": one,
        "tokens_per_second_8_resident": eight,
        "ratio_8_over_1": eight / one,
    }
    print_table(
        ["measure", "value"],
        [
            ("full reload (mlx_lm.load with adapter), ms", f"{reload_s * 1e3:.1f}"),
            ("adapter switch (swap LoRA layers), ms", f"{switch_s * 1e3:.3f}"),
            ("reload / switch", f"{reload_s / switch_s:.0f}x"),
            ("tokens/s, 1 adapter resident", f"{one:.1f}"),
            ("tokens/s, 8 adapters resident", f"{eight:.1f}"),
            ("8 / 1", f"{eight / one:.3f}"),
        ],
    )
    write_result(args.out, {
        "benchmark": "serve_switch", "command": " ".join(sys.argv),
        "environment": environment(), "settings": {k: str(v) for k, v in vars(args).items()},
        "summary": summary, "reload_times": reload_times, "switch_times": switch_times,
    })  # fmt: skip


if __name__ == "__main__":
    main()
