"""How much faster the sensitivity pass is from cached block inputs, at equal output.

One process, one model: the reference pass once, then the same trials two
ways, the way ``mlx_lm_optiq.sensitivity`` ran them before (every candidate
bit-width a whole forward pass of the model) and the way it runs them now
(from the module's own block's cached input, every bit-width stacked into
one pass). Modules are sampled evenly over the blocks (``--modules-per-kind``
of each kind, spread over the depth), so the mean time per trial stands for
the whole pass; one module is run both ways untimed first (on CUDA the first
use of each kernel compiles it); the KL values of the two ways are compared.

    python benchmarks/sensitivity_speed.py --model SMOLLM2 --data GSM8K \\
        [--samples 4] [--max-seq-length 64]

Writes ``benchmarks/results/sensitivity_speed.json``.
"""

import argparse
import sys
import time
from pathlib import Path
from statistics import mean

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import environment, print_table, write_result  # noqa: E402


def sample(targets, per_kind, blocks):
    """``per_kind`` modules of each kind, their blocks spread over the depth."""
    picked = []
    for kind in sorted({t.path.rsplit(".", 1)[-1] for t in targets}):
        wanted = {
            round(i * (blocks - 1) / max(per_kind - 1, 1)) for i in range(per_kind)
        }
        picked += [
            t for t in targets if t.path.endswith("." + kind) and t.block in wanted
        ]
    return picked


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-seq-length", type=int, default=64)
    parser.add_argument("--bits", default="4,8")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--modules-per-kind", type=int, default=3)
    parser.add_argument(
        "--out", default=str(HERE / "results" / "sensitivity_speed.json")
    )
    args = parser.parse_args()

    import mlx_lm

    from mlx_lm_optiq import measuring as M
    from mlx_lm_optiq import sensitivity as S

    bits = [int(b) for b in args.bits.split(",")]
    model, tokenizer = mlx_lm.load(args.model)
    sequences = M.token_sequences(
        tokenizer, args.data, args.samples, args.max_seq_length
    )
    batches = list(M.batches(sequences, 8))
    tic = time.perf_counter()
    reference = S.Reference(model, batches, 4e9)
    reference_seconds = time.perf_counter() - tic
    targets = M.block_targets(model)
    picked = sample(targets, args.modules_per_kind, len(model.layers))
    per_trial, kls = {}, {}
    for cached in (False, True):  # untimed: the first use of each kernel compiles it
        reference.cached = cached
        reference.kl(
            picked[0], [S.quantized(picked[0].module, b, args.group_size) for b in bits]
        )
    for way, cached in (("before", False), ("now", True)):
        reference.cached = cached
        times = []
        for target in picked:
            versions = [S.quantized(target.module, b, args.group_size) for b in bits]
            start = time.perf_counter()
            kls[(way, target.path)] = reference.kl(target, versions)
            times.append((time.perf_counter() - start) / len(versions))
            print(f"{way} {target.path}: {times[-1]:.2f} s per trial", flush=True)
        per_trial[way] = mean(times)
    drift = max(abs(a - b) for t in picked
                for a, b in zip(kls[("before", t.path)], kls[("now", t.path)]))  # fmt: skip
    trials = len(targets) * len(bits)
    rows = [(way, f"{per_trial[way]:.2f}", f"{per_trial[way] * trials / 60:.1f}")
            for way in ("before", "now")]  # fmt: skip
    rows.append(("speed-up", f"{per_trial['before'] / per_trial['now']:.2f}x", ""))
    write_result(args.out, {
        "benchmark": "sensitivity_speed", "command": " ".join(sys.argv),
        "environment": environment(), "model": Path(args.model).name,
        "samples": args.samples, "max_seq_length": args.max_seq_length, "bits": bits,
        "modules_timed": [t.path for t in picked], "trials_in_a_full_pass": trials,
        "seconds_per_trial": per_trial, "speedup": per_trial["before"] / per_trial["now"],
        "reference_seconds": reference_seconds, "max_abs_kl_difference": drift,
    })  # fmt: skip
    print(f"{len(picked)} modules timed of {len(targets)}; KL the same to {drift:.1e}")
    print_table(["trials", "s per trial", f"min for all {trials}"], rows)


if __name__ == "__main__":
    main()
