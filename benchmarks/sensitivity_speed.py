"""How much faster the sensitivity pass is from cached block inputs, at equal output.

One process, one model: the reference pass once, then the same trials three
ways: ``before``, the way ``mlx_lm_optiq.sensitivity`` ran them first (every
trial a whole forward pass of the model); ``per module``, from the module's
own block's cached input with its bit-widths stacked into one pass; ``now``,
every module and bit-width of a block stacked into one pass that stops at the
final hidden states, each trial's logits then made one at a time. Modules are
sampled as whole blocks spread over the depth (``--modules-per-kind`` of each
kind), so the mean time per trial stands for the whole pass; every pass runs
once untimed first on a GPU (the first use of each kernel compiles it), the
first of each way on the CPU; the
KL values of the three ways are compared.

    python benchmarks/sensitivity_speed.py --model SMOLLM2 --data GSM8K \\
        [--samples 4] [--max-seq-length 64]

Writes ``benchmarks/results/sensitivity_speed.json``.
"""

import argparse
import sys
import time
from pathlib import Path

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
    parser.add_argument("--warm-all", action=argparse.BooleanOptionalAction, default=None,
                        help="run every pass once untimed first (default: on a GPU)")  # fmt: skip
    args = parser.parse_args()

    import mlx.core as mx
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
    picked = sorted(
        sample(targets, args.modules_per_kind, len(model.layers)),
        key=lambda t: (t.block, t.path),
    )  # a block's modules side by side
    head = reference.head
    # on a GPU every pass runs once untimed (each module kind's kernels compile
    # on first use); on the CPU the first of each way alone
    warm_all = args.warm_all
    if warm_all is None:
        warm_all = "gpu" in str(mx.default_device())
    ways = {  # (runs from the cached block input, the head applied per trial)
        "before": (False, None),  # the whole model per trial, as it ran before
        "per module": (True, None),  # a module's bit-widths in one pass from its block
        "now": (
            True,
            head,
        ),  # a block's modules and bit-widths in one pass, then the head
    }
    per_trial, kls = {}, {}
    for way, (cached, with_head) in ways.items():
        reference.cached, reference.head = cached, with_head
        groups = S.trial_groups(reference, picked, bits, args.group_size)
        for group in groups if warm_all else groups[:1]:  # untimed: kernels compile
            reference.kl_trials([(t, v) for t, _, v in group])
        seconds, count = 0.0, 0
        for group in groups:
            tic = time.perf_counter()
            found = reference.kl_trials([(t, v) for t, _, v in group])
            seconds += time.perf_counter() - tic
            count += len(group)
            for (target, b, _), kl in zip(group, found):
                kls[(way, target.path, b)] = kl
        per_trial[way] = seconds / count
        print(f"{way}: {per_trial[way]:.4f} s per trial over {count} trials in "
              f"{len(groups)} passes", flush=True)  # fmt: skip
    drift = max(abs(kls[("before", p, b)] - kls[(way, p, b)])
                for (way, p, b) in kls if way != "before")  # fmt: skip
    trials = len(targets) * len(bits)
    rows = [(way, f"{per_trial[way]:.4f}", f"{per_trial[way] * trials / 60:.2f}",
             f"{per_trial['before'] / per_trial[way]:.2f}x") for way in ways]  # fmt: skip
    write_result(args.out, {
        "benchmark": "sensitivity_speed", "command": " ".join(sys.argv),
        "environment": environment(), "model": Path(args.model).name,
        "samples": args.samples, "max_seq_length": args.max_seq_length, "bits": bits,
        "modules_timed": [t.path for t in picked], "trials_in_a_full_pass": trials,
        "seconds_per_trial": per_trial, "speedup": per_trial["before"] / per_trial["now"],
        "reference_seconds": reference_seconds, "max_abs_kl_difference": drift,
        "warmed_every_pass": warm_all,
    })  # fmt: skip
    print(f"{len(picked)} modules timed of {len(targets)}; KL the same to {drift:.1e}")
    print_table(["trials", "s per trial", f"min for all {trials}", "vs before"], rows)


if __name__ == "__main__":
    main()
