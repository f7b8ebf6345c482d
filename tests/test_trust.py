"""No silent wrong result, however mlx-lm is started; every input bounded.

Each test is a case found by trying the landed code as a user, and as an
attacker, would; each failed before its fix (see the closing note's table).
"""

import json
import resource
import shutil
import sys

import mlx.core as mx
import pytest
import tiny_model
from conftest import BIN, TRAIN_ARGS, entry_point_plugin, lora, read_json, run

from mlx_lm_optiq.adapter_read import mlx_ranks, read_safetensors_header

BY_BITS = {4, 8}  # the ranks by_bits --rank 4 gives the tiny mixed model


def ranks_of(adapter):
    return set(mlx_ranks(read_safetensors_header(adapter / "adapters.safetensors")).values())  # fmt: skip


def last_line(proc):
    return proc.stderr.strip().splitlines()[-1]


# -- however mlx-lm is started ----------------------------------------------------


@pytest.mark.parametrize(
    "command, spelling",
    [
        ("python -m mlx_lm.lora", "-c"),
        ("python -m mlx_lm.lora", "--config="),
        ("python -m mlx_lm lora", "--config"),
        ("mlx_lm.lora", "--config="),
    ],
)
def test_every_way_to_start_mlx_lm_runs_the_plugin(
    command, spelling, mixed_model, data_dir, tmp_path
):
    config = tmp_path / "config.yaml"
    config.write_text("rank_scaling: by_bits\nrank: 4\n")
    start = {
        "python -m mlx_lm.lora": [sys.executable, "-m", "mlx_lm.lora"],
        "python -m mlx_lm lora": [sys.executable, "-m", "mlx_lm", "lora"],
        "mlx_lm.lora": [BIN / "mlx_lm.lora"],
    }[command]
    flag = [f"--config={config}"] if spelling == "--config=" else [spelling, config]
    out = tmp_path / "a"
    run([*start, "--model", mixed_model, "--data", data_dir, *TRAIN_ARGS, *flag,
         "--adapter-path", out])  # fmt: skip
    assert (out / "optiq_lora_config.json").is_file()
    assert ranks_of(out) == BY_BITS


# The package as a source tree on the path, with no installed distribution to
# read (no version, no entry points for its hooks): its .dist-info is hidden
# from this process, then the shim is switched on by hand, as
# benchmarks/common.py does, and mlx-lm's own main() runs a YAML config.
FROM_SOURCE = (
    "import sys, importlib.machinery as m\n"
    "class Hidden(m.PathFinder):\n"
    "    @classmethod\n"
    "    def find_distributions(cls, *a, **k):\n"
    "        return [d for d in super().find_distributions(*a, **k)\n"
    "                if d.metadata['Name'] != 'mlx-lm-optiq']\n"
    "sys.meta_path[:] = [Hidden if f is m.PathFinder else f for f in sys.meta_path]\n"
    "from mlx_lm_optiq import _startup\n"
    "_startup.uninstall(); _startup.install()\n"
    "import mlx_lm.lora\n"
    "sys.argv = ['mlx_lm.lora', *{argv!r}]\n"
    "mlx_lm.lora.main()\n"
)


def test_a_plugin_that_could_not_hook_refuses_an_in_process_run_that_asks_for_it(
    mixed_model, data_dir, tmp_path
):
    """Found when a GPU study ran the package from a checkout: its options
    reached mlx-lm's train_model from Python, the plugin was not active, and
    stock mlx-lm trained without a word."""
    config = tmp_path / "config.yaml"
    config.write_text("rank_scaling: by_bits\nrank: 4\n")
    out = tmp_path / "a"
    argv = ["--model", str(mixed_model), "--data", str(data_dir), *TRAIN_ARGS,
            "-c", str(config), "--adapter-path", str(out)]  # fmt: skip
    proc = run([sys.executable, "-c", FROM_SOURCE.format(argv=argv)], check=False)
    assert proc.returncode == 1
    assert "mlx-lm-optiq is not installed (a source tree on the path?)" in proc.stderr
    assert "OptiqError: mlx-lm-optiq: --rank-scaling, --rank were asked for, but the plugin could not hook" in proc.stderr  # fmt: skip
    assert not out.exists()
    # without the plugin's options, mlx-lm trains as it always does
    config.write_text("learning_rate: 1e-3\n")
    run([sys.executable, "-c", FROM_SOURCE.format(argv=argv)])
    assert (out / "adapters.safetensors").is_file()
    assert not (out / "optiq_lora_config.json").exists()


