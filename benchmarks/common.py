"""Shared bits of the benchmarks: environment record, table, JSON result."""

import datetime
import json
import os
import platform
from pathlib import Path


def environment():
    """Date, machine and versions, recorded with every result."""
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
