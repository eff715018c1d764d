"""The HTTP server, for real: uvicorn on a free loopback port, requests through httpx and the official openai client."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import threading
import time

import httpx
import numpy as np
import openai
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import ftplm
from ftplm.bench.serve import run_load
from ftplm.cli import main
from ftplm.generate import DecodeSession, GenerationConfig
from ftplm.serve import ModelWorker, TextAssembler, create_app, running_server

PROMPTS = ["The history of", "In mathematics, a", "Rome"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the model thread shares 2 cores with the HTTP thread


class Recorder:
    """Wraps the model's trunk calls (every generation and embedding runs through them): how many run at once (must
    never exceed 1) and on which threads."""

    def __init__(self, tm) -> None:
        self.active = self.max_active = self.calls = 0
        self.threads: set[int] = set()
        self.lock = threading.Lock()
        tm.model.state_vectors = self.wrap(tm.model.state_vectors)

    def wrap(self, fn):
        def wrapped(*args, **kwargs):
            with self.lock:
                self.active += 1
                self.calls += 1
                self.max_active = max(self.max_active, self.active)
                self.threads.add(threading.get_ident())
            try:
                return fn(*args, **kwargs)
            finally:
                with self.lock:
                    self.active -= 1

        return wrapped


@pytest.fixture(scope="module")
def ftp_server(tiny_ftp_run):
    tm = ftplm.load(tiny_ftp_run)
    reference = ftplm.load(tiny_ftp_run)  # an untouched copy for expected outputs, used on this thread only
    recorder = Recorder(tm)
    app = create_app(tm, model_name="tiny-ftp")
    with running_server(app) as url:
        yield url, reference, recorder


@pytest.fixture(scope="module")
def gpt_server(tiny_gpt_run):
    app = create_app(tiny_gpt_run, model_name="tiny-gpt", max_tokens_cap=32)
    with running_server(app) as url:
        yield url, ftplm.load(tiny_gpt_run)


def _stream_text(client: httpx.Client, body: dict) -> tuple[str, str | None, list[str]]:
    """Concatenated streamed text, the finish reason, and the raw `data:` payloads."""
    text, finish, payloads = "", None, []
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                payloads.append(line[6:])
                if line != "data: [DONE]":
                    event = json.loads(line[6:])
                    for c in event["choices"]:
                        text += c["text"]
                        finish = c["finish_reason"] or finish
    assert payloads[-1] == "[DONE]"
    return text, finish, payloads


# ------------------------------------------------------------------------------------------------------
# shapes and correctness
# ------------------------------------------------------------------------------------------------------
def test_health_and_models(ftp_server):
    url, tm, _ = ftp_server
    c = httpx.Client(base_url=url)
    assert c.get("/health").json()["status"] == "ok"
    models = c.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny-ftp"]
    card = c.get("/v1/models/tiny-ftp").json()
    assert card["object"] == "model" and card["context_length"] == tm.config.block_size
    assert c.get("/v1/models/nope").status_code == 404


def test_completion_shape_and_greedy_equals_generate(ftp_server, gpt_server):
    for url, tm in (ftp_server[:2], gpt_server):
        c = httpx.Client(base_url=url, timeout=60)
        for prompt, n in zip(PROMPTS, (5, 20, 30)):  # 20 and 30 tokens span several worker chunks
            expected = tm.generate(prompt, n, temperature=0)
            r = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": n, "temperature": 0})
            assert r.status_code == 200
            data = r.json()
            assert data["object"] == "text_completion" and data["id"].startswith("cmpl-")
            assert isinstance(data["created"], int) and data["model"] in ("tiny-ftp", "tiny-gpt")
            (choice,) = data["choices"]
            assert choice["index"] == 0 and choice["logprobs"] is None
            assert choice["text"] == expected
            ids = tm.generate_ids(prompt, n, temperature=0)
            assert choice["finish_reason"] == ("stop" if tm.eos_id in ids else "length")
            assert data["usage"] == {
                "prompt_tokens": len(tm.encode(prompt)),
                "completion_tokens": len(ids),
                "total_tokens": len(tm.encode(prompt)) + len(ids),
            }
            streamed, finish, _ = _stream_text(c, {"prompt": [prompt], "max_tokens": n, "temperature": 0})
            assert streamed == expected and finish == choice["finish_reason"]


def test_greedy_equals_cli_generate(ftp_server, tiny_ftp_run, capsys):
    url, _, _ = ftp_server
    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                str(tiny_ftp_run),
                "--prompt",
                "The history of",
                "--max-new-tokens",
                "24",
                "--temperature",
                "0",
            ]
        )
        == 0
    )
    cli_text = capsys.readouterr().out[:-1]  # print() adds one newline
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "The history of", "max_tokens": 24, "temperature": 0})
    assert r.json()["choices"][0]["text"] == cli_text


def test_seeded_sampling_is_reproducible(ftp_server):
    url, tm, _ = ftp_server
    c = httpx.Client(base_url=url, timeout=60)
    body = {"prompt": "Rome", "max_tokens": 6, "temperature": 1.0, "top_k": 50, "seed": 7}
    a = c.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert a == c.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert a == _stream_text(c, body)[0]
    # one chunk: the request's own seed, so it equals generate() with that seed and the server's decoding method
    spec = httpx.get(f"{url}/health").json()["speculative"]
    # FTP models are served with ftp-lookup by default: the decoder's drafts, or lookup's copies where text repeats
    assert spec == {"greedy": "ftp-lookup", "sampled": "ftp-lookup"}
    assert a == tm.generate("Rome", 6, temperature=1.0, top_k=50, seed=7, speculative=spec["sampled"])
    long = {**body, "max_tokens": 30}
    assert c.post("/v1/completions", json=long).json()["choices"][0]["text"] == _stream_text(c, long)[0]


def test_stop_strings(ftp_server):
    url, tm, _ = ftp_server
    c = httpx.Client(base_url=url, timeout=60)
    full = tm.generate("The history of", 30, temperature=0)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    if not stop.strip(" "):
        pytest.skip("degenerate tiny-model output")
    expected = full[: full.find(stop)]
    for body in ({"stop": stop}, {"stop": ["zzzz-never", stop]}):
        r = c.post("/v1/completions", json={"prompt": "The history of", "max_tokens": 30, "temperature": 0, **body})
        choice = r.json()["choices"][0]
        assert choice["text"] == expected and choice["finish_reason"] == "stop"
        text, finish, _ = _stream_text(c, {"prompt": "The history of", "max_tokens": 30, "temperature": 0, **body})
        assert text == expected and finish == "stop"


def test_stream_usage_and_chunks(ftp_server):
    url, _, _ = ftp_server
    c = httpx.Client(base_url=url, timeout=60)
    _, _, payloads = _stream_text(
        c, {"prompt": "Rome", "max_tokens": 30, "temperature": 0, "stream_options": {"include_usage": True}}
    )
    events = [json.loads(p) for p in payloads[:-1]]
    assert all(e["object"] == "text_completion" and e["id"] == events[0]["id"] for e in events)
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] >= 1
    assert sum(1 for e in events if e["choices"]) >= 2  # tokens arrive in several events, not all at the end


def test_embeddings(ftp_server):
    url, tm, _ = ftp_server
    c = httpx.Client(base_url=url, timeout=60)
    texts = ["The cat sat on the mat.", "Rome was the capital of an empire."]
    r = c.post("/v1/embeddings", json={"input": texts, "model": "tiny-ftp"})
    data = r.json()
    assert r.status_code == 200 and data["object"] == "list" and data["model"] == "tiny-ftp"
    assert [d["index"] for d in data["data"]] == [0, 1] and all(d["object"] == "embedding" for d in data["data"])
    vectors = np.array([d["embedding"] for d in data["data"]])
    np.testing.assert_allclose(vectors, tm.embed(texts), atol=1e-6)
    assert data["usage"]["prompt_tokens"] == sum(len(tm.encode(t)) for t in texts)
    one = c.post("/v1/embeddings", json={"input": texts[0], "encoding_format": "base64", "pooling": "last"}).json()
    v = np.frombuffer(base64.b64decode(one["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(v, tm.embed([texts[0]], "last")[0], atol=1e-6)


def test_openai_client(ftp_server):
    url, tm, _ = ftp_server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list()] == ["tiny-ftp"]
    expected = tm.generate("The history of", 12, temperature=0)
    out = client.completions.create(model="tiny-ftp", prompt="The history of", max_tokens=12, temperature=0)
    assert out.choices[0].text == expected and out.usage.prompt_tokens == len(tm.encode("The history of"))
    stream = client.completions.create(
        model="tiny-ftp", prompt="The history of", max_tokens=12, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == expected
    emb = client.embeddings.create(model="tiny-ftp", input=["a cat", "a dog"])  # the client asks for base64
    np.testing.assert_allclose(np.array([d.embedding for d in emb.data]), tm.embed(["a cat", "a dog"]), atol=1e-6)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny-ftp", prompt="x", max_tokens=10**6)


# ------------------------------------------------------------------------------------------------------
# bad requests: 4xx with an OpenAI-style error body, and the server stays healthy
# ------------------------------------------------------------------------------------------------------
BAD = [
    ("POST", "/v1/completions", b"{not json", 400),
    ("POST", "/v1/completions", b"", 400),
    ("POST", "/v1/completions", b"[1, 2]", 400),
    ("POST", "/v1/completions", b'"a string"', 400),
    ("POST", "/v1/completions", {"prompt": 5}, 400),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": "5"}, 400),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": -1}, 400),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 1.5}, 400),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 100000}, 400),
    ("POST", "/v1/completions", {"prompt": "x", "temperature": -0.5}, 400),
    ("POST", "/v1/completions", {"prompt": "x", "temperature": "hot"}, 400),
    ("POST", "/v1/completions", {"prompt": "x", "top_p": 0}, 400),
    ("POST", "/v1/completions", {"prompt": "x", "top_p": 1.5}, 400),
    ("POST", "/v1/completions", {"prompt": "x", "top_k": 0}, 400),
    ("POST", "/v1/completions", {"prompt": "x", "stop": 3}, 400),
    ("POST", "/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400),
    ("POST", "/v1/completions", {"prompt": "x", "stop": [""]}, 400),
    ("POST", "/v1/completions", {"prompt": "x", "seed": "s"}, 400),
    ("POST", "/v1/completions", {"prompt": "x", "stream": "yes"}, 400),
    ("POST", "/v1/completions", {"prompt": "x", "n": 2}, 400),
    ("POST", "/v1/completions", {"prompt": ["a", "b"]}, 400),
    ("POST", "/v1/completions", {"prompt": [999999]}, 400),
    ("POST", "/v1/completions", {"prompt": "word " * 400}, 400),  # longer than the context
    ("POST", "/v1/completions", {"prompt": "x", "model": "not-this-one"}, 404),
    ("POST", "/v1/completions", {"prompt": "x", "logprobs": 6}, 400),
    ("POST", "/v1/completions", {"prompt": "x", "logprobs": -1}, 400),
    ("POST", "/v1/completions", {"prompt": "x", "echo": "yes"}, 400),
    ("POST", "/v1/completions", {"prompt": "x", "adaptive": 1}, 400),
    ("POST", "/v1/embeddings", {}, 400),
    ("POST", "/v1/embeddings", {"input": []}, 400),
    ("POST", "/v1/embeddings", {"input": [""]}, 400),
    ("POST", "/v1/embeddings", {"input": [1, 2]}, 400),
    ("POST", "/v1/embeddings", {"input": "x", "encoding_format": "int8"}, 400),
    ("POST", "/v1/embeddings", {"input": "x", "dimensions": 3}, 400),
    ("POST", "/v1/embeddings", {"input": ["x"] * 1000}, 400),
    ("POST", "/v1/embeddings", {"input": "x", "model": "nope"}, 404),
    ("POST", "/v1/embeddings", {"input": "word " * 400}, 400),
    ("GET", "/v1/completions", None, 405),
    ("GET", "/v1/nothing-here", None, 404),
    ("POST", "/v1/completions", b'{"prompt": "' + b"x" * (2 << 20) + b'"}', 413),
]


@pytest.mark.parametrize("method,path,body,status", BAD, ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD)])
def test_bad_requests_get_4xx(ftp_server, method, path, body, status):
    url, _, _ = ftp_server
    kwargs = {"json": body} if isinstance(body, (dict, list)) else {"content": body}
    if isinstance(body, bytes):
        kwargs["headers"] = {"content-type": "application/json"}
    r = httpx.request(method, f"{url}{path}", timeout=30, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_chunked_oversized_body_gets_413(ftp_server):
    url, _, _ = ftp_server

    def chunks():  # no Content-Length: the limit must hold while streaming the body in
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"x" * 65536
        yield b'"}'

    r = httpx.post(f"{url}/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_unknown_fields_are_ignored(ftp_server):
    url, _, _ = ftp_server
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2, "user": "me", "presence_penalty": 0})
    assert r.status_code == 200


# ------------------------------------------------------------------------------------------------------
# concurrency
# ------------------------------------------------------------------------------------------------------
def test_load_50_clients_500_requests(ftp_server):
    url, _, recorder = ftp_server
    t0 = time.perf_counter()
    stats = asyncio.run(run_load(url, clients=50, requests=500, max_tokens=4))
    assert stats["completed"] == 500 and stats["ok"] == 500, stats
    assert stats["errors_5xx"] == 0 and stats["transport_errors"] == 0 and stats["incomplete"] == 0
    assert stats["streamed"] == 250
    assert recorder.max_active == 1 and len(recorder.threads) == 1  # the model ran on one thread, one call at a time
    assert time.perf_counter() - t0 < 300
    assert httpx.get(f"{url}/health").json()["pending"] == 0


def test_slow_client_does_not_block_others(ftp_server):
    """A streaming client that never reads its response does not hold up other requests."""
    url, _, _ = ftp_server
    slow = httpx.Client(base_url=url, timeout=60)
    with slow.stream("POST", "/v1/completions", json={"prompt": "Rome", "max_tokens": 40, "stream": True}) as r:
        assert r.status_code == 200  # headers only; the body is left unread
        t0 = time.perf_counter()
        for _ in range(3):
            fast = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
            assert fast.status_code == 200
        assert time.perf_counter() - t0 < 20


def _complete(worker, prompt, **options):
    """A completion through the worker, as the server submits it: its chunks, once it has finished."""

    async def go():
        return [chunk async for chunk in worker.complete(prompt, GenerationConfig(**options))]

    return asyncio.run(go())


async def _chunks(job) -> list:
    return [c async for c in job]


def _spy_steps(mp, widths: list[int]) -> None:
    """Record how many rows each session step advances (active and joining)."""
    step = DecodeSession.step

    def spy(session):
        widths.append(len(session.rows) + len(session.joining))
        return step(session)

    mp.setattr(DecodeSession, "step", spy)


def test_worker_batches_completions_continuously(tiny_ftp_run):
    """Requests that arrive while others run join them at the next step: one forward advances every active row,
    short requests finish long before a long one, and each row's tokens equal its own generation."""
    tm = ftplm.load(tiny_ftp_run)
    worker = ModelWorker(tm)
    prompts = [tm.encode(p) for p in PROMPTS]
    widths: list[int] = []

    async def go():
        long = worker.complete(prompts[0], GenerationConfig(40, temperature=0, stop_at_eos=False)).__aiter__()
        first = await long.__anext__()
        short = [worker.complete(p, GenerationConfig(3, temperature=0, stop_at_eos=False)) for p in prompts[1:]]
        done_short = [await _chunks(job) for job in short]
        return [first, *[c async for c in long]], done_short

    try:
        with pytest.MonkeyPatch.context() as mp:
            _spy_steps(mp, widths)
            long_chunks, short_chunks = asyncio.run(go())
    finally:
        worker.stop()
    assert max(widths) == 3  # the short ones joined the long one's steps
    assert len(long_chunks) == 40 and all(len(c.tokens) == 1 for c in long_chunks)  # plain decoding: a token a step
    assert [t for c in long_chunks for t in c.tokens] == tm.generate_ids(
        prompts[0], 40, temperature=0, stop_at_eos=False
    )
    for p, chunks in zip(prompts[1:], short_chunks):
        assert [t for c in chunks for t in c.tokens] == tm.generate_ids(p, 3, temperature=0, stop_at_eos=False)
    assert worker.pending == 0