UNSUPPORTED = (  # mlx-lm with a train() that takes no loss: not hookable
    "import sys, mlx_lm.tuner.trainer as t; "
    "t.train = lambda model, optimizer, train_dataset: None; "
    "sys.argv[1:] = {argv!r}; import mlx_lm.lora"
)


@pytest.mark.parametrize("how", ["--config=", "--config", "-cFILE", "--rank-budget=5k"])
def test_an_unsupported_mlx_lm_never_trains_stock_when_asked_for_the_plugin(
    how, tmp_path
):
    config = tmp_path / "c.yaml"
    config.write_text("model: m\nrank_budget: default\n")
    argv = {
        "--config=": [f"--config={config}"],
        "--config": ["--config", str(config)],
        "-cFILE": [f"-c{config}"],
        "--rank-budget=5k": ["--rank-budget=5k"],
    }[how]
    proc = run([sys.executable, "-c", UNSUPPORTED.format(argv=argv)], check=False)
    assert proc.returncode == 1
    assert "asked for, but the plugin could not hook into mlx-lm" in proc.stderr


def test_a_policy_that_exits_stops_the_run_that_asked_for_it(
    tmp_path, mixed_model, data_dir
):
    source = (
        "import sys\nfrom mlx_lm_optiq.hookspecs import hookimpl\n"
        "def quits(context):\n    sys.exit('no ranks today')\n"
        "@hookimpl\ndef optiq_register_rank_policies(register):\n"
        "    register('quits', quits)\n"
    )
    env = {"PYTHONPATH": str(entry_point_plugin(tmp_path, "quitter", source))}
    proc = lora(
        "--model", mixed_model, "--data", data_dir, *TRAIN_ARGS,
        "--rank-scaling", "quits", "--adapter-path", tmp_path / "a", env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert last_line(proc) == (
        "mlx_lm.lora: error: rank policy 'quits' failed: SystemExit: no ranks today"
    )
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob("a.partial-*"))


WRAPPERS = {
    "mlx_lm": "import pluggy\nhookimpl = pluggy.HookimplMarker('mlx_lm')\n"
    "@hookimpl(wrapper=True)\ndef mlx_lm_lora_adapter_saved(adapter_path):\n"
    "    result = yield\n    raise RuntimeError('boom after')\n",
    "mlx_lm_optiq": "from mlx_lm_optiq.hookspecs import hookimpl\n"
    "@hookimpl(wrapper=True)\ndef optiq_adapter_saved(adapter_dir):\n"
    "    raise RuntimeError('boom before')\n    yield\n",
}


@pytest.mark.parametrize("group", sorted(WRAPPERS))
def test_a_broken_wrapper_disables_its_own_plugin_only(
    group, tmp_path, mixed_model, data_dir
):
    name = "wrapper_" + group.replace("mlx_lm_optiq", "optiq")
    env = {"PYTHONPATH": str(entry_point_plugin(tmp_path, name, WRAPPERS[group], group))}  # fmt: skip
    out = tmp_path / "a"
    proc = lora(
        "--model", mixed_model, "--data", data_dir, *TRAIN_ARGS, "--rank-scaling",
        "by_bits", "--rank", "4", "--adapter-path", out, env=env,
    )  # fmt: skip
    assert ranks_of(out) == BY_BITS and (out / "optiq_lora_config.json").is_file()
    said = [l for l in proc.stderr.splitlines() if "disabled plugin" in l]
    assert len(said) == 1 and f"disabled plugin {name!r}" in said[0]
    assert "disabled plugin 'optiq'" not in proc.stderr  # ours stays


