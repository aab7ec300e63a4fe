"""Serving latency: the real HTTP server on loopback against the bare in-process forward, same inputs.

Prints p50/p99 of ``POST /v1/rank`` at 100 and 1000 candidates beside the bare model forward
(``encode_context`` + ``score_candidates`` on already featurized tensors) and the in-process Scorer, the
three timed interleaved (one call of each in turn, so all see the same machine state), then throughput and
p50/p99 at concurrency 1, 16 and 64 (100 candidates), without and with micro-batching, and the latency of a
score-cache hit. Timing assertions live nowhere else.

    python scripts/bench_serve.py                        # trains a toy model with 2000 items first (~40 s)
    python scripts/bench_serve.py --registry models/     # an existing registry
    python scripts/bench_serve.py --history attention    # a model with the user's history (any pooling):
                                                         # every request sends its own 50-id history

The server runs as ``python -m unirec.serve serve=[home,genre]`` in a subprocess (torch_threads=1, the
home score cache off so every timed request is scored, genre's cache on for the hit measurement), then once
more with home's micro-batching on (``--batch-window-ms``, ``--max-batch``) for the concurrent load
again. The concurrent load comes from one asyncio client with one
keep-alive connection per concurrent caller, so the client's own threads do not take the cores.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Sequence, Tuple

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def toy_registry(tmp: Path, history: str = "") -> Path:
    """Train a toy model with a 2000-item catalogue (1000 real candidates per request) and export it;
    ``history``: with the history field, pooled so."""
    args = [
        "debug=toy",
        "data.synthetic.n_items=2000",
        f"data.cache_dir={tmp}/cache",
        f"hydra.run.dir={tmp}/run",
    ]
    if history:
        args += ["data.history.enabled=true", f"model.sequence_pooling={history}"]
    subprocess.run([sys.executable, "-m", "unirec.train", *args], env=ENV, check=True, capture_output=True)
    subprocess.run(
        [sys.executable, "-m", "unirec.export", f"{tmp}/run", "--registry", f"{tmp}/registry"],
        env=ENV,
        check=True,
    )
    return tmp / "registry"


def start_server(registry: Path, port: int, extra: Sequence[str] = ()) -> subprocess.Popen:
    # The server runs in another directory: a relative --registry is resolved here.
    args = ["serve=[home,genre]", f"server.registry={Path(registry).resolve()}", f"server.port={port}", "server.freshness_s=0",
            "serve.home.cache.size=0", "serve.home.timeout_ms=5000", "serve.genre.timeout_ms=5000",
            "serve.home.max_concurrent=128", *extra]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "unirec.serve", *args], env=ENV, cwd=tempfile.gettempdir())
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", "/readyz")
            if c.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not become ready")


def http_latencies(port: int, bodies: list, repeat: int) -> np.ndarray:
    """Seconds per request, one after another over one keep-alive connection, from the lean client of
    :func:`load` (bodies pre-encoded; http.client's own header parsing would add about a millisecond)."""
    return load(port, bodies, 1, repeat)[1]


def message(body: str) -> bytes:
    """A pre-encoded ``POST /v1/rank`` request."""
    head = f"POST /v1/rank HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    return head.encode() + body.encode()


class Client:
    """One keep-alive connection, one request at a time, blocking: the lean client of :func:`load` without
    an event loop, so its requests can be interleaved with in-process calls."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def send(self, msg: bytes) -> bytes:
        self.sock.sendall(msg)
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.sock.recv(1 << 16)
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        size = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        while len(self.buf) < size:
            self.buf += self.sock.recv(1 << 16)
        data, self.buf = self.buf[:size], self.buf[size:]
        assert head.startswith(b"HTTP/1.1 200") and b'"degraded":false' in data, (head, data[:300])
        return data


def interleaved(
    port: int, scorer, contexts: list, ids: list, repeat: int, block: int = 1
) -> Dict[str, np.ndarray]:
    """Seconds per call of the HTTP endpoint, the bare forward and the in-process Scorer on the same
    request, one of each in turn, so all three see the same machine state (a quiet spell or a busy one
    falls on all three alike, not on one phase of the run). ``block``: calls of each in a row before the
    next (1: strictly alternating; larger blocks keep each side's caches warm)."""
    import pyarrow as pa

    client = Client(port)
    body = {"environment": "home", "candidates": {"ids": ids}, "top_k": len(ids)}
    msgs = [message(json.dumps({**body, "context": c})) for c in contexts]
    feats = [scorer.context_tensors("home", c) for c in contexts]
    cand = scorer._candidate_tensors("item", pa.array(ids))
    model = scorer.model

    def bare(i: int) -> None:
        ctx, present, tt = feats[i]
        c, memory = model.encode_context(ctx, present, tt), model.context_memory(ctx, present)
        torch.sigmoid(model.score_candidates(c, cand, tt, memory))

    calls = {
        "HTTP /v1/rank": lambda i: client.send(msgs[i]),
        "bare forward": bare,
        "in-process Scorer": lambda i: scorer.score("home", contexts[i], ids),
    }
    out: Dict[str, list] = {name: [] for name in calls}
    with torch.inference_mode():
        for a in range(0, repeat, block):
            for name, call in calls.items():
                for i in range(a, min(a + block, repeat)):
                    t = time.perf_counter()
                    call(i % len(contexts))
                    out[name].append(time.perf_counter() - t)
    client.sock.close()
    return {name: np.array(v) for name, v in out.items()}


def load(port: int, bodies: list, concurrency: int, requests: int) -> Tuple[float, np.ndarray]:
    """(requests/s, seconds per request) with ``concurrency`` callers, each on its own keep-alive connection
    sending its next request as soon as its answer is in, until ``requests`` are answered in all."""
    import asyncio

    messages = [message(b) for b in bodies]
    latencies: list = []
    left = [requests]

    async def caller(k: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = k
        while left[0] > 0:
            left[0] -= 1
            t = time.perf_counter()
            writer.write(messages[i % len(messages)])
            head = await reader.readuntil(b"\r\n\r\n")
            size = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            data = await reader.readexactly(size)
            latencies.append(time.perf_counter() - t)
            assert head.startswith(b"HTTP/1.1 200") and b'"degraded":false' in data, (head, data[:300])
            i += concurrency
        writer.close()

    async def run() -> float:
        t = time.perf_counter()
        await asyncio.gather(*(caller(k) for k in range(concurrency)))
        return time.perf_counter() - t

    elapsed = asyncio.run(run())
    return requests / elapsed, np.array(latencies)


def ms(x: np.ndarray) -> str:
    return f"p50 {np.percentile(x, 50) * 1e3:7.2f} ms   p99 {np.percentile(x, 99) * 1e3:7.2f} ms"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--registry", type=Path, help="model registry (default: train and export a toy model)")
    p.add_argument("--repeat", type=int, default=500)
    p.add_argument(
        "--batch-window-ms", type=float, default=2.0, help="home's micro-batching window, 2nd server"
    )
    p.add_argument("--max-batch", type=int, default=16, help="home's max_batch, 2nd server")
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="overrides for both servers, e.g. serve.home.threads=1",
    )
    p.add_argument("--history", choices=("mean", "attention", "transformer"),
                   help="train the toy model with the history field pooled so; each request sends a history")  # fmt: skip
    args = p.parse_args()
    from unirec.memory import keep_freed_memory

    print(f"load average before: {os.getloadavg()}  cpus: {os.cpu_count()}  torch threads: 1")
    torch.set_num_threads(1)
    # The server keeps freed memory (server.keep_freed_memory); the bare loops here do too, so both sides
    # of every comparison run on the same allocator settings.
    print(f"keep_freed_memory here and in the server: {keep_freed_memory()}")
    registry = args.registry or toy_registry(
        Path(tempfile.mkdtemp(prefix="bench-serve-")), args.history or ""
    )
    from unirec.export import versions
    from unirec.serve.scorer import Scorer

    scorer = Scorer.load(registry / versions(registry)[-1])
    catalogue = scorer.artifact.catalogues["item"].to_pylist()
    contexts = [{"user": str(u), "country": "us", "language": "en"} for u in range(1, 51)]
    if args.history:
        # A history of its own for every request (the featurization memo never hits on it): 50 ids each.
        rng = np.random.default_rng(0)
        contexts = [
            {**contexts[i % 50], "history": rng.choice(catalogue, 50).tolist()} for i in range(args.repeat)
        ]
        print(f"history: {args.history} pooling, 50 ids per request, a different history every request")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = start_server(registry, port, args.set)
    try:
        for n in (100, 1000):
            ids = catalogue[:n]
            assert len(ids) == n, f"the catalogue has {len(catalogue)} items, fewer than {n}"
            interleaved(port, scorer, contexts, ids, 50)  # warm-up: every context featurized once (memo)
            for name, lat in interleaved(port, scorer, contexts, ids, args.repeat).items():
                print(f"N={n:5d}  {name:17s} {ms(lat)}")
        bodies = [
            json.dumps({"environment": "home", "context": c, "candidates": {"ids": catalogue[:100]}})
            for c in contexts
        ]
        print(
            f"concurrent load, N=100 (batched: window {args.batch_window_ms} ms, max_batch {args.max_batch}):"
        )
        concurrent_load(port, bodies, "one by one")
        hit = [
            json.dumps(
                {
                    "environment": "genre",
                    "context": {"genre": "comedy"},
                    "candidates": {"ids": catalogue[:100]},
                }
            )
        ]
        http_latencies(port, hit, 10)
        print(f"cache hit, N=100  HTTP /v1/rank   {ms(http_latencies(port, hit, args.repeat))}")
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    batching = [
        f"serve.home.batch_window_ms={args.batch_window_ms}",
        f"serve.home.max_batch={args.max_batch}",
    ]
    proc = start_server(registry, port, [*args.set, *batching])
    try:
        concurrent_load(port, bodies, "micro-batched")
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def concurrent_load(port: int, bodies: list, name: str) -> None:
    load(port, bodies, 16, 300)  # warm-up: every context featurized once
    for concurrency in (1, 16, 64):
        rps, lat = load(port, bodies, concurrency, max(300, 20 * concurrency))
        print(f"  {name:13s} concurrency {concurrency:2d}: {rps:6.0f} requests/s   {ms(lat)}")


if __name__ == "__main__":
    main()
