"""The main job on a bundled tiny example, end to end, through the real CLI.

Builds a tiny Llama-architecture model quantized 4/8-bit mixed (the way
OptiQ leaves a model: sensitive projections kept at 8 bits) and a toy
dataset, trains a LoRA adapter with ``mlx_lm.lora --rank-scaling by_bits``,
then shows the adapter with ``mlx_lm_optiq.info``.

    python examples/train_tiny.py [--out DIR] [--iters N]
"""

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tiny_model  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="example_out", help="working directory")
    parser.add_argument("--iters", type=int, default=40)
    args = parser.parse_args()

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    print(f"[1/3] building a tiny mixed 4/8-bit model and toy data in {out}/")
    model = tiny_model.build_model(out / "model", quantize="mixed")
    data = tiny_model.build_dataset(out / "data", n_train=256, n_valid=32)

    adapter = out / "adapter"
    lora = [
        sys.executable, "-m", "mlx_lm", "lora",
        "--model", str(model), "--data", str(data), "--train",
        "--rank-scaling", "by_bits", "--rank", "8", "--num-layers", "4",
        "--iters", str(args.iters), "--batch-size", "4", "--learning-rate", "1e-3",
        "--steps-per-report", "10", "--steps-per-eval", "20", "--val-batches", "4",
        "--adapter-path", str(adapter),
    ]  # fmt: skip
    print(f"[2/3] {' '.join(lora[1:])}")
    subprocess.run(lora, check=True)

    print(f"[3/3] mlx_lm_optiq.info {adapter}")
    subprocess.run(
        [sys.executable, "-m", "mlx_lm_optiq.info", str(adapter)], check=True
    )


if __name__ == "__main__":
    main()
