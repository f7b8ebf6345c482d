"""``patches/`` applied to mlx-lm 0.32.2 behave like the shim.

The end-to-end CLI tests themselves run on the patched mlx-lm too (the
``cli`` fixture of ``test_cli.py``); these add what is specific to the patches.
"""

import json
import sys

from conftest import ROOT, TRAIN_ARGS, run

from mlx_lm_optiq import mlx_lm_hookspecs

SOURCE = (
    "import sys, mlx_lm.lora, mlx_lm.tuner.utils as u; "
    "print(u.__file__); "
    "print(hasattr(mlx_lm.lora.train_model, '__optiq_original__'))"
)


def _body(text):
    """The module below its docstring: imports, hookspecs, plugin manager."""
    return text[text.index("\nimport ") :].strip()


def test_patch_hookspecs_match_the_backport():
    patch = (ROOT / "patches").glob("0002-*.patch")
    text = next(patch).read_text()
    added = "\n".join(
        line[1:]
        for line in text.split("+++ b/mlx_lm/plugins.py", 1)[1]
        .split("\ndiff --git", 1)[0]
        .splitlines()
        if line.startswith("+")
    )
    backport = open(mlx_lm_hookspecs.__file__).read()
    assert _body(added) == _body(backport)


def test_shim_stands_down_on_patched_mlx_lm(patched_python):
    out = run([patched_python, "-c", SOURCE]).stdout.split()
    assert "venv" in out[0]  # the patched copy is the one imported
    assert out[1] == "False"  # shim enabled, yet nothing wrapped


def test_upstream_unittest_of_patch_0001(patched_python):
    src = next(
        p for p in patched_python.parents[1].parent.glob("mlx_lm-*") if p.is_dir()
    )
    proc = run(
        [patched_python, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         src / "tests" / "test_finetune.py", "-k", "rank_pattern or TestLora"],
        env={"MLX_LM_OPTIQ_DISABLE": "1"},
    )  # fmt: skip
    assert " passed" in proc.stdout and "failed" not in proc.stdout


def _train(command, env, out, mixed_model, data_dir):
    run(
        [*command, "--model", mixed_model, "--data", data_dir, *TRAIN_ARGS,
         "--rank-scaling", "by_bits", "--rank", "4", "--adapter-path", out],
        env=env,
    )  # fmt: skip


def _json_without(path, *keys):
    doc = json.loads(path.read_text())
    for key in keys:
        doc.pop(key, None)
    return doc


def test_same_files_with_shim_and_patches(
    tmp_path, patched_python, mixed_model, data_dir
):
    shim, patched = tmp_path / "shim", tmp_path / "patched"
    _train([sys.executable, "-m", "mlx_lm", "lora"], {}, shim, mixed_model, data_dir)
    _train(
        [patched_python, "-m", "mlx_lm", "lora"],
        {"MLX_LM_OPTIQ_DISABLE": "1"},
        patched,
        mixed_model,
        data_dir,
    )
    assert sorted(p.name for p in shim.iterdir()) == sorted(
        p.name for p in patched.iterdir()
    )
    for name in ("adapters.safetensors", "adapter_model.safetensors"):
        assert (shim / name).read_bytes() == (patched / name).read_bytes(), name
    assert _json_without(shim / "adapter_config.json", "adapter_path") == _json_without(
        patched / "adapter_config.json", "adapter_path"
    )
    assert json.loads((shim / "optiq_lora_config.json").read_text()) == json.loads(
        (patched / "optiq_lora_config.json").read_text()
    )


def test_patched_generate_loads_mixed_ranks(
    tmp_path, patched_python, mixed_model, data_dir
):
    adapter = tmp_path / "a"
    _train([sys.executable, "-m", "mlx_lm", "lora"], {}, adapter, mixed_model, data_dir)
    args = ["-m", "mlx_lm", "generate", "--model", mixed_model, "--adapter-path", adapter,
            "--prompt", "the cat", "--max-tokens", "6", "--ignore-chat-template",
            "--verbose", "False"]  # fmt: skip
    patched = run([patched_python, *args], env={"MLX_LM_OPTIQ_DISABLE": "1"}).stdout
    # stock mlx-lm without the plugin can't; with the shim it prints the same
    stock = run([sys.executable, *args], env={"MLX_LM_OPTIQ_DISABLE": "1"}, check=False)
    assert (
        stock.returncode != 0 and "does not match model parameter shape" in stock.stderr
    )
    assert patched == run([sys.executable, *args]).stdout
