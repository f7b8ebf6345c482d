"""Bad input, atomic writes, failure isolation, distributed training."""

import json
import math
import shutil
import sys
from pathlib import Path

import mlx_lm
import pytest
from conftest import BIN, TRAIN_ARGS, lora, run

from mlx_lm_optiq.adapter_read import mlx_ranks, read_safetensors_header
from mlx_lm_optiq.atomic import atomic_write, atomic_write_json


def snapshot(directory):
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir())}


@pytest.fixture
def existing_adapter(tmp_path, by_bits_adapter):
    """A previous training result the next command must not damage."""
    out = tmp_path / "existing"
    shutil.copytree(by_bits_adapter, out)
    return out


@pytest.fixture
def model_copy(tmp_path, mixed_model):
    out = tmp_path / "model"
    shutil.copytree(mixed_model, out)
    return out


BAD_METADATA = [
    (
        "optiq/metadata.json",
        '{"per_layer": {"model.layers.3.mlp.up_proj": {"bits": 8',
        "not valid JSON",
    ),
    (
        "optiq_metadata.json",
        {"per_layer": {"model.layers.3.mlp.up_proj": {"group_size": 64}}},
        "has no 'bits'",
    ),
    (
        "optiq/metadata.json",
        {"per_layer": {"model.layers.3.mlp.up_proj": {"bits": 7}}},
        "bits must be one of",
    ),
    (
        "optiq/metadata.json",
        {"optimization": {"per_layer": {"model.layers.3.mlp.up_proj": {"bits": 32}}}},
        "bits must be one of",
    ),
    (
        "optiq/sensitivity.json",
        {
            "candidate_bits": [4, 8],
            "layers": [
                {
                    "layer_name": "model.layers.3.mlp.up_proj",
                    "sensitivities": {"4": math.nan, "8": 0.0},
                }
            ],
        },
        "KL must be a finite number",
    ),
    (
        "optiq/sensitivity.json",
        {
            "candidate_bits": [4, 8],
            "layers": [
                {
                    "layer_name": "model.layers.3.mlp.up_proj",
                    "sensitivities": {"4": math.inf, "8": 0.0},
                }
            ],
        },
        "KL must be a finite number",
    ),
    (
        "optiq/sensitivity.json",
        {
            "candidate_bits": [4, 8],
            "layers": [
                {
                    "layer_name": "model.layers.3.mlp.up_proj",
                    "sensitivities": {"4": -0.5, "8": 0.0},
                }
            ],
        },
        "KL must be a finite number",
    ),
    ("optiq/sensitivity.json", '{"layers": [', "not valid JSON"),
]
# A broken config.json is mlx-lm's to report: it can't load the model at all.


@pytest.mark.parametrize(
    "name, content, problem", BAD_METADATA, ids=[f"{n}:{p}" for n, _, p in BAD_METADATA]
)
def test_bad_metadata_is_refused_and_nothing_changes(
    model_copy, data_dir, existing_adapter, name, content, problem
):
    path = model_copy / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    before = snapshot(existing_adapter)
    proc = lora(
        "--model", model_copy, "--data", data_dir, *TRAIN_ARGS,
        "--rank-scaling", "by_kl", "--adapter-path", existing_adapter, check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert str(path) in proc.stderr and problem in proc.stderr
    assert snapshot(existing_adapter) == before


def test_keys_that_match_no_module_are_listed(model_copy, data_dir, tmp_path):
    (model_copy / "optiq").mkdir()
    per_layer = {
        f"model.layers.{i}.mlp.up_proj": {"bits": 4} for i in (2, 3, 40, 41, 42, 43)
    }
    (model_copy / "optiq" / "metadata.json").write_text(
        json.dumps({"per_layer": per_layer})
    )
    proc = lora(
        "--model", model_copy, "--data", data_dir, *TRAIN_ARGS,
        "--rank-scaling", "by_bits", "--adapter-path", tmp_path / "a",
    )  # fmt: skip
    assert (
        "optiq/metadata.json: 4 entries match no module of the model: "
        "layers.40.mlp.up_proj, layers.41.mlp.up_proj, layers.42.mlp.up_proj, … (4 in all)"
    ) in proc.stdout
    assert "has no entry for 12 adapted modules" in proc.stdout


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"\x00\x01", "too short"),
        (b"not a safetensors file at all", "truncated or not a safetensors file"),
    ],
)
def test_broken_adapter_file_is_refused(
    tmp_path, by_bits_adapter, mixed_model, data_dir, content, problem
):
    adapter = tmp_path / "broken"
    shutil.copytree(by_bits_adapter, adapter)
    (adapter / "adapters.safetensors").write_bytes(content)
    with pytest.raises(ValueError, match=problem) as e:
        mlx_lm.load(str(mixed_model), adapter_path=str(adapter))
    assert "adapters.safetensors" in str(e.value)

    proc = lora(
        "--model", mixed_model, "--data", data_dir, *TRAIN_ARGS, "--rank", "4",
        "--resume-adapter-file", adapter / "adapters.safetensors",
        "--adapter-path", tmp_path / "new", check=False,
    )  # fmt: skip
    assert proc.returncode == 1 and problem in proc.stderr
    assert not (tmp_path / "new").exists()