def test_worker_drops_cancelled_rows(tiny_ftp_run):
    """A completion whose client went away (cancelled) leaves the batch at the next step: no model time for nobody,
    and the worker goes on serving."""
    tm = ftplm.load(tiny_ftp_run)
    worker = ModelWorker(tm)
    widths: list[int] = []

    async def go():
        job = worker.complete(tm.encode("Rome"), GenerationConfig(60, temperature=0, stop_at_eos=False))
        n = 0
        async for _ in job:
            n += 1
            if n == 2:
                job.cancel()
                break
        await asyncio.sleep(0.2)

    try:
        with pytest.MonkeyPatch.context() as mp:
            _spy_steps(mp, widths)
            asyncio.run(go())
            assert _complete(worker, tm.encode("The"), max_new_tokens=2, temperature=0)
    finally:
        worker.stop()
    assert len(widths) < 20 and worker.pending == 0


# ------------------------------------------------------------------------------------------------------
# text assembly (stop strings, EOS, split characters)
# ------------------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_text_assembler_deltas_add_up(tiny_gpt_run, data):
    tm = _cached_model(tiny_gpt_run)
    ids = data.draw(st.lists(st.integers(0, tm.config.vocab_size - 1), min_size=1, max_size=30))
    stops = data.draw(st.lists(st.text(alphabet="abe ,.\u00e9", min_size=1, max_size=3), max_size=2))
    # (if one stop string contained another, which one ends generation would depend on where chunks end)
    assume(not any(a != b and a in b for a in stops for b in stops))
    cuts = sorted(data.draw(st.lists(st.integers(1, len(ids)), max_size=4)))
    asm = TextAssembler(tm, stops)
    out, prev = "", 0
    for cut in [*cuts, len(ids)]:
        out += asm.add(ids[prev:cut])
        prev = cut
        if asm.finish_reason:
            break
    if not asm.finish_reason:
        out += asm.flush()
    before_eos = ids[: ids.index(tm.eos_id)] if tm.eos_id in ids else ids
    full = tm.decode(before_eos)
    hits = [full.find(s) for s in stops if s in full]
    assert out == (full[: min(hits)] if hits else full)
    assert asm.finish_reason == ("stop" if hits or tm.eos_id in ids else None)


