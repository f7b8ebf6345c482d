"""Hot-swap serving, driven with the real ``openai`` client on a loopback port."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import mlx_lm
import numpy as np
import openai
import pytest
from conftest import TRAIN_ARGS, lora
from mlx.utils import tree_flatten

from mlx_lm_optiq.errors import OptiqError

PROMPT = "the cat sees a big red"
MESSAGES = [{"role": "user", "content": "two dogs and a bird"}]
MAX_TOKENS = 8


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scaled_copy(src, dst, factor):
    """The same adapter with ``lora_b`` scaled: a different function, same ranks."""
    dst.mkdir()
    weights = mx.load(str(src / "adapters.safetensors"))
    weights = {k: v * factor if k.endswith("lora_b") else v for k, v in weights.items()}
    mx.save_safetensors(str(dst / "adapters.safetensors"), weights)
    (dst / "adapter_config.json").write_bytes(
        (src / "adapter_config.json").read_bytes()
    )
    return dst


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """What the server may load at runtime (``--adapter-dir``)."""
    return tmp_path_factory.mktemp("allowed")


@pytest.fixture(scope="module")
def adapters(adapter_dir, mixed_model, data_dir):
    """Two adapters of different ranks whose greedy outputs differ."""
    a = adapter_dir / "a"
    lora(
        "--model", mixed_model, "--data", data_dir, *TRAIN_ARGS, "--learning-rate", "3e-2",
        "--rank-scaling", "by_bits", "--rank", "4", "--adapter-path", a,
    )  # fmt: skip
    b = _scaled_copy(a, adapter_dir / "b", -3.0)
    return {"a": a, "b": b}


def expected_outputs(model_path, adapters):
    out = {}
    for name, path in [(None, None), *adapters.items()]:
        model, tok = mlx_lm.load(
            str(model_path), adapter_path=str(path) if path else None
        )
        chat = tok.apply_chat_template(MESSAGES, add_generation_prompt=True)
        out[name] = (
            mlx_lm.generate(model, tok, PROMPT, max_tokens=MAX_TOKENS),
            mlx_lm.generate(model, tok, chat, max_tokens=MAX_TOKENS),
        )
    return out


def start_server(mixed_model, adapters, *extra):
    port = _port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_lm_optiq.serve",
         *(["--model", str(mixed_model)] if mixed_model else []),
         *[f"--adapter={n}={p}" for n, p in adapters.items()],
         "--host", "127.0.0.1", "--port", str(port), *map(str, extra)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=60
    )
    deadline = time.monotonic() + 60
    while not _http(port, "GET", "/health").startswith("{"):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "server did not start in 60 s"
        time.sleep(0.3)
    return proc, client, port


@pytest.fixture(scope="module")
def server(mixed_model, adapters, adapter_dir):
    proc, client, port = start_server(
        mixed_model, adapters, "--adapter-dir", adapter_dir, "--max-adapters", "4"
    )
    yield client, port
    proc.terminate()
    proc.wait(timeout=30)


def complete(client, adapter):
    extra = {"adapter": adapter} if adapter else {}
    reply = client.completions.create(
        model="default_model", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0.0,
        extra_body=extra,
    )  # fmt: skip
    return reply.choices[0].text


def chat(client, adapter):
    extra = {"adapter": adapter} if adapter else {}
    reply = client.chat.completions.create(
        model="default_model", messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0.0,
        extra_body=extra,
    )  # fmt: skip
    return reply.choices[0].message.content


def test_each_adapter_answers_like_direct_generate(server, mixed_model, adapters):
    client, _ = server
    expected = expected_outputs(mixed_model, adapters)
    assert len({v[0] for v in expected.values()}) == 3, "the adapters must differ"
    for name in (None, "a", "b", "a", None):
        assert complete(client, name) == expected[name][0], name
        assert chat(client, name) == expected[name][1], name


def test_interleaved_concurrent_requests(server, mixed_model, adapters):
    client, _ = server
    expected = expected_outputs(mixed_model, adapters)
    names = [None, "a", "b"] * 4
    with ThreadPoolExecutor(max_workers=6) as pool:
        texts = list(pool.map(lambda n: complete(client, n), names))
        chats = list(pool.map(lambda n: chat(client, n), names))
    assert texts == [expected[n][0] for n in names]
    assert chats == [expected[n][1] for n in names]


def test_adapter_list_and_unknown_name(server):
    client, port = server
    listed = json.loads(_http(port, "GET", "/v1/adapters"))
    assert [a["id"] for a in listed["data"]] == ["a", "b"]
    assert listed["data"][0]["rank_distribution"] == {"4": 10, "8": 4}
    with pytest.raises(openai.BadRequestError) as e:
        complete(client, "nope")
    assert "unknown adapter 'nope'; known adapters: a, b" in e.value.response.text


def _http(port, method, path, body=None, headers=None, raw=None):
    import urllib.error
    import urllib.request

    data = (
        raw
        if raw is not None
        else json.dumps(body).encode() if body is not None else None
    )
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, method=method
    )
    request.add_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        request.add_header(k, v)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read().decode()
    except urllib.error.HTTPError as e:
        return f"{e.code} {e.read().decode()}"
    except (ConnectionError, urllib.error.URLError) as e:
        return f"unreachable {e}"


def test_load_and_unload_at_runtime(server, adapters, adapter_dir, mixed_model):
    client, port = server
    c = _scaled_copy(adapters["a"], adapter_dir / "c", 2.0)
    bad = adapter_dir / "bad"
    bad.mkdir()
    (bad / "adapters.safetensors").write_bytes(b"garbage!")
    (bad / "adapter_config.json").write_text("{}")
    reply = _http(port, "POST", "/v1/adapters", {"name": "broken", "path": str(bad)})
    assert reply.startswith("400") and "adapters.safetensors" in reply
    reply = _http(
        port,
        "POST",
        "/v1/adapters",
        {"name": "c", "path": str(adapter_dir / "missing")},
    )
    assert reply.startswith("400")
    assert complete(client, "a")  # still serving

    created = json.loads(
        _http(port, "POST", "/v1/adapters", {"name": "c", "path": str(c)})
    )
    assert created["id"] == "c" and created["modules"] == 14
    model, tok = mlx_lm.load(str(mixed_model), adapter_path=str(c))
    assert complete(client, "c") == mlx_lm.generate(
        model, tok, PROMPT, max_tokens=MAX_TOKENS
    )
    assert _http(port, "DELETE", "/v1/adapters/c") == '{"deleted": "c"}'
    with pytest.raises(openai.BadRequestError):
        complete(client, "c")
    assert _http(port, "DELETE", "/v1/adapters/c").startswith("404")


def test_registry_swaps_layers_without_copying_weights(mixed_model, adapters):
    from mlx_lm_optiq.registry import AdapterRegistry

    registry = AdapterRegistry()
    for name, path in adapters.items():
        registry.add(name, path)
    model, _ = mlx_lm.load(str(mixed_model))
    base = dict(tree_flatten(model.parameters()))
    registry.attach(model)
    registry.activate(model, registry.key("a"))
    params = dict(tree_flatten(model.parameters()))
    q = "model.layers.3.self_attn.q_proj"
    assert params[f"{q}.linear.weight"] is base[f"{q}.weight"] or mx.array_equal(
        params[f"{q}.linear.weight"], base[f"{q}.weight"]
    )
    registry.activate(model, None)
    assert set(dict(tree_flatten(model.parameters()))) == set(base)


# -- Serving you can leave running (each item of the hardening issue) --------


def _post(port, name, path, **kw):
    return _http(port, "POST", "/v1/adapters", {"name": name, "path": str(path)}, **kw)


def _expected_text(model_path, adapter):
    model, tok = mlx_lm.load(str(model_path), adapter_path=str(adapter))
    return mlx_lm.generate(model, tok, PROMPT, max_tokens=MAX_TOKENS)


def test_unload_then_load_the_same_name_serves_the_new_weights(
    server, adapters, adapter_dir, mixed_model
):
    client, port = server
    first = _scaled_copy(adapters["a"], adapter_dir / "same1", 2.0)
    second = _scaled_copy(adapters["a"], adapter_dir / "same2", -2.0)
    assert _post(port, "same", first).startswith("{")
    assert complete(client, "same") == _expected_text(mixed_model, first)
    assert _http(port, "DELETE", "/v1/adapters/same") == '{"deleted": "same"}'
    assert _post(port, "same", second).startswith("{")
    want = _expected_text(mixed_model, second)
    assert want != _expected_text(mixed_model, first)
    assert complete(client, "same") == want
    assert _http(port, "DELETE", "/v1/adapters/same") == '{"deleted": "same"}'


def test_load_unload_cycles_leave_nothing_behind(mixed_model, adapters):
    from mlx_lm_optiq.registry import AdapterRegistry

    registry = AdapterRegistry()
    model, _ = mlx_lm.load(str(mixed_model))
    registry.attach(model)
    for i in range(12):
        registry.add(f"n{i}", adapters["a"])
        registry.activate(model, registry.key(f"n{i}"))
        registry.activate(model, None)
        assert registry.remove(f"n{i}")
    assert registry.names() == [] and registry._layers == {}
    # removed while active: its layers go at the next switch
    registry.add("x", adapters["b"])
    registry.activate(model, registry.key("x"))
    registry.remove("x")
    registry.activate(model, None)
    assert registry._layers == {}
    kinds = {type(m).__name__ for _, m in model.named_modules()}
    assert "LoRALinear" not in kinds


def _bad_adapter(adapter_dir, name, config=None, tensors=None, source=None):
    """A copy of ``source`` with its config or tensors replaced."""
    out = adapter_dir / name
    shutil.copytree(source, out)
    (out / "adapter_model.safetensors").unlink(missing_ok=True)
    (out / "optiq_lora_config.json").unlink(missing_ok=True)
    if config is not None:
        doc = json.loads((out / "adapter_config.json").read_text())
        (out / "adapter_config.json").write_text(json.dumps(config(doc)))
    if tensors is not None:
        weights = mx.load(str(out / "adapters.safetensors"))
        mx.save_safetensors(str(out / "adapters.safetensors"), tensors(weights))
    return out


def _with_scale(value):
    def change(doc):
        doc["lora_parameters"]["scale"] = value
        return doc

    return change


def _first_a(change):
    def tensors(weights):
        name = next(k for k in weights if k.endswith("lora_a"))
        weights[name] = change(weights[name])
        return weights

    return tensors


INVALID = {
    "scale_string": dict(config=_with_scale("20"), problem="scale must be a finite number"),
    "scale_list": dict(config=_with_scale([20]), problem="scale must be a finite number"),
    "scale_huge": dict(config=_with_scale(1e300), problem="scale must be a finite number"),
    "ranks_disagree": dict(tensors=_first_a(lambda a: a[:, :2]), problem="disagree"),
    "three_d": dict(tensors=_first_a(lambda a: a[None]), problem="must be matrices"),
    "one_d": dict(tensors=_first_a(lambda a: a[:, 0]), problem="must be matrices"),
    "lora_parameters_list": dict(config=lambda d: {**d, "lora_parameters": []},
                                 problem="'lora_parameters' must be an object"),
    "deep_json": dict(config=lambda d: [[[[]]]], problem="expected a JSON object"),
    "nan": dict(tensors=_first_a(lambda a: a * float("nan")), problem="hold NaN or inf"),
    "extra_tensor": dict(tensors=lambda w: {**w, "model.layers.3.mlp.up_proj.m": mx.ones(8)},
                         problem="model.layers.3.mlp.up_proj.m is not a LoRA tensor"),
    "too_wide": dict(tensors=lambda w: {**w,
                     "model.layers.3.self_attn.q_proj.lora_a": mx.zeros((64, 80)),
                     "model.layers.3.self_attn.q_proj.lora_b": mx.zeros((80, 64))},
                     problem="has rank 80, wider than its 64->64 layer"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(INVALID))
def test_an_invalid_adapter_is_a_400_and_the_others_keep_serving(
    server, adapters, adapter_dir, mixed_model, case
):
    client, port = server
    spec = dict(INVALID[case])
    problem = spec.pop("problem")
    bad = _bad_adapter(adapter_dir, f"bad_{case}", source=adapters["a"], **spec)
    if case == "deep_json":
        (bad / "adapter_config.json").write_text("[" * 100000 + "]" * 100000)
        problem = "nested too deeply"
    reply = _post(port, case, bad)
    assert reply.startswith("400") and problem in reply, reply
    assert json.loads(_http(port, "GET", "/v1/adapters"))["data"]  # listing works
    assert [
        a["id"] for a in json.loads(_http(port, "GET", "/v1/adapters"))["data"]
    ] == ["a", "b"]
    assert _http(port, "GET", "/health").startswith("{")
    expected = expected_outputs(mixed_model, adapters)
    for name in ("a", None, "b"):
        assert complete(client, name) == expected[name][0]


def test_bad_request_bodies_are_answered_not_dropped(server):
    client, port = server
    for body in ([1, 2], {"name": 3, "path": "a"}, {"name": "a"}, "x"):
        reply = _http(port, "POST", "/v1/adapters", body)
        assert reply == '400 {"error": "expected {\\"name\\": ..., \\"path\\": ...}"}'

    assert _http(port, "POST", "/v1/adapters", raw=b"{not json").startswith("400")
    reply = _post(port, "x\n", "a")
    assert reply.startswith("400") and "adapter name" in reply
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="default_model", prompt=PROMPT, max_tokens=2,
                                  extra_body={"adapter": ["a"]})  # fmt: skip
    assert "'adapter' must be the name of an adapter" in e.value.response.text
    assert _http(port, "GET", "/health").startswith("{")


def test_a_request_for_another_model_is_refused_while_adapters_are_resident(
    server, adapters, mixed_model, models
):
    import tiny_model

    client, port = server
    other = tiny_model.build_model(models / "llama-other-served", seed=7)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=str(other), prompt=PROMPT, max_tokens=2)
    assert "keeps adapters resident on" in e.value.response.text
    assert [
        a["id"] for a in json.loads(_http(port, "GET", "/v1/adapters"))["data"]
    ] == ["a", "b"]
    expected = expected_outputs(mixed_model, adapters)
    assert complete(client, "a") == expected["a"][0]


def test_unbounded_or_blocking_files_are_refused_quickly(server, adapters, adapter_dir):
    _, port = server
    huge = _bad_adapter(adapter_dir, "huge_header", source=adapters["a"])
    (huge / "adapters.safetensors").write_bytes(
        (2**31).to_bytes(8, "little") + b'{"a":' + b" " * 1000
    )
    zero = _bad_adapter(adapter_dir, "dev_zero", source=adapters["a"])
    (zero / "adapter_config.json").unlink()
    (zero / "adapter_config.json").symlink_to("/dev/zero")
    fifo = _bad_adapter(adapter_dir, "fifo", source=adapters["a"])
    (fifo / "adapters.safetensors").unlink()
    os.mkfifo(fifo / "adapters.safetensors")
    for name, path, problem in [
        ("huge", huge, "400 {\"error\": \"huge_header/adapters.safetensors: truncated or not a safetensors file"),
        # a link to a file outside --adapter-dir is refused before it is read
        ("zero", zero, "403 {\"error\": \"adapters load only from the server's --adapter-dir"),
        ("fifo", fifo, "400 {\"error\": \"fifo/adapters.safetensors: not a regular file"),
    ]:  # fmt: skip
        tic = time.monotonic()
        reply = _post(port, name, path)
        assert reply.startswith(problem), reply
        assert time.monotonic() - tic < 5
    # a device file itself is refused by the readers, however it is reached
    from mlx_lm_optiq.adapter_read import read_json
    from mlx_lm_optiq.errors import OptiqError

    with pytest.raises(OptiqError, match="/dev/zero: not a regular file"):
        read_json("/dev/zero")
    assert _http(port, "GET", "/health").startswith("{")


def test_a_hostile_peft_pattern_neither_freezes_load_nor_the_server(
    server, adapters, adapter_dir, mixed_model
):
    """``re`` takes minutes on this key; the guard answers at once."""
    from mlx_lm_optiq.export import main as export

    _, port = server
    peft = adapter_dir / "hostile"
    assert export([str(adapters["a"]), "--peft", str(peft)]) == 0
    config = json.loads((peft / "adapter_config.json").read_text())
    config["rank_pattern"] = {r"((\w|\.)+)+!": 99, **config["rank_pattern"]}
    (peft / "adapter_config.json").write_text(json.dumps(config))
    tic = time.monotonic()
    model, _ = mlx_lm.load(str(mixed_model), adapter_path=str(peft))
    assert time.monotonic() - tic < 10
    assert _post(port, "hostile", peft).startswith("{")
    assert _http(port, "DELETE", "/v1/adapters/hostile").startswith("{")
    config["rank_pattern"] = {"(": 4}
    (peft / "adapter_config.json").write_text(json.dumps(config))
    reply = _post(port, "broken_regex", peft)
    assert reply.startswith("400") and "is not a regex" in reply


def test_runtime_loading_only_inside_the_adapter_dir(server, adapters, tmp_path):
    _, port = server
    outside = _scaled_copy(adapters["a"], tmp_path / "outside", 2.0)
    link = adapters["a"].parent / "link_out"
    link.symlink_to(outside)
    replies = [
        _post(port, "o1", outside),
        _post(port, "o2", tmp_path / "does-not-exist"),
        _post(port, "o3", "../" * 12 + "etc"),
        _post(port, "o4", link),
    ]
    assert len(set(replies)) == 1  # the same answer: nothing about the files
    assert replies[0] == (
        '403 {"error": "adapters load only from the server\'s --adapter-dir"}'
    )
    # a web page (CORS "*" by default) may not load or unload
    reply = _post(port, "web", adapters["a"], headers={"Origin": "http://evil.example"})
    assert reply.startswith("403") and "cross-origin" in reply
    reply = _http(port, "DELETE", "/v1/adapters/a", headers={"Origin": "http://x.y"})
    assert reply.startswith("403")
    assert [
        a["id"] for a in json.loads(_http(port, "GET", "/v1/adapters"))["data"]
    ] == ["a", "b"]


def test_the_residency_cap(server, adapters, adapter_dir):
    _, port = server
    names = ["cap1", "cap2"]
    for name in names:  # a, b and these two: --max-adapters 4
        assert _post(port, name, adapters["a"]).startswith("{")
    reply = _post(port, "cap3", adapters["a"])
    assert reply.startswith("409") and "--max-adapters cap; DELETE one first" in reply
    for name in names:
        assert _http(port, "DELETE", f"/v1/adapters/{name}").startswith("{")
    assert _post(port, "cap3", adapters["a"]).startswith("{")
    assert _http(port, "DELETE", "/v1/adapters/cap3").startswith("{")


def test_without_adapter_dir_runtime_loading_is_off(mixed_model, adapters):
    proc, client, port = start_server(mixed_model, adapters)
    try:
        for reply in (_post(port, "c", adapters["a"]),
                      _http(port, "DELETE", "/v1/adapters/a")):  # fmt: skip
            assert reply == (
                '403 {"error": "runtime loading is off: start the server with '
                '--adapter-dir DIR to POST and DELETE adapters found under DIR"}'
            )
        # adapters given at start always serve
        expected = expected_outputs(mixed_model, adapters)
        assert complete(client, "b") == expected["b"][0]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_failed_switch_leaves_the_previous_adapter_active(mixed_model, adapters):
    """Whatever makes building the next adapter's layers fail, the model
    keeps serving what it served."""
    from mlx_lm_optiq import lora_layers
    from mlx_lm_optiq.registry import AdapterRegistry

    registry = AdapterRegistry()
    model, tok = mlx_lm.load(str(mixed_model))
    registry.attach(model)
    registry.add("a", adapters["a"])
    registry.add("b", adapters["b"])
    registry.activate(model, registry.key("a"))
    before = np.array(model(mx.array([tok.encode(PROMPT)]))[0])
    real, lora_layers.lora_layers = lora_layers.lora_layers, None  # a fault, injected
    try:
        with pytest.raises(TypeError):
            registry.activate(model, registry.key("b"))
    finally:
        lora_layers.lora_layers = real
    after = np.array(model(mx.array([tok.encode(PROMPT)]))[0])
    assert np.array_equal(before, after) and registry._active == registry.key("a")


def _rss_mib():
    with open(f"/proc/{os.getpid()}/status") as f:
        return next(int(l.split()[1]) / 1024 for l in f if l.startswith("VmRSS"))


def test_switching_adapters_does_not_grow_memory(mixed_model, adapters):
    """Each switch used to leave ~4 KB per layer behind (a lazy chain on MLX's
    random key: 200 switches of 14 layers, ~11 MB)."""
    from mlx_lm_optiq.registry import AdapterRegistry

    registry = AdapterRegistry()
    model, _ = mlx_lm.load(str(mixed_model))
    registry.attach(model)
    registry.add("a", adapters["a"])

    def cycles(n):
        for _ in range(n):
            registry.activate(model, registry.key("a"))
            registry.activate(model, None)
            registry._layers.clear()  # rebuilt on every switch, as after unloads

    cycles(20)  # warm up the allocator
    before = _rss_mib()
    cycles(200)
    assert _rss_mib() - before < 2.0


def test_loading_on_request_threads_does_not_grow_memory(adapters):
    """The server loads every POSTed adapter on a thread of its own; MLX keeps
    ~14 KB per thread that ever evaluated (300 loads: ~4 MB)."""
    import threading

    from mlx_lm_optiq.registry import AdapterRegistry

    registry = AdapterRegistry()

    def cycle():
        registry.add("a", adapters["a"])
        registry.remove("a")

    def on_new_threads(n):
        for _ in range(n):
            thread = threading.Thread(target=cycle)
            thread.start()
            thread.join()

    on_new_threads(20)
    before = _rss_mib()
    on_new_threads(300)
    assert _rss_mib() - before < 1.5


def _float64_copy(source, out):
    """``source`` with its LoRA tensors in float64 (MLX can't write those)."""
    import numpy
    from safetensors.numpy import load_file, save_file

    shutil.copytree(source, out)
    (out / "adapter_model.safetensors").unlink(missing_ok=True)
    weights = load_file(str(out / "adapters.safetensors"))
    save_file({k: v.astype(numpy.float64) for k, v in weights.items()},
              str(out / "adapters.safetensors"))  # fmt: skip
    return out


def test_float64_adapters_are_refused_naming_the_file(
    server, adapters, adapter_dir, mixed_model
):
    _, port = server
    f64 = _float64_copy(adapters["a"], adapter_dir / "f64")
    reply = _post(port, "f64", f64)
    assert reply.startswith('400 {"error": "f64/adapters.safetensors: model.layers.')
    assert "tensors must be float32, float16 or bfloat16, got F64" in reply
    # given at start: one line and exit 1, not a traceback
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_lm_optiq.serve", "--model", str(mixed_model),
         f"--adapter=f64={f64}", "--port", str(_port())],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(
        f"error: --adapter f64={f64}: {f64 / 'adapters.safetensors'}"
    )


