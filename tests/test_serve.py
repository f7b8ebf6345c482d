"""Hot-swap serving, driven with the real ``openai`` client on a loopback port."""

import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import mlx_lm
import openai
import pytest
from conftest import TRAIN_ARGS, lora
from mlx.utils import tree_flatten

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
def adapters(tmp_path_factory, mixed_model, data_dir):
    """Two adapters of different ranks whose greedy outputs differ."""
    root = tmp_path_factory.mktemp("serve")
    a = root / "a"
    lora(
        "--model", mixed_model, "--data", data_dir, *TRAIN_ARGS, "--learning-rate", "3e-2",
        "--rank-scaling", "by_bits", "--rank", "4", "--adapter-path", a,
    )  # fmt: skip
    b = _scaled_copy(a, root / "b", -3.0)
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


@pytest.fixture(scope="module")
def server(mixed_model, adapters):
    port = _port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_lm_optiq.serve", "--model", str(mixed_model),
         "--adapter", f"a={adapters['a']}", "--adapter", f"b={adapters['b']}",
         "--host", "127.0.0.1", "--port", str(port)],
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


def _http(port, method, path, body=None):
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, method=method
    )
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read().decode()
    except urllib.error.HTTPError as e:
        return f"{e.code} {e.read().decode()}"
    except (ConnectionError, urllib.error.URLError) as e:
        return f"unreachable {e}"


def test_load_and_unload_at_runtime(server, adapters, tmp_path, mixed_model):
    client, port = server
    c = _scaled_copy(adapters["a"], tmp_path / "c", 2.0)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapters.safetensors").write_bytes(b"garbage!")
    (bad / "adapter_config.json").write_text("{}")
    reply = _http(port, "POST", "/v1/adapters", {"name": "broken", "path": str(bad)})
    assert reply.startswith("400") and "adapters.safetensors" in reply
    reply = _http(
        port, "POST", "/v1/adapters", {"name": "c", "path": str(tmp_path / "missing")}
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
    from mlx_lm_optiq.serve import AdapterRegistry

    registry = AdapterRegistry()
    for name, path in adapters.items():
        registry.add(name, path)
    model, _ = mlx_lm.load(str(mixed_model))
    base = dict(tree_flatten(model.parameters()))
    registry.attach(model)
    registry.activate(model, "a")
    params = dict(tree_flatten(model.parameters()))
    q = "model.layers.3.self_attn.q_proj"
    assert params[f"{q}.linear.weight"] is base[f"{q}.weight"] or mx.array_equal(
        params[f"{q}.linear.weight"], base[f"{q}.weight"]
    )
    registry.activate(model, None)
    assert set(dict(tree_flatten(model.parameters()))) == set(base)
