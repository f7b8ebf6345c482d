"""Shared bits of the benchmarks: environment record, table, JSON result."""

import datetime
import json
import os
import platform
from pathlib import Path


def gpu():
    """The GPU's name and memory, the driver and CUDA versions (``nvidia-smi``),
    or ``{}`` on a machine without one."""
    import re
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return {}
    try:
        query = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
             "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout  # fmt: skip
        header = subprocess.run(
            ["nvidia-smi"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return {"gpu_error": f"{type(e).__name__}: {e}"}
    gpus = [[c.strip() for c in line.split(",")] for line in query.splitlines() if line]
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", header)
    return {
        "gpu_name": gpus[0][0] if gpus else None,
        "gpu_memory_mib": int(float(gpus[0][1])) if gpus else None,
        "gpu_count": len(gpus),
        "driver_version": gpus[0][2] if gpus else None,
        "cuda_version": cuda.group(1) if cuda else None,
    }


def environment():
    """Date, machine, GPU and versions, recorded with every result."""
    import mlx.core as mx
    import mlx_lm

    import mlx_lm_optiq

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "device": str(mx.default_device()),
        **gpu(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "mlx_lm_optiq": mlx_lm_optiq.__version__,
        "ld_preload": os.environ.get("LD_PRELOAD", ""),
    }


def print_table(header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(
        str(c).ljust(w) for c, w in zip(cells, widths)
    )  # noqa: E731
    print(line(header))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))


def write_result(path, doc):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)
    print(f"wrote {path}")


def read_jsonl(path) -> list:
    """The rows a study's log holds (none when it has no log yet)."""

    path = Path(path)
    return (
        [json.loads(l) for l in path.read_text().splitlines()] if path.is_file() else []
    )


def append_jsonl(path, row: dict) -> None:
    """One more row in a study's log, as soon as it is known (a rerun resumes)."""

    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def train_in_process(plugin, loaded=None, **overrides):
    """One ``mlx_lm.lora`` training run through mlx-lm's own ``train_model``.

    Args:
        plugin: ``True`` runs with the shim installed, ``False`` with stock mlx-lm.
        loaded: ``(model, tokenizer)`` built in this process, instead of
          loading ``model`` (which then only names the directory whose
          ``config.json`` and metadata the plugin reads).
        overrides: ``mlx_lm.lora`` config keys (``model``, ``data``,
          ``adapter_path``, ``rank_scaling``, ``lora_parameters``, ...).

    Returns:
        ``{"train": [...], "val": [...], "wall_seconds", "peak_memory_gb"}``
        with mlx-lm's own training-callback reports.
    """
    import time
    import types

    import mlx.core as mx
    import mlx_lm
    import mlx_lm.lora as lora
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.datasets import load_dataset
    from mlx_lm.tuner.trainer import TrainingCallback

    from mlx_lm_optiq import _startup

    (_startup.install if plugin else _startup.uninstall)()
    if plugin and _startup.failure:  # every arm of a study runs the same code
        raise RuntimeError(f"the plugin is not active: {_startup.failure}")

    class Record(TrainingCallback):
        def __init__(self):
            self.train, self.val = [], []

        def on_train_loss_report(self, info):
            self.train.append(info)

        def on_val_loss_report(self, info):
            self.val.append(info)

    config = dict(lora.CONFIG_DEFAULTS)
    config.update(rank_scaling=None, rank=None, rank_budget=None, train=True)
    config.update(overrides)
    args = types.SimpleNamespace(**config)
    model, tokenizer = loaded or mlx_lm.load(str(args.model))
    train_set, valid_set, _ = load_dataset(args, tokenizer)
    record = Record()
    np.random.seed(args.seed)  # as mlx_lm.lora.run does: the batch order
    mx.reset_peak_memory()
    tic = time.perf_counter()
    lora.train_model(args, model, train_set, valid_set, record)
    return {
        "train": record.train,
        "val": record.val,
        "wall_seconds": time.perf_counter() - tic,
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
        "trainable_parameters": sum(
            v.size for _, v in tree_flatten(model.trainable_parameters())
        ),
    }


def run_all(tasks, jobs, deadline, work, report=None):
    """``({name: result}, {name: error})`` for ``{name: args}``, ``jobs`` at a time.

    ``work(*args)`` does one task; it must be a module-level function (worker
    processes are spawned). The first task runs alone so that the kernels it
    compiles are on disk before the others start; a task that fails is tried
    once more (two processes compiling one kernel can meet half-written cache
    files). Tasks not started by ``deadline`` (``time.monotonic()``) are left out.
    """
    import concurrent.futures
    import multiprocessing
    import time

    names = list(tasks)
    done, failed = {}, {}
    report = report or (lambda name, result: None)
    if jobs <= 1:
        for name in names:
            if time.monotonic() > deadline:
                break
            try:
                done[name] = work(*tasks[name])
            except Exception as e:  # noqa: BLE001 - recorded, the rest go on
                failed[name] = f"{type(e).__name__}: {e}"[:300]
                print(f"{name}: failed: {failed[name]}", flush=True)
                continue
            report(name, done[name])
        return done, failed
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        pending = {}
        if names and time.monotonic() < deadline:
            first = pool.submit(_until, deadline, work, *tasks[names[0]])
            pending[first] = (names[0], 0)
            concurrent.futures.wait([first])  # alone: its kernels land on disk first
        for name in names[1:]:
            pending[pool.submit(_until, deadline, work, *tasks[name])] = (name, 0)
        while pending:
            ready, _ = concurrent.futures.wait(pending, return_when="FIRST_COMPLETED")
            for future in ready:
                name, tries = pending.pop(future)
                try:
                    result = future.result()
                except Exception as e:  # noqa: BLE001 - retried once, then recorded
                    if tries == 0:
                        retry = pool.submit(_until, deadline, work, *tasks[name])
                        pending[retry] = (name, 1)
                    else:
                        failed[name] = f"{type(e).__name__}: {e}"[:300]
                        print(f"{name}: failed: {failed[name]}", flush=True)
                    continue
                if result is not None:
                    done[name] = result
                    report(name, result)
    return done, failed


def _until(deadline, work, *args):
    import time

    return None if time.monotonic() > deadline else work(*args)


ANSWER = r"####\s*(-?[\d,\.]+)"


def gsm8k_answers(model_dir, adapter_path, data, limit, max_tokens, batch_size):
    """``[correct?]`` per GSM8K test question, greedy, prompts formatted the way
    mlx-lm's completions dataset trained them (the tokenizer's chat template)."""
    import json
    import re

    import mlx_lm

    rows = [json.loads(l) for l in open(Path(data) / "test.jsonl")][:limit]
    model, tokenizer = mlx_lm.load(
        str(model_dir), adapter_path=str(adapter_path) if adapter_path else None
    )
    if tokenizer.chat_template:
        prompts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": r["prompt"]}],
                add_generation_prompt=True,
                return_dict=False,
            )
            for r in rows
        ]
    else:
        prompts = [tokenizer.encode(r["prompt"]) for r in rows]
    texts = []
    for i in range(0, len(prompts), batch_size):
        texts += mlx_lm.batch_generate(
            model, tokenizer, prompts[i : i + batch_size], max_tokens=max_tokens
        ).texts
    answer = re.compile(ANSWER)

    def number(text):
        found = answer.search(text)
        return found.group(1).replace(",", "").rstrip(".") if found else None

    return [
        number(text) is not None and number(text) == number(row["completion"])
        for row, text in zip(rows, texts)
    ]
