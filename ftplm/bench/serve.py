"""`ftplm bench serve`: load on the HTTP server, on loopback, bounded: latency percentiles, throughput, errors.

The server runs in this process (uvicorn in a thread) on a free loopback port; `clients` concurrent async clients
share `requests` requests, alternating streaming and plain completions (greedy and sampled). A request counts as
complete only if its body is whole: a non-streamed one has a finish_reason, a streamed one ends with a
finish_reason and `data: [DONE]`. Nothing leaves the machine and the run stops by itself.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import multiprocessing
import sys
import time
from typing import Any

import numpy as np

from ftplm.machine import provenance

PROMPTS = [
    "The history of",
    "In mathematics, a",
    "The city is",
    "Music is",
    "The river flows",
    "A scientist",
    "During the war",
    "The language",
    "Water is",
    "The first",
]


async def _one(session: Any, url: str, i: int, max_tokens: int) -> dict[str, Any]:
    stream = i % 2 == 1
    body: dict[str, Any] = {
        "prompt": PROMPTS[i % len(PROMPTS)],
        "max_tokens": max_tokens,
        "temperature": 0.0 if i % 4 < 2 else 0.8,
        "seed": i,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    t0 = time.perf_counter()
    rec: dict[str, Any] = {"stream": stream, "status": None, "complete": False, "ttft": None, "tokens": 0}
    try:
        async with session.post(f"{url}/v1/completions", json=body) as r:
            rec["status"] = r.status
            if r.status != 200:
                await r.read()
            elif not stream:
                data = await r.json()
                rec["complete"] = data["choices"][0]["finish_reason"] in ("stop", "length")
                rec["tokens"] = data["usage"]["completion_tokens"]
                if body["temperature"] == 0:
                    rec["greedy"] = (body["prompt"], data["choices"][0]["text"])
            else:
                finish, done = None, False
                async for raw in r.content:  # one line at a time
                    line = raw.decode().rstrip("\r\n")
                    if not line.startswith("data: "):
                        continue
                    if rec["ttft"] is None:
                        rec["ttft"] = time.perf_counter() - t0
                    if line == "data: [DONE]":
                        done = True
                        continue
                    event = json.loads(line[6:])
                    if event.get("choices"):
                        finish = event["choices"][0]["finish_reason"] or finish
                    if event.get("usage"):
                        rec["tokens"] = event["usage"]["completion_tokens"]
                rec["complete"] = done and finish in ("stop", "length")
    except Exception as e:  # noqa: BLE001 - a transport failure is a result here, counted and reported
        rec["error"] = f"{type(e).__name__}: {e}"
    rec["latency"] = time.perf_counter() - t0
    return rec


async def run_load(
    url: str, clients: int = 50, requests: int = 500, max_tokens: int = 8, timeout: float = 120.0
) -> dict[str, Any]:
    """`clients` concurrent clients sharing `requests` requests against a running server at `url`. The clients are
    aiohttp's: on 2 cores the load generator competes with the server for CPU, and httpx's took ~10x the CPU."""
    import aiohttp

    next_i = iter(range(requests))
    records: list[dict[str, Any]] = []

    async def client_loop(session: aiohttp.ClientSession) -> None:
        for i in next_i:  # one shared iterator: each request index is taken exactly once
            records.append(await _one(session, url, i, max_tokens))

    t0 = time.perf_counter()
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=clients), timeout=aiohttp.ClientTimeout(total=timeout)
    ) as session:
        await asyncio.gather(*(client_loop(session) for _ in range(clients)))
    wall = time.perf_counter() - t0
    lat = np.array([r["latency"] for r in records]) * 1000
    ttft = np.array([r["ttft"] for r in records if r["ttft"] is not None]) * 1000
    status = [r["status"] for r in records]
    return {
        "clients": clients,
        "requests": requests,
        "max_tokens": max_tokens,
        "completed": len(records),
        "ok": sum(s == 200 for s in status),
        "errors_4xx": sum(s is not None and 400 <= s < 500 for s in status),
        "errors_5xx": sum(s is not None and s >= 500 for s in status),
        "transport_errors": sum("error" in r for r in records),
        "incomplete": sum(not r["complete"] for r in records),
        "streamed": sum(r["stream"] for r in records),
        "latency_ms_p50": float(np.percentile(lat, 50)),
        "latency_ms_p99": float(np.percentile(lat, 99)),
        "ttft_ms_p50": float(np.percentile(ttft, 50)) if len(ttft) else None,
        "wall_s": wall,
        "requests_per_s": len(records) / wall,
        "completion_tokens_per_s": sum(r["tokens"] for r in records) / wall,
        "records": records,
    }


def _load(url: str, clients: int, requests: int, max_tokens: int) -> dict[str, Any]:
    return asyncio.run(run_load(url, clients, requests, max_tokens))


def bench_serve(
    run: str,
    clients: int = 50,
    requests: int = 500,
    max_tokens: int = 8,
    speculative: str | None = "auto",
    threads: int | None = None,
) -> dict[str, Any]:
    """Start a server for `run` on loopback, warm it up, put the load on it, print and return the figures."""
    import httpx

    from ftplm.serve import create_app, describe_drafters, running_server, set_cpu_threads

    threads = set_cpu_threads(threads)
    sys.setswitchinterval(0.001)  # as `ftplm serve`
    app = create_app(run, speculative=speculative)
    # the clients run in a process of their own, as they would elsewhere: not in the server's interpreter (GIL)
    spawn = multiprocessing.get_context("spawn")
    with running_server(app) as url, concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as clients_process:
        # warm-up: one request, then one request per client at once (the batch shapes the load will meet)
        httpx.post(f"{url}/v1/completions", json={"prompt": "Warm", "max_tokens": max_tokens}, timeout=120)
        clients_process.submit(_load, url, clients, clients, max_tokens).result()
        figures = clients_process.submit(_load, url, clients, requests, max_tokens).result()
    tm = app.state.served.text_model
    greedy = [r["greedy"] for r in figures.pop("records") if "greedy" in r]
    expected = {p: tm.generate(p, max_tokens, temperature=0) for p in {p for p, _ in greedy}}
    figures["greedy_checked"] = len(greedy)
    figures["greedy_mismatches"] = sum(text != expected[p] for p, text in greedy)
    figures.update(
        run=str(run),
        model_type=tm.config.model_type,
        speculative=describe_drafters(app.state.served.drafters),
        **provenance(),
        threads=threads,
    )
    _print(figures)
    return figures


def _print(f: dict[str, Any]) -> None:
    print(
        f"bench serve: {f['run']} ({f['model_type']}, speculative {f['speculative']}), "
        f"{f['clients']} clients, {f['requests']} requests ({f['streamed']} streamed), max_tokens {f['max_tokens']}"
    )
    ttft = f"{f['ttft_ms_p50']:.0f}" if f["ttft_ms_p50"] is not None else "-"
    print(f"latency p50 {f['latency_ms_p50']:.0f} ms, p99 {f['latency_ms_p99']:.0f} ms; stream TTFT p50 {ttft} ms")
    print(
        f"throughput {f['requests_per_s']:.1f} req/s, {f['completion_tokens_per_s']:.0f} completion tokens/s "
        f"({f['wall_s']:.1f} s)"
    )
    print(
        f"ok {f['ok']}/{f['requests']}; 4xx {f['errors_4xx']}, 5xx {f['errors_5xx']}, transport errors "
        f"{f['transport_errors']}, incomplete {f['incomplete']}; greedy completions unlike generate(): "
        f"{f['greedy_mismatches']} of {f['greedy_checked']}"
    )
