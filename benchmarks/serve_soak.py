"""A bounded soak of ``mlx_lm_optiq.serve``: mixed traffic for minutes.

Starts the real server on loopback with some resident adapters and
``--adapter-dir``, then for ``--seconds``: ``--clients`` threads send
completions, chat completions and streams for the base model and every
adapter (greedy, so each answer has one right text), while another thread
loads and unloads adapters (``POST``/``DELETE``, the same names with other
weights too). Every answer is compared with the reference computed for the
weights that were resident under that name: a mismatch is contamination.
Reports requests, errors, contamination, p50/p99 latency, and the server's
resident memory at the start and end (growth per load/unload cycle).

    python benchmarks/serve_soak.py --model SMOLLM2 [--seconds 180] [--clients 8]

Not a test (it takes minutes); writes ``benchmarks/results/serve_soak.json``.
"""

import argparse
import json
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import environment, print_table, write_result  # noqa: E402
from serve_switch import make_adapters  # noqa: E402

PROMPTS = ["the cat sees a big red", "Question: what is two plus two?\nAnswer:"]
TOKENS = 12


def http(port, method, path, body=None, timeout=120, stream=False):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, method=method,
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def answer(kind, status, text):
    """The generated text of a completion, chat or stream reply."""
    if status != 200:
        return None
    if kind == "stream":
        parts = []
        for line in text.splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[6:])["choices"]
                if choice:
                    parts.append(
                        choice[0].get("text")
                        or choice[0].get("delta", {}).get("content")
                        or ""
                    )
        return "".join(parts)
    choice = json.loads(text)["choices"][0]
    return choice["text"] if kind == "completion" else choice["message"]["content"]


def references(model_dir, adapters):
    """``{(adapter path or None, kind, prompt): text}`` computed directly."""
    import mlx_lm

    out = {}
    for path in [None, *adapters]:
        model, tok = mlx_lm.load(
            str(model_dir), adapter_path=str(path) if path else None
        )
        for prompt in PROMPTS:
            chat = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                           add_generation_prompt=True)  # fmt: skip
            plain = mlx_lm.generate(model, tok, prompt, max_tokens=TOKENS)
            out[(path, "completion", prompt)] = out[(path, "stream", prompt)] = plain
            out[(path, "chat", prompt)] = mlx_lm.generate(
                model, tok, chat, max_tokens=TOKENS
            )
    return out


def growth(samples):
    """Least-squares MiB per cycle of ``[(cycles, MiB)]``."""
    if len(samples) < 2 or samples[-1][0] == samples[0][0]:
        return None
    xs, ys = zip(*samples)
    mx_, my = statistics.mean(xs), statistics.mean(ys)
    return sum((x - mx_) * (y - my) for x, y in samples) / sum(
        (x - mx_) ** 2 for x in xs
    )


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--no-churn", action="store_true",
                        help="no load/unload: what the server grows by on its own")  # fmt: skip
    parser.add_argument("--out", default=str(HERE / "results" / "serve_soak.json"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp())
    paths = make_adapters(args.model, work, args.adapters, rank=4)
    resident, swapped = paths[:2], paths[2:]  # swapped: POSTed and DELETEd
    refs = references(args.model, paths)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "mlx_lm_optiq.serve", "--model", args.model,
         *[f"--adapter=r{i}={p}" for i, p in enumerate(resident)],
         "--adapter-dir", str(work), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    while True:
        try:
            if http(port, "GET", "/health", timeout=5)[0] == 200:
                break
        except OSError:
            time.sleep(0.5)
    weights = {f"r{i}": p for i, p in enumerate(resident)}  # name -> path resident now
    lock = threading.Lock()
    stats = {"requests": 0, "errors": 0, "contaminated": 0, "unknown": 0, "cycles": 0}
    latencies, errors = [], []
    for name in weights:  # warm the layers and kernels before measuring memory
        http(
            port,
            "POST",
            "/v1/completions",
            {"prompt": "x", "max_tokens": 2, "adapter": name},
        )
    start_mib = rss_mib(server.pid)
    deadline = time.monotonic() + args.seconds

    def client(seed):
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            with lock:
                name = rng.choice([None, *weights])
                path = weights.get(name)
            kind, prompt = rng.choice(["completion", "chat", "stream"]), rng.choice(
                PROMPTS
            )
            body = {
                "max_tokens": TOKENS,
                "temperature": 0.0,
                "stream": kind == "stream",
            }
            body.update({"messages": [{"role": "user", "content": prompt}]} if kind == "chat"
                        else {"prompt": prompt})  # fmt: skip
            if name:
                body["adapter"] = name
            with lock:
                cycles = stats["cycles"]
            tic = time.monotonic()
            status, text = http(port, "POST", "/v1/chat/completions" if kind == "chat"
                                else "/v1/completions", body)  # fmt: skip
            took = time.monotonic() - tic
            got = answer(kind, status, text)
            with lock:
                stats["requests"] += 1
                latencies.append(took)
                after = weights.get(name) if name else None
                # the name's weights when the request was sent, or when it came back
                right = {
                    refs[(p, kind, prompt)] for p in {path, after} if p or not name
                }
                churned = stats["cycles"] != cycles and name in ("s0", "s1")
                if got is None:
                    if after == path and not churned:  # else unloaded meanwhile
                        stats["errors"] += 1
                        errors.append(f"{status} {text[:120]}")
                    else:
                        stats["unknown"] += 1
                elif got not in right:
                    stats["contaminated"] += 1

    def churn():
        rng = random.Random(0)
        while time.monotonic() < deadline:
            name = rng.choice(["s0", "s1"])
            path = rng.choice(swapped)
            status, _ = http(
                port, "POST", "/v1/adapters", {"name": name, "path": str(path)}
            )
            if status == 201:
                with lock:
                    weights[name] = path
            time.sleep(0.5)
            with lock:
                weights.pop(name, None)
            http(port, "DELETE", f"/v1/adapters/{name}")
            with lock:
                stats["cycles"] += 1

    samples = []  # (cycles, resident MiB)

    def sample():
        while time.monotonic() < deadline:
            with lock:
                samples.append((stats["cycles"], rss_mib(server.pid)))
            time.sleep(2)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    threads += [threading.Thread(target=sample)]
    if not args.no_churn:
        threads.append(threading.Thread(target=churn))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    end_mib = rss_mib(server.pid)
    server.terminate()
    server.wait(timeout=30)
    shutil.rmtree(work, ignore_errors=True)
    latencies.sort()
    result = {
        **stats,
        "p50_seconds": statistics.median(latencies),
        "p99_seconds": latencies[int(0.99 * (len(latencies) - 1))],
        "rss_start_mib": start_mib,
        "rss_end_mib": end_mib,
        "rss_growth_per_cycle_mib": (end_mib - start_mib) / max(stats["cycles"], 1),
        # after warm-up (the second half): what a long-running server would see
        "rss_growth_per_cycle_second_half_mib": growth(samples[len(samples) // 2 :]),
        "rss_samples": samples,
        "error_samples": errors[:5],
    }
    print_table(["measure", "value"], [(k, f"{v:.3f}" if isinstance(v, float) else v)
                                       for k, v in result.items() if k not in ("error_samples", "rss_samples")])  # fmt: skip
    write_result(args.out, {
        "benchmark": "serve_soak", "command": " ".join(sys.argv),
        "environment": environment(), "settings": vars(args), "result": result,
    })  # fmt: skip


if __name__ == "__main__":
    main()
