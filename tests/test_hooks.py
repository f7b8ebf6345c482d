"""The hook surface: documented, tested, and usable by third-party plugins."""

import inspect
import json
import sys

import pytest
from conftest import ROOT, TRAIN_ARGS, lora, run

from mlx_lm_optiq import hookspecs, metadata, mlx_lm_hookspecs, plugins
from mlx_lm_optiq.adapter_read import mlx_ranks, read_safetensors_header

HOOKS = [
    (module, name, fn)
    for module in (hookspecs, mlx_lm_hookspecs)
    for name, fn in inspect.getmembers(module, inspect.isfunction)
    if name.startswith(("optiq_", "mlx_lm_"))
]


def test_there_are_eleven_hooks():
    assert sorted(name for _, name, _ in HOOKS) == [
        "mlx_lm_load_adapters",
        "mlx_lm_lora_adapter_saved",
        "mlx_lm_lora_add_arguments",
        "mlx_lm_lora_configure",
        "mlx_lm_lora_parameters",
        "mlx_lm_lora_training_failed",
        "mlx_lm_lora_training_functions",
        "mlx_lm_lora_training_start",
        "optiq_adapter_saved",
        "optiq_register_metadata_readers",
        "optiq_register_rank_policies",
    ]


# Where each hook is tested; a hook missing here fails the test below.
TESTED_BY = {
    "optiq_register_rank_policies": "test_hooks.py::test_third_party_rank_policy_through_the_cli",
    "optiq_register_metadata_readers": "test_hooks.py::test_third_party_metadata_reader_comes_after_builtins",
    "optiq_adapter_saved": "test_hooks.py::test_optiq_adapter_saved_runs_after_the_builtins_wrote",
    "mlx_lm_lora_add_arguments": "test_cli.py::test_help_explains_the_new_options",
    "mlx_lm_lora_configure": "test_cli.py::test_bad_settings_stop_before_the_model_loads",
    "mlx_lm_lora_training_functions": "test_shim.py::test_training_functions_reach_train_and_evaluate",
    "mlx_lm_lora_training_failed": "test_trust.py::test_a_full_disk_mid_training_is_one_line_and_frees_the_space",
    "mlx_lm_lora_parameters": "test_shim.py::test_hooks_pass_through_when_nothing_is_asked",
    "mlx_lm_lora_training_start": "test_cli.py::test_lora_plus_makes_every_lora_b_step_ratio_times_larger",
    "mlx_lm_lora_adapter_saved": "test_cli.py::test_sidecar_records_every_module",
    "mlx_lm_load_adapters": "test_load.py::test_adapter_without_rank_pattern_loads_from_shapes",
}


@pytest.mark.parametrize("module, name, fn", HOOKS, ids=[h[1] for h in HOOKS])
def test_every_hook_is_documented_and_tested(module, name, fn):
    signature = f"{name}({', '.join(inspect.signature(fn).parameters)})"
    assert f"### `{signature}`" in (ROOT / "docs" / "hooks.md").read_text()
    assert fn.__doc__ and ":param" in fn.__doc__
    assert name in TESTED_BY, f"{name} has no test"
    test_file, test_name = TESTED_BY[name].split("::")
    assert f"def {test_name}(" in (ROOT / "tests" / test_file).read_text()


@pytest.fixture(scope="module")
def by_depth_site(tmp_path_factory):
    """The example plugin package, pip-installed into its own directory."""
    site = tmp_path_factory.mktemp("by_depth_site")
    run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", site, ROOT / "examples" / "optiq-by-depth"])  # fmt: skip
    return site


def test_third_party_rank_policy_through_the_cli(
    by_depth_site, tmp_path, mixed_model, data_dir
):
    out = tmp_path / "a"
    env = {"PYTHONPATH": str(by_depth_site)}
    proc = lora("--help", env=env)
    assert "by_depth" in proc.stdout
    lora(
        "--model", mixed_model, "--data", data_dir, *TRAIN_ARGS, "--num-layers", "3",
        "--rank-scaling", "by_depth", "--rank", "4", "--adapter-path", out, env=env,
    )  # fmt: skip
    ranks = mlx_ranks(read_safetensors_header(out / "adapters.safetensors"))
    # layers 1, 2, 3 of 4: 0.5x, 1.25x, 2x the base rank of 4
    assert {int(p.split(".")[2]): r for p, r in ranks.items()} == {1: 2, 2: 5, 3: 8}
    assert (
        json.loads((out / "optiq_lora_config.json").read_text())["rank_scaling"]
        == "by_depth"
    )

    # limited away by the environment switch: no longer a choice
    proc = lora(
        "--model", mixed_model, "--rank-scaling", "by_depth", "--train",
        env={**env, "MLX_LM_OPTIQ_PLUGINS": ""}, check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "invalid choice: 'by_depth'" in proc.stderr


def test_a_broken_plugin_is_skipped_with_one_line(tmp_path, mixed_model):
    """A fake entry point, no packaging: a dist-info directory on the path."""
    dist = tmp_path / "broken_plugin-0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0\n"
    )
    (dist / "entry_points.txt").write_text("[mlx_lm_optiq]\nbroken = broken_plugin\n")
    (tmp_path / "broken_plugin.py").write_text(
        "raise ImportError('missing dependency xyz')\n"
    )
    proc = lora("--help", env={"PYTHONPATH": str(tmp_path)})
    lines = [l for l in proc.stderr.splitlines() if "broken" in l]
    assert lines == [
        "mlx-lm-optiq: skipped plugin 'broken' (broken_plugin): ImportError: missing dependency xyz"
    ]
    assert "--rank-scaling" in proc.stdout