_MODELS: dict = {}


def _cached_model(path):
    if path not in _MODELS:
        _MODELS[path] = ftplm.load(path)
    return _MODELS[path]


# ------------------------------------------------------------------------------------------------------
# the commands
# ------------------------------------------------------------------------------------------------------
def test_cli_bench_serve(tiny_gpt_run, tmp_path, capsys):
    out = tmp_path / "serve.json"
    assert (
        main(
            [
                "bench",
                "serve",
                str(tiny_gpt_run),
                "--clients",
                "4",
                "--requests",
                "12",
                "--max-tokens",
                "2",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    figures = json.loads(out.read_text())
    assert figures["ok"] == 12 and figures["errors_5xx"] == 0 and figures["incomplete"] == 0
    assert figures["latency_ms_p99"] >= figures["latency_ms_p50"] > 0 and figures["requests_per_s"] > 0
    assert "p50" in capsys.readouterr().out


def test_cli_serve_bad_input(tiny_gpt_run, tmp_path, capsys):
    from ftplm.serve import bind

    taken = bind("127.0.0.1", 0)
    try:
        capsys.readouterr()
        assert main(["serve", str(tiny_gpt_run), "--port", str(taken.getsockname()[1])]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("ftplm serve: error: cannot listen") and "\n" not in err
    finally:
        taken.close()
    assert main(["serve", str(tmp_path / "no-run")]) == 2
    assert main(["serve", str(tiny_gpt_run), "--port", "-1"]) == 2
    assert main(["bench", "serve", str(tiny_gpt_run), "--clients", "0"]) == 2
    capsys.readouterr()
    for bad, says in (
        (["--speculative", "ftp"], "needs an FTP model"),
        (["--speculative", "none", "--adaptive"], "adaptive draft length needs"),
    ):
        assert main(["serve", str(tiny_gpt_run), *bad]) == 2  # refused before binding a port
        err = capsys.readouterr().err.strip()
        assert says in err and "\n" not in err


def test_adaptive_speculative_server_equals_plain_greedy(tiny_gpt_run):
    tm = _cached_model(tiny_gpt_run)
    app = create_app(tiny_gpt_run, speculative="recycling", adaptive=True)
    with running_server(app) as url:
        health = httpx.get(f"{url}/health").json()
        assert health["speculative"] == {"greedy": "recycling", "sampled": "recycling"} and health["adaptive"]
        for prompt in ("The history of", "Rome was"):
            r = httpx.post(
                f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 20, "temperature": 0}, timeout=60
            )
            assert r.json()["choices"][0]["text"] == tm.generate(prompt, 20, temperature=0)


def test_auto_serves_gpt_greedy_requests_with_lookup_and_sampled_ones_plainly(tiny_gpt_run, monkeypatch):
    """ "auto" picks the drafter per request from its temperature (GPT: copies help only greedy decoding)."""
    import ftplm.serve as serve_module

    tm = _cached_model(tiny_gpt_run)
    app = create_app(tm, speculative="auto")
    assert serve_module.describe_drafters(app.state.served.drafters) == "greedy: lookup, sampled: off"
    prompt, expected = "The history of", {t: tm.generate("The history of", 6, temperature=t, seed=3) for t in (0, 0.8)}
    long_text = tm.generate(prompt, 30, temperature=0)
    used = []
    add = DecodeSession.add

    def spy(session, prompt, config, *args):
        row = add(session, prompt, config, *args)
        used.append(row.drafter)  # the request's drafter
        return row

    monkeypatch.setattr(DecodeSession, "add", spy)
    with running_server(app) as url:
        assert httpx.get(f"{url}/health").json()["speculative"] == {"greedy": "lookup", "sampled": None}
        for temperature, text in expected.items():
            body = {"prompt": prompt, "max_tokens": 6, "temperature": temperature, "seed": 3}
            assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"] == text
        assert [getattr(d, "name", None) for d in used] == ["lookup", None]
        body = {"prompt": prompt, "max_tokens": 30, "temperature": 0}
        text = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        assert text == long_text


def test_help_texts(capsys):
    """Top-level --help formats every command's summary (a '%' in one once crashed it)."""
    for argv in (["--help"], ["serve", "--help"], ["embed", "--help"], ["bench", "serve", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "serve" in out and "--max-tokens" in out and "--pooling" in out


def test_logprobs_and_echo_score_a_text(gpt_server):
    """echo + logprobs + max_tokens 0 scores a text (what lm-evaluation-harness asks an OpenAI-style server for):
    the prompt's token log-probabilities, the first None, summing to the model's own log-likelihood."""
    url, tm = gpt_server
    text = "The history of Rome is long"
    ids = tm.encode(text)
    body = {"prompt": text, "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0}
    choice = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == text and "".join(lp["tokens"]) == text and len(lp["tokens"]) == len(ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert sum(lp["token_logprobs"][1:]) == pytest.approx(tm.loglikelihood(ids[:1], ids[1:])[0], rel=1e-4)
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
    body = {"prompt": "Rome", "max_tokens": 6, "temperature": 0, "logprobs": 3, "stop_at_eos": False}
    choice = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]).startswith(choice["text"]) and all(len(t) <= 3 for t in lp["top_logprobs"])
    for token_lp, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
        assert token_lp == pytest.approx(max(top.values()))  # greedy: the chosen token is the most likely
    streamed = [json.loads(p) for p in _stream_text(httpx.Client(base_url=url, timeout=60), body)[2][:-1]]
    assert [t for e in streamed for c in e["choices"] if c["logprobs"] for t in c["logprobs"]["tokens"]] == lp["tokens"]


@pytest.mark.parametrize("server", ["ftp_server", "gpt_server"])  # the model on a thread / in its own process
def test_client_that_disconnects_mid_stream_stalls_nobody(server, request):
    url = request.getfixturevalue(server)[0]
    with (
        httpx.Client(base_url=url, timeout=60) as c,
        c.stream("POST", "/v1/completions", json={"prompt": "Rome", "max_tokens": 30, "stream": True}) as r,
    ):
        next(r.iter_lines())  # one event, then the connection goes away
    for _ in range(3):
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 4}, timeout=30).status_code == 200
    deadline = time.monotonic() + 10
    while httpx.get(f"{url}/health").json()["pending"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(f"{url}/health").json()["pending"] == 0


def test_engine_runs_in_its_own_process_for_a_saved_model(tiny_gpt_run):
    """Served from a path, the model runs in a process of its own; if that process dies, the open requests get a
    5xx (not a hang) and the next request starts a new one."""
    tm = _cached_model(tiny_gpt_run)
    app = create_app(tiny_gpt_run)
    with running_server(app) as url:
        body = {"prompt": "Rome", "max_tokens": 8, "temperature": 0}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"] == tm.generate(
            "Rome", 8, temperature=0
        )
        engine = app.state.served.worker._process
        assert engine is not None and engine.is_alive() and engine.pid != os.getpid()
        os.kill(engine.pid, signal.SIGSTOP)  # the request is open, and unanswered, when the process dies
        with (
            httpx.Client(base_url=url, timeout=60) as c,
            c.stream("POST", "/v1/completions", json={**body, "max_tokens": 30, "stream": True}) as r,
        ):
            engine.kill()
            rest = "\n".join(r.iter_lines()).strip()
        assert "the model process has exited" in rest and rest.endswith("data: [DONE]")
        again = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert again.status_code == 200 and again.json()["choices"][0]["text"] == tm.generate("Rome", 8, temperature=0)
        assert app.state.served.worker._process.pid != engine.pid and httpx.get(f"{url}/health").json()["pending"] == 0