def test_a_broken_metadata_reader_stops_the_run_instead_of_training_stock(
    tmp_path, mixed_model, data_dir
):
    source = (
        "from mlx_lm_optiq.hookspecs import hookimpl\n"
        "def read(path):\n    raise RuntimeError('cannot parse')\n"
        "@hookimpl\ndef optiq_register_metadata_readers(register):\n"
        "    register('config.json', read)\n"
    )
    model = tmp_path / "model"
    shutil.copytree(mixed_model, model)
    env = {"PYTHONPATH": str(entry_point_plugin(tmp_path, "reader", source))}
    proc = lora(
        "--model", model, "--data", data_dir, *TRAIN_ARGS, "--rank-scaling", "by_bits",
        "--adapter-path", tmp_path / "a", env=env, check=False,
    )  # fmt: skip
    # config.json is a built-in's file: the third-party reader for it is ignored
    assert proc.returncode == 0, proc.stderr[-800:]
    (model / "their_metadata.json").write_text("{}")
    source = source.replace("'config.json'", "'their_metadata.json'")
    env = {"PYTHONPATH": str(entry_point_plugin(tmp_path / "2", "reader", source))}
    proc = lora(
        "--model", model, "--data", data_dir, *TRAIN_ARGS, "--rank-scaling", "by_bits",
        "--adapter-path", tmp_path / "b", env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert last_line(proc) == (
        f"mlx_lm.lora: error: {model / 'their_metadata.json'}: the metadata reader "
        "for their_metadata.json failed: RuntimeError: cannot parse"
    )


# -- every input bounded ----------------------------------------------------------


@pytest.mark.parametrize(
    "options, problem",
    [
        (["--rank-budget", "10"], "--rank-budget 10: 10 adapter parameters can't hold "
         "even one module at rank 2 (the smallest takes 192); give a larger budget"),
        (["--rank", "100000000"], "--rank 100000000 is larger than the smaller "
         "dimension of 14 adapted modules (e.g. model.layers.2.self_attn.v_proj: at "
         "most 32); a LoRA rank can't exceed it"),
    ],
    ids=["budget", "rank"],
)  # fmt: skip
def test_budgets_and_ranks_that_cant_train_are_one_line(
    options, problem, mixed_model, data_dir, tmp_path
):
    proc = lora(
        "--model", mixed_model, "--data", data_dir, *TRAIN_ARGS,
        "--rank-scaling", "by_bits", *options, "--adapter-path", tmp_path / "a",
        check=False,
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert last_line(proc) == f"mlx_lm.lora: error: {problem}"
    assert list(tmp_path.iterdir()) == []


def test_resuming_from_another_base_model_is_refused_before_training(
    tmp_path, models, data_dir, by_bits_adapter
):
    wider = tiny_model.build_model(models / "llama-wider", quantize="mixed", hidden=96)
    resume = by_bits_adapter / "adapters.safetensors"
    for extra in ([], ["--rank-scaling", "by_bits"]):
        proc = lora(
            "--model", wider, "--data", data_dir, *TRAIN_ARGS, "--rank", "4", *extra,
            "--resume-adapter-file", resume, "--adapter-path", tmp_path / "x",
            check=False,
        )  # fmt: skip
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        line = last_line(proc)
        assert line.startswith(f"mlx_lm.lora: error: {resume}: ") and (
            "but this model with this run's rank" in line
        ), line
        assert "Iter 1" not in proc.stdout


def test_prompts_that_fill_max_seq_length_are_skipped_and_counted(
    mixed_model, tmp_path
):
    data = tmp_path / "data"
    data.mkdir()
    long_prompt = " ".join(["the cat sat on the mat"] * 30)
    rows = [{"prompt": long_prompt, "completion": " and slept"}] * 6 + [
        {"prompt": "a dog", "completion": " runs"}
    ] * 6
    for name in ("train", "valid"):
        (data / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    args = ["--model", mixed_model, "--data", data, *TRAIN_ARGS, "--mask-prompt",
            "--max-seq-length", "32", "--rank-scaling", "by_bits"]  # fmt: skip
    proc = lora(*args, "--adapter-path", tmp_path / "a")
    assert "batch with no target token skipped so far" in proc.stdout
    assert ranks_of(tmp_path / "a")  # trained, on the batches that teach something
    for name in ("train", "valid"):  # now every prompt fills it
        (data / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:6]))
    proc = lora(*args, "--adapter-path", tmp_path / "b", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "no batch of the data has a target token" in proc.stderr
    assert "diverged" not in proc.stderr and "learning rate" not in proc.stderr
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob("b.partial-*"))


def test_a_full_disk_mid_training_is_one_line_and_frees_the_space(
    tmp_path, by_bits_adapter, mixed_model, data_dir
):
    existing = tmp_path / "adapter"
    shutil.copytree(by_bits_adapter, existing)
    before = {p.name: p.read_bytes() for p in existing.iterdir()}
    limit = 20_000  # the configs fit, the first weights (42 kB) don't
    proc = lora(
        "--model", mixed_model, "--data", data_dir, *TRAIN_ARGS, "--rank-scaling",
        "by_bits", "--rank", "4", "--adapter-path", existing, check=False,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-1200:]
    line = last_line(proc)
    assert "could not write this run's files ([write] Unable to write" in line
    assert "is the disk full?" in line and "partial directory was removed" in line
    assert {p.name: p.read_bytes() for p in existing.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_info_on_a_broken_sidecar_or_config_is_one_line(tmp_path, by_bits_adapter):
    for name, edit in [
        ("optiq_lora_config.json", lambda d: {**d, "base_rank": "eight"}),
        ("optiq_lora_config.json", lambda d: {**d, "modules": {"m": {"rank": -1}}}),
        ("adapter_config.json", lambda d: {**d, "lora_parameters": [1, 2]}),
    ]:
        copy = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(by_bits_adapter, copy)
        (copy / name).write_text(json.dumps(edit(read_json(copy / name))))
        proc = run([sys.executable, "-m", "mlx_lm_optiq.info", copy], check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        (line,) = proc.stderr.strip().splitlines()
        assert line.startswith(f"error: {copy / name}: "), line


def test_quantize_and_sensitivity_refuse_numbers_that_mean_nothing(
    tmp_path, fp_model, data_dir
):
    for tool, extra in [
        ("quantize", ["-o", tmp_path / "q", "--target-bpw", "nan"]),
        ("quantize", ["-o", tmp_path / "q", "--target-bpw", "5", "--group-size", "0"]),
        ("sensitivity", ["--data", data_dir, "--group-size", "7"]),
        ("sensitivity", ["--data", data_dir, "--samples", "0"]),
    ]:
        proc = run([sys.executable, "-m", f"mlx_lm_optiq.{tool}", fp_model, *extra],
                   check=False)  # fmt: skip
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert "error: argument" in proc.stderr
    assert not (tmp_path / "q").exists() and not (fp_model / "optiq").exists()


def test_sensitivity_refuses_broken_models_and_data(tmp_path, fp_model, data_dir):
    broken = tmp_path / "nan_model"
    shutil.copytree(fp_model, broken)
    weights = mx.load(str(broken / "model.safetensors"))
    weights = {k: v * float("nan") if "layers.1.mlp" in k else v for k, v in weights.items()}  # fmt: skip
    mx.save_safetensors(str(broken / "model.safetensors"), weights)
    bad_text = tmp_path / "bad_text"
    bad_text.mkdir()
    (bad_text / "train.jsonl").write_bytes(b'{"text": "fine"}\n\xff\xfe not text\n')
    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "train.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    for model, data, problem in [
        (broken, data_dir, "the model's own next-token distribution holds NaN or inf"),
        (fp_model, bad_text, f"{bad_text / 'train.jsonl'}: not UTF-8 text"),
        (fp_model, bad_json, f"{bad_json / 'train.jsonl'}: line 2: not a JSON row"),
    ]:
        out = tmp_path / "s" / "sensitivity.json"
        proc = run([sys.executable, "-m", "mlx_lm_optiq.sensitivity", model, "--data",
                    data, "-o", out], check=False)  # fmt: skip
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert problem in last_line(proc), last_line(proc)
        assert not out.exists()


def test_an_interrupted_sensitivity_pass_leaves_a_file_it_resumes(
    tmp_path, fp_model, data_dir, monkeypatch, capsys
):
    from mlx_lm_optiq import sensitivity

    model = tmp_path / "model"
    shutil.copytree(fp_model, model)
    calls = []
    real = sensitivity.Reference.kl_trials

    def interrupted(self, trials):
        calls.append(trials[0][0].path)
        if len(calls) == 4:  # check() is the first call, then a pass per block
            raise KeyboardInterrupt
        return real(self, trials)

    monkeypatch.setattr(sensitivity.Reference, "kl_trials", interrupted)
    args = ["--data", str(data_dir), "--group-size", "32", "--samples", "4"]
    with pytest.raises(SystemExit) as stopped:
        sensitivity.main([str(model), *args])
    assert stopped.value.code == 130
    doc = read_json(model / "optiq" / "sensitivity.json")
    assert doc["complete"] is False and len(doc["layers"]) == 14  # two blocks
    assert "the same command resumes from there" in capsys.readouterr().err
    monkeypatch.setattr(sensitivity.Reference, "kl_trials", real)
    assert sensitivity.main([str(model), *args]) == 0
    assert "resuming: 14 of 28 modules already measured" in capsys.readouterr().out
    assert read_json(model / "optiq" / "sensitivity.json")["complete"] is True