class ExtraReader:
    """A plugin object registering a reader for a file of its own."""

    @hookspecs.hookimpl
    def optiq_register_metadata_readers(self, register):
        register("quant_map.json", self.read)
        register("config.json", lambda path: pytest.fail("built-in reader must win"))

    @staticmethod
    def read(path):
        data = json.loads(path.read_text())
        return metadata.Source(
            "quant_map.json",
            path,
            bits={metadata.canonical(k): v for k, v in data.items()},
        )


def test_third_party_metadata_reader_comes_after_builtins(tmp_path):
    pm = plugins.get_plugin_manager()
    plugin = ExtraReader()
    pm.register(plugin)
    try:
        (tmp_path / "quant_map.json").write_text(
            json.dumps({"model.layers.0.mlp.up_proj": 3})
        )
        (tmp_path / "config.json").write_text(
            json.dumps(
                {
                    "quantization": {
                        "bits": 4,
                        "group_size": 64,
                        "model.layers.0.mlp.up_proj": {"bits": 8, "group_size": 64},
                    }
                }
            )
        )
        names = list(plugins.metadata_readers())
        assert names == [
            "optiq/metadata.json",
            "optiq_metadata.json",
            "optiq/sensitivity.json",
            "optiq/gradient.json",
            "config.json",
            "quant_map.json",
        ]
        sources = metadata.read_sources(tmp_path, plugins.metadata_readers())
        assert [s.name for s in sources] == ["config.json", "quant_map.json"]
        facts = metadata.module_facts(
            [("model.layers.0.mlp.up_proj", None)],
            ["model.layers.0.mlp.up_proj"],
            sources,
        )
        assert facts["model.layers.0.mlp.up_proj"].bits == 8  # config.json comes first
    finally:
        pm.unregister(plugin)


class Recorder:
    def __init__(self):
        self.calls = []

    @hookspecs.hookimpl
    def optiq_adapter_saved(self, run, adapter_dir):
        self.calls.append((run.scaling, sorted(p.name for p in adapter_dir.iterdir())))


def test_optiq_adapter_saved_runs_after_the_builtins_wrote(tmp_path, trained_run):
    run_, adapter_dir = trained_run
    pm = plugins.get_plugin_manager()
    recorder = Recorder()
    pm.register(recorder)
    try:
        pm.hook.optiq_adapter_saved(record=run_, adapter_dir=adapter_dir, run=run_)
    finally:
        pm.unregister(recorder)
    # the built-ins run first, so a plugin sees the files they wrote
    assert recorder.calls == [
        (
            "by_bits",
            [
                "adapter_config.json",
                "adapter_model.safetensors",
                "adapters.safetensors",
                "optiq_lora_config.json",
            ],
        )
    ]


@pytest.fixture
def trained_run(tmp_path, by_bits_adapter):
    """The record of a trained adapter, and a copy of its staged files."""
    from mlx_lm_optiq.adapter_record import from_adapter_dir

    adapter_dir = tmp_path / "copy"
    adapter_dir.mkdir()
    config = json.loads((by_bits_adapter / "adapter_config.json").read_text())
    peft_keys = {"peft_type", "r", "lora_alpha", "target_modules", "rank_pattern",
                 "alpha_pattern", "task_type", "base_model_name_or_path", "bias",
                 "fan_in_fan_out", "lora_dropout"}  # fmt: skip
    (adapter_dir / "adapter_config.json").write_text(
        json.dumps({k: v for k, v in config.items() if k not in peft_keys})
    )  # as mlx-lm wrote it, before the built-ins add PEFT's keys
    for name in ("adapters.safetensors", "optiq_lora_config.json"):
        (adapter_dir / name).write_bytes((by_bits_adapter / name).read_bytes())
    return from_adapter_dir(adapter_dir), adapter_dir


def test_mlx_lm_hooks_are_what_the_shim_calls():
    """mlx_lm_lora_add_arguments, mlx_lm_lora_parameters,
    mlx_lm_lora_adapter_saved and mlx_lm_load_adapters: our implementations
    are registered on the host plugin manager under the entry-point name."""
    pm = mlx_lm_hookspecs.get_plugin_manager()
    assert pm.get_plugin("optiq").__name__ == "mlx_lm_optiq.lora_hooks"
    for name in ("mlx_lm_lora_add_arguments", "mlx_lm_lora_parameters",
                 "mlx_lm_lora_adapter_saved", "mlx_lm_load_adapters"):  # fmt: skip
        impls = getattr(pm.hook, name).get_hookimpls()
        assert [i.plugin_name for i in impls] == ["optiq"]


