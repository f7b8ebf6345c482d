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