def test_truncated_adapter_file_is_refused(tmp_path, by_bits_adapter, mixed_model):
    adapter = tmp_path / "cut"
    shutil.copytree(by_bits_adapter, adapter)
    data = (by_bits_adapter / "adapters.safetensors").read_bytes()
    (adapter / "adapters.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        mlx_lm.load(str(mixed_model), adapter_path=str(adapter))


def _untouched(model):
    return all(type(m).__name__ != "LoRALinear" for _, m in model.named_modules())


def test_shapes_contradicting_rank_pattern_are_refused_before_any_change(
    tmp_path, by_bits_adapter, mixed_model
):
    adapter = tmp_path / "contradiction"
    shutil.copytree(by_bits_adapter, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["lora_parameters"]["rank_pattern"]["model.layers.3.self_attn.v_proj"] = 16
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    model, _ = mlx_lm.load(str(mixed_model))
    from mlx_lm.tuner.utils import load_adapters

    with pytest.raises(
        ValueError,
        match=r"v_proj.lora_a has shape \(64, 8\) .* rank_pattern needs \(64, 16\)",
    ):
        load_adapters(model, str(adapter))
    assert _untouched(model)


def test_adapter_for_another_base_model_is_refused_before_any_change(
    tmp_path, by_bits_adapter, models
):
    import tiny_model

    wider = tiny_model.build_model(models / "llama-wider", hidden=128, intermediate=256)
    model, _ = mlx_lm.load(str(wider))
    from mlx_lm.tuner.utils import load_adapters

    with pytest.raises(ValueError, match="another base model"):
        load_adapters(model, str(by_bits_adapter))
    assert _untouched(model)


class Crash(BaseException):
    pass


def test_interrupted_write_leaves_the_previous_file(tmp_path):
    target = tmp_path / "adapter_config.json"
    atomic_write_json(target, {"rank": 8})
    before = target.read_bytes()

    def half_then_crash(tmp):
        Path(tmp).write_text('{"rank": 1')
        raise Crash()  # as a Ctrl-C would

    with pytest.raises(Crash):
        atomic_write(target, half_then_crash)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter_config.json"]


def test_diverged_training_is_not_reported_as_trained(tmp_path, mixed_model, data_dir):
    out = tmp_path / "diverged"
    proc = lora(
        "--model", mixed_model, "--data", data_dir, *TRAIN_ARGS,
        "--rank-scaling", "by_bits", "--learning-rate", "1e30", "--adapter-path", out,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "hold NaN or inf" in proc.stderr and "lower the learning rate" in proc.stderr
    assert "saved to" not in proc.stdout
    assert not (out / "optiq_lora_config.json").exists()


def test_missing_dependency_fails_open(tmp_path, mixed_model):
    """A broken pluggy: python and stock mlx-lm still work; one line says why."""
    fake = tmp_path / "pluggy"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('pluggy is broken')\n")
    env = {"PYTHONPATH": str(tmp_path)}
    assert run([sys.executable, "-c", "pass"], env=env).stderr == ""
    proc = lora("--help", env=env)
    assert "--rank-scaling" not in proc.stdout and "--model" in proc.stdout
    assert proc.stderr.splitlines() == [
        "mlx-lm-optiq: not active, mlx-lm runs unmodified (ImportError: pluggy is broken)"
    ]
    proc = lora(
        "--model", mixed_model, "--rank-scaling", "by_bits", env=env, check=False
    )
    assert proc.returncode == 1
    assert (
        "--rank-scaling was asked for, but the plugin could not hook into mlx-lm"
        in proc.stderr
    )


def test_stock_tuner_tests_pass_with_the_plugin(mlx_lm_sdist):
    tests = [
        mlx_lm_sdist / "tests" / f
        for f in ("test_finetune.py", "test_tuner_utils.py", "test_tuner_trainer.py")
    ]
    code = "import mlx_lm.lora, sys; sys.exit(0 if hasattr(mlx_lm.lora.train_model, '__optiq_original__') else 1)"
    run([sys.executable, "-c", code])  # the plugin is active in these runs
    proc = run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        cwd=mlx_lm_sdist,
    )
    assert " passed" in proc.stdout and "failed" not in proc.stdout


RECORDER = """
import json, os
import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm_optiq.mlx_lm_hookspecs import hookimpl

@hookimpl
def mlx_lm_lora_adapter_saved(args, model, adapter_path):
    rank = mx.distributed.init().rank()
    ranks = {k[: -len(".lora_a")]: v.shape[1] for k, v in tree_flatten(model.parameters()) if k.endswith(".lora_a")}
    with open(os.path.join(os.environ["RECORD_DIR"], f"ranks-{rank}.json"), "w") as f:
        json.dump({"ranks": ranks, "files": sorted(os.listdir(adapter_path))}, f)
"""


def test_distributed_training_two_processes(tmp_path, mixed_model, data_dir):
    """``mlx.launch`` with the ring backend: two processes on this machine."""
    plugin_dir = tmp_path / "plugin"
    dist = plugin_dir / "recorder-0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: recorder\nVersion: 0\n"
    )
    (dist / "entry_points.txt").write_text("[mlx_lm]\nrecorder = rank_recorder\n")
    (plugin_dir / "rank_recorder.py").write_text(RECORDER)
    record = tmp_path / "record"
    record.mkdir()
    out = tmp_path / "adapter"
    proc = run(
        [BIN / "mlx.launch", "-n", "2", "--backend", "ring", BIN / "mlx_lm.lora",
         "--model", mixed_model, "--data", data_dir, *TRAIN_ARGS,
         "--rank-scaling", "by_bits", "--rank", "4", "--adapter-path", out],
        env={"PYTHONPATH": str(plugin_dir), "RECORD_DIR": str(record)},
    )  # fmt: skip
    per_process = [json.loads((record / f"ranks-{r}.json").read_text()) for r in (0, 1)]
    assert per_process[0]["ranks"] == per_process[1]["ranks"]
    assert sorted(set(per_process[0]["ranks"].values())) == [4, 8]
    # one writer: one summary, one "saved"; the files are ours and they load
    assert proc.stdout.count("rank distribution:") == 1
    assert proc.stdout.count("adapter with per-module ranks saved") == 1
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors",
        "adapters.safetensors", "optiq_lora_config.json",
    ]  # fmt: skip
    assert (
        mlx_ranks(read_safetensors_header(out / "adapters.safetensors"))
        == per_process[0]["ranks"]
    )
    mlx_lm.load(str(mixed_model), adapter_path=str(out))