def test_old_policy_signature_still_works_with_a_deprecation_warning():
    from mlx_lm_optiq.ranks import assign
    from mlx_lm_optiq.settings import RunSettings

    def old_style(base_rank, facts, report):
        report("old style")
        return {p: base_rank * 2 for p in facts}

    def new_style(context):
        context.report("new style")
        return {p: context.base_rank * 2 for p in context.facts}

    facts = {"a": metadata.ModuleFacts(4, "test"), "b": metadata.ModuleFacts(8, "t")}
    said = []
    policies = {"old": old_style, "new": new_style}
    with pytest.warns(DeprecationWarning, match="'old' takes .* RankContext"):
        old, _ = assign(RunSettings(rank_scaling="old"), facts, {"a": 1, "b": 1},
                        base_rank=4, report=said.append, policies=policies)  # fmt: skip
    new, _ = assign(RunSettings(rank_scaling="new"), facts, {"a": 1, "b": 1},
                    base_rank=4, report=said.append, policies=policies)  # fmt: skip
    assert old == new == {"a": 8, "b": 8}
    assert said == ["old style", "new style"]


BROKEN = {
    "raises_registering": (
        "mlx_lm_optiq",
        "from mlx_lm_optiq.hookspecs import hookimpl\n"
        "@hookimpl\ndef optiq_register_rank_policies(register):\n"
        "    raise RuntimeError('boom')\n",
        "mlx-lm-optiq: disabled plugin 'raises_registering': "
        "optiq_register_rank_policies raised RuntimeError: boom",
    ),
    "raises_in_mlx_lm": (
        "mlx_lm",
        "import pluggy\nhookimpl = pluggy.HookimplMarker('mlx_lm')\n"
        "@hookimpl\ndef mlx_lm_lora_add_arguments(parser):\n"
        "    raise KeyError('no such option')\n",
        "mlx_lm: disabled plugin 'raises_in_mlx_lm': mlx_lm_lora_add_arguments "
        "raised KeyError: 'no such option'",
    ),
    "exits_on_import": (
        "mlx_lm_optiq",
        "import sys\nsys.exit('I quit')\n",
        "mlx-lm-optiq: skipped plugin 'exits_on_import' (exits_on_import_plugin): "
        "SystemExit: I quit",
    ),
    "exits_in_mlx_lm": (
        "mlx_lm",
        "import sys\nsys.exit(3)\n",
        "mlx_lm: skipped plugin 'exits_in_mlx_lm' (exits_in_mlx_lm_plugin): "
        "SystemExit: 3",
    ),
    "interrupts_on_import": (
        "mlx_lm",
        "raise KeyboardInterrupt\n",
        "mlx_lm: skipped plugin 'interrupts_on_import' (interrupts_on_import_plugin): "
        "KeyboardInterrupt: ",
    ),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_a_broken_third_party_plugin_disables_only_itself(
    name, tmp_path, mixed_model, data_dir
):
    from conftest import entry_point_plugin

    group, source, line = BROKEN[name]
    env = {"PYTHONPATH": str(entry_point_plugin(tmp_path, name, source, group))}
    proc = lora("--help", env=env)
    assert "--rank-scaling" in proc.stdout and "--model" in proc.stdout
    assert [l for l in proc.stderr.splitlines() if name in l] == [line]
    # stock training stays stock; the plugin's own options keep working
    for extra in ([], ["--rank-scaling", "by_bits", "--rank", "4"]):
        out = tmp_path / f"a{len(extra)}"
        proc = lora(
            "--model", mixed_model, "--data", data_dir, *TRAIN_ARGS, *extra,
            "--adapter-path", out, env=env,
        )  # fmt: skip
        assert (out / "adapters.safetensors").is_file()
        assert [l for l in proc.stderr.splitlines() if name in l] == [line]
    ranks = mlx_ranks(read_safetensors_header(out / "adapters.safetensors"))
    assert sorted(set(ranks.values())) == [4, 8]


def test_a_plugin_stops_the_command_on_purpose_with_one_line(
    tmp_path, mixed_model, data_dir
):
    """An ``OptiqError`` (a ValueError) from a hook is the plugin saying no."""
    from conftest import entry_point_plugin

    source = (
        "from mlx_lm_optiq.errors import OptiqError\n"
        "from mlx_lm_optiq.hookspecs import hookimpl\n"
        "@hookimpl\ndef optiq_adapter_saved(run, adapter_dir):\n"
        "    raise OptiqError('refused by policy', adapter_dir / 'x.json')\n"
    )
    env = {"PYTHONPATH": str(entry_point_plugin(tmp_path, "refuser", source))}
    proc = lora(
        "--model", mixed_model, "--data", data_dir, *TRAIN_ARGS, "--rank-scaling",
        "by_bits", "--adapter-path", tmp_path / "a", env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "refused by policy" in proc.stderr.strip().splitlines()[-2]
    assert not (tmp_path / "a").exists()  # the run stays in its partial directory
