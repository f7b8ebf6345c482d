"""What the benchmarks record with every result."""

import os
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402

FAKE_NVIDIA_SMI = """#!/bin/sh
case "$1" in
  --query-gpu=*) echo "NVIDIA H200, 143771, 580.159.04" ;;
  *) echo "| NVIDIA-SMI 580.159.04   Driver Version: 580.159.04   CUDA Version: 13.0 |" ;;
esac
"""


def test_results_name_the_gpu_beside_mlx_device(tmp_path, monkeypatch):
    tool = tmp_path / "nvidia-smi"
    tool.write_text(FAKE_NVIDIA_SMI)
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    env = common.environment()
    assert env["device"].startswith("Device(")
    assert env["gpu_name"] == "NVIDIA H200"
    assert env["gpu_memory_mib"] == 143771 and env["gpu_count"] == 1
    assert env["driver_version"] == "580.159.04" and env["cuda_version"] == "13.0"


def test_no_gpu_no_gpu_fields(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert common.gpu() == {}


def test_the_signal_study_runs_end_to_end_on_a_tiny_model(tmp_path):
    """benchmarks/signal_study.py: bases from our own commands, the gradient
    signal on each, arms at their learning rates, GSM8K-style answers, a JSON
    with every number (allocation.py's preparation with it)."""
    import json
    import random

    import tiny_model
    from conftest import run

    tiny_model.build_model(tmp_path / "fp", quantize=None, hidden=128, intermediate=256)
    rng = random.Random(0)
    (tmp_path / "data").mkdir()
    for name, n in (("train", 48), ("valid", 8), ("test", 4)):
        with open(tmp_path / "data" / f"{name}.jsonl", "w") as f:
            for _ in range(n):
                a, b = rng.randint(1, 9), rng.randint(1, 9)
                f.write(json.dumps({"prompt": f"{a} plus {b}?", "completion": f" #### {a + b}"}) + "\n")  # fmt: skip
    run([sys.executable, ROOT / "benchmarks" / "signal_study.py", "--model", "fp",
         "--data", "data", "--name", "tiny", "--work", "w", "--bases", "q50",
         "--arms", "constant_all,by_grad_all_in", "--lrs", "1e-3,2e-3", "--seeds", "1",
         "--iters", "4", "--early", "2", "--val-batches", "1", "--batch-size", "2",
         "--max-seq-length", "48", "--sensitivity-samples", "4", "--sensitivity-length", "32",
         "--gsm8k", "2", "--max-tokens", "4", "--gsm8k-batch", "2", "--out-dir", "out"],
        cwd=tmp_path)  # fmt: skip
    doc = json.loads((tmp_path / "out" / "signal_tiny.json").read_text())
    assert len(doc["runs"]) == 4 and not doc["failed"] and not doc["not_run"]
    arm = doc["summary"]["q50/by_grad_all_in"]
    # LoRA+ arms search a quarter of the grid
    assert arm["best_lr"] in (2.5e-4, 5e-4) and set(arm["val_final_by_lr"]) == {"0.00025", "0.0005"}  # fmt: skip
    assert arm["best_at_grid_edge"] is False  # two learning rates: no edge to speak of
    assert "delta_final_percent" in arm and "delta_early_percent" in arm
    assert doc["gsm8k"]["by_grad_all_in"]["questions"] == 2
    assert (tmp_path / "w" / "q50" / "optiq" / "gradient.json").is_file()
    assert (tmp_path / "out" / "signal_tiny.png").stat().st_size > 1000


def test_a_memory_series_that_fails_refines_halfway_to_the_failure():
    import time

    import step_speed

    spec = {"start": 4096, "max_length": 131072, "limit_gb": 120.0, "step": 16384, "margin": 1.15}  # fmt: skip
    peak = {4096: 9.0, 8192: 17.0, 16384: 27.0, 32768: 31.0, 65536: 42.0}
    points, asked = [], []
    series = step_speed._lengths(spec, points, time.time() + 3600)
    sent = None
    while True:
        try:
            length, note = series.send(sent)
        except StopIteration:
            break
        asked.append((length, note))
        if length in peak:
            points.append((length, peak[length]))
            sent = 0.5
        else:
            sent = None  # out of memory
    assert [n for n, _ in asked] == [4096, 8192, 16384, 32768, 65536, 131072, 98304]
    assert asked[-1][1] == "refinement after 131072 failed"


def test_the_step_map_measures_a_quantized_base_under_its_own_name(capsys):
    import json
    import time

    import mlx.nn as nn
    import step_speed

    model = step_speed.mlx_model("tiny", bits=4)
    assert isinstance(model.layers[-1].self_attn.q_proj.linear, nn.QuantizedLinear)
    spec = {"framework": "mlx", "size": "tiny", "measure": [("plugin", 1, 128)],
            "iters": 2, "bits": 4, "deadline": time.time() + 600}  # fmt: skip
    step_speed.child(spec)
    rows = [json.loads(l[7:]) for l in capsys.readouterr().out.splitlines() if l.startswith("RESULT ")]  # fmt: skip
    assert [(r["variant"], r["length"]) for r in rows] == [("plugin_q4", 128)]
    assert rows[0]["tokens_per_second"] > 0 and "error" not in rows[0]
    # the plugin row trains against float copies (auto, as a run does), the
    # next row finds the quantized base again
    assert rows[0]["base"] == "float copies"
    row = step_speed.mlx_measure(model, "tiny", "plugin_quantized_base", 1, 128, 2)
    assert row["base"] == "quantized"
    assert step_speed.mlx_measure(model, "tiny", "stock_aligned", 1, 128, 2)["base"] == "quantized"  # fmt: skip
    assert isinstance(model.layers[-1].self_attn.q_proj.linear, nn.QuantizedLinear)
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)


def test_a_refinement_after_an_mlx_failure_runs_in_a_new_process(capsys, monkeypatch):
    """The process that ran out of memory hands the refinement back instead
    of measuring it with an allocator that is not what it was."""
    import json
    import time

    import step_speed

    def measure(model, size, variant, batch, length, iters):
        if length >= 512:
            raise RuntimeError("cudaMallocAsync(&data, size, stream) failed: out of memory")  # fmt: skip
        return {"tokens_per_second": 1.0, "seconds_per_step": 0.01, "peak_memory_gb": length / 1e3}  # fmt: skip

    monkeypatch.setattr(step_speed, "mlx_measure", measure)
    series = {"variant": "plugin", "start": 128, "max_length": 4096, "limit_gb": 100.0,
              "step": 128, "margin": 1.15, "iters": 2}  # fmt: skip
    step_speed.child({"framework": "mlx", "size": "tiny", "series": series, "deadline": time.time() + 600})  # fmt: skip
    rows = [json.loads(l[7:]) for l in capsys.readouterr().out.splitlines() if l.startswith("RESULT ")]  # fmt: skip
    assert [r.get("length") for r in rows] == [128, 256, 512, None]
    assert "memory_at_error_gb" in rows[2]
    assert rows[3]["retry"] == [384, "refinement after 512 failed"]