def test_a_link_to_a_file_outside_the_adapter_dir_is_refused(
    server, adapters, adapter_dir, tmp_path
):
    _, port = server
    outside = _scaled_copy(adapters["a"], tmp_path / "elsewhere", 2.0)
    inside = adapter_dir / "linked_file"
    inside.mkdir()
    (inside / "adapter_config.json").write_bytes(
        (adapters["a"] / "adapter_config.json").read_bytes()
    )
    (inside / "adapters.safetensors").symlink_to(outside / "adapters.safetensors")
    reply = _post(port, "linked", inside)
    assert (
        reply == '403 {"error": "adapters load only from the server\'s --adapter-dir"}'
    )
    (inside / "adapters.safetensors").unlink()
    (inside / "adapters.safetensors").symlink_to(tmp_path / "missing.safetensors")
    assert _post(port, "linked", inside) == reply  # a missing target: the same


def _raw(port, head, body=b""):
    """Send a raw HTTP request; the status line back."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head + body)
        chunks = []
        while chunk := s.recv(4096):  # the server closes the connection
            chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")


def test_every_request_body_is_bounded_and_draft_models_are_the_servers(
    server, adapters
):
    client, port = server
    huge = 9 * 1024 * 1024
    tic = time.monotonic()
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
        b"\r\nContent-Length: " + str(huge).encode() + b"\r\n\r\n"
    )
    reply = _raw(port, head, b"{")  # the rest never sent: the answer comes anyway
    assert reply.startswith("HTTP/1.0 413") and "request body too large" in reply
    assert time.monotonic() - tic < 5
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(
            model="default_model", prompt=PROMPT, max_tokens=2,
            extra_body={"draft_model": str(adapters["a"])},
        )  # fmt: skip
    assert "may not load another model" in e.value.response.text
    assert complete(client, "a")  # still serving


def test_the_listing_is_for_this_machine_not_for_web_pages(server):
    _, port = server
    import urllib.request

    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/adapters",
        headers={"Origin": "http://evil.example"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.headers.get("Access-Control-Allow-Origin") is None
        listed = json.loads(response.read())
    assert [a["source"] for a in listed["data"]] == ["--adapter", "--adapter"]
    assert not any("path" in a for a in listed["data"])


def test_adapters_given_at_start_are_always_served(server):
    client, port = server
    reply = _http(port, "DELETE", "/v1/adapters/a")
    assert reply == (
        '409 {"error": "adapter \'a\' was given with --adapter at start: it is served '
        'as long as the server runs"}'
    )
    assert complete(client, "a")


def test_peft_configs_are_checked_and_keys_without_the_prefix_load(
    server, adapters, adapter_dir, mixed_model
):
    from mlx_lm_optiq.export import main as export

    _, port = server
    peft = adapter_dir / "peft_r"
    assert export([str(adapters["a"]), "--peft", str(peft)]) == 0
    config = json.loads((peft / "adapter_config.json").read_text())
    (peft / "adapter_config.json").write_text(json.dumps({**config, "r": "4"}))
    reply = _post(port, "r_string", peft)
    assert reply.startswith("400") and "r must be a whole number >= 1, got '4'" in reply
    (peft / "adapter_config.json").write_text(json.dumps(config))
    weights = mx.load(str(peft / "adapter_model.safetensors"))
    bare = {k.removeprefix("base_model.model."): v for k, v in weights.items()}
    mx.save_safetensors(str(peft / "adapter_model.safetensors"), bare, {"format": "pt"})
    assert _post(port, "bare", peft).startswith("{")
    client = server[0]
    assert complete(client, "bare") == complete(client, "a")
    assert _http(port, "DELETE", "/v1/adapters/bare").startswith("{")


def test_patterns_that_are_slow_together_are_cut_off(adapters, mixed_model, tmp_path):
    """Each key takes ~0.02-0.05 s, under the per-key limit; 200 of them on 14
    modules would take minutes: the config gets 2 s for all of them."""
    from mlx_lm_optiq.export import main as export

    peft = tmp_path / "slow"
    assert export([str(adapters["a"]), "--peft", str(peft)]) == 0
    config = json.loads((peft / "adapter_config.json").read_text())
    slow = (
        "(?P<a>.*)(?P<b>.*)(?P<c>.*)(?P<d>.*)(?P<e>.*)(?P=e)(?P=d)(?P=c)(?P=b)(?P=a)j"
    )
    config["rank_pattern"] = {
        **{f"{slow}(?#{i})": 4 for i in range(200)},
        **config["rank_pattern"],
    }
    (peft / "adapter_config.json").write_text(json.dumps(config))
    tic = time.monotonic()
    with pytest.raises(OptiqError, match="patterns take over 2 s to match"):
        mlx_lm.load(str(mixed_model), adapter_path=str(peft))
    assert time.monotonic() - tic < 10


def test_without_model_the_first_adapters_record_names_the_base(mixed_model, adapters):
    proc, client, _ = start_server(None, adapters)
    try:
        assert complete(client, "a") == expected_outputs(mixed_model, adapters)["a"][0]
    finally:
        proc.terminate()
        log, _ = proc.communicate(timeout=30)
    assert f"serving base model {mixed_model} (from adapter a's record)" in log


def test_per_module_scales_serve_as_they_load(mixed_model, data_dir, tmp_path):
    """An adapter trained with --lora-scale per-rank answers over the server
    as mlx_lm.load builds it."""
    from conftest import TRAIN_ARGS, lora

    adapter = tmp_path / "scaled"
    lora(
        "--model", mixed_model, "--data", data_dir, *TRAIN_ARGS, "--learning-rate", "1e-2",
        "--rank-scaling", "by_bits", "--rank", "4", "--lora-scale", "per-rank",
        "--adapter-path", adapter,
    )  # fmt: skip
    expected = expected_outputs(mixed_model, {"s": adapter})
    assert expected["s"][0] != expected[None][0]
    proc, client, _ = start_server(mixed_model, {"s": adapter})
    try:
        assert complete(client, "s") == expected["s"][0]
        assert chat(client, "s") == expected["s"][1]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