def _in_process_args(model, data, adapter, **overrides):
    import types

    import mlx_lm.lora

    config = dict(mlx_lm.lora.CONFIG_DEFAULTS)
    config.update(
        model=str(model), data=str(data), adapter_path=str(adapter), train=True,
        iters=2, batch_size=2, val_batches=1, steps_per_eval=100, num_layers=2,
        rank_scaling="by_kl", rank=None, rank_budget=None,
    )  # fmt: skip
    config.update(overrides)
    return types.SimpleNamespace(**config)


def test_train_model_in_process_raises_and_the_caller_goes_on(
    model_copy, data_dir, tmp_path
):
    """A notebook, a benchmark or a server calling mlx-lm's train_model gets
    the exception, not an exit, and can train again in the same process."""
    import mlx_lm.lora
    from mlx_lm.tuner.datasets import load_dataset

    from mlx_lm_optiq.errors import OptiqError

    (model_copy / "optiq").mkdir()
    bad = model_copy / "optiq" / "metadata.json"
    bad.write_text('{"per_layer": {"model.layers.3.mlp.up_proj": {"bits": 7}}}')
    model, tokenizer = mlx_lm.load(str(model_copy))
    args = _in_process_args(model_copy, data_dir, tmp_path / "a")
    train, valid, _ = load_dataset(args, tokenizer)
    with pytest.raises(OptiqError, match="bits must be one of") as e:
        mlx_lm.lora.train_model(args, model, train, valid)
    assert e.value.path == bad
    assert not (tmp_path / "a").exists()

    bad.unlink()
    model, _ = mlx_lm.load(str(model_copy))
    args = _in_process_args(model_copy, data_dir, tmp_path / "b")
    mlx_lm.lora.train_model(args, model, train, valid)
    ranks = mlx_ranks(read_safetensors_header(tmp_path / "b" / "adapters.safetensors"))
    assert sorted(set(ranks.values())) == [8, 16]  # by_kl fell back to by_bits
