"""`ftplm serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) for completions and embeddings.

    POST /v1/completions   prompt, max_tokens, temperature (0 = greedy), top_p, top_k, stop, seed, stream (SSE),
                           logprobs (0-5), echo, adaptive (extension)
    POST /v1/embeddings    input (str or list of str), encoding_format float|base64, pooling mean|last (extension)
    GET  /v1/models, /v1/models/{id}, /health

The model runs in one engine (`Engine`), in a process of its own when the server loads the model from a path
(HTTP handling and decoding then do not share one interpreter lock); request handlers hand it requests and await
the results. Completions are rows of one decoding session (ftplm.generate.DecodeSession), batched continuously:
requests join at the next step, finished ones leave, and each step's tokens stream out at once. The engine never
waits on a client socket, so a slow or vanished client holds up nobody. echo with logprobs and max_tokens 0 scores a
text (what lm-evaluation-harness asks for). Completions use lossless speculative decoding, the drafter chosen per
request (`auto_drafter`). Client mistakes always get a 4xx with an OpenAI-style JSON error, never a 5xx.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import itertools
import json
import multiprocessing
import os
import queue
import socket
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from ftplm.api import TextModel, load
from ftplm.drafters import auto_drafter, get_drafter
from ftplm.errors import FtplmError
from ftplm.generate import DecodeSession, GenerationConfig, Row, TokenLogprob

MAX_BODY_BYTES = 1 << 20  # request bodies above this get 413
MAX_EMBED_INPUTS = 256
MAX_BATCH = 64  # completions decoded together; more wait for a free row


# --- errors -------------------------------------------------------------------------------------------------
class APIError(Exception):
    """A client-visible error: HTTP status + OpenAI's {"error": {message, type, param, code}} body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",  # noqa: A002 - OpenAI's field name
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


class BodyLimit:
    """ASGI middleware: 413 for request bodies over `max_bytes`, declared (Content-Length) or streamed (chunked)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = APIError(413, f"request body exceeds {self.max_bytes} bytes", code="request_too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await too_big.response()(scope, receive, send)
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise HTTPException(413, too_big.message)
            return message

        await self.app(scope, limited_receive, send)


# --- requests (extra fields are accepted and ignored, as OpenAI does; types are strict: "5" is not a number) ---
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool = False


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    model: str | None = None
    prompt: str | list[str] | list[int] = ""
    max_tokens: int | None = Field(None, ge=0)  # None = OpenAI's default of 16
    temperature: float | None = Field(None, ge=0, le=2)  # None = 1; 0 = greedy
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)  # extension (vLLM has it too)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(1, ge=1)
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=5)  # as OpenAI: the chosen token's and up to 5 alternatives
    best_of: int | None = Field(None, ge=1)
    adaptive: bool | None = None  # extension: adaptive draft lengths (default: the server's --adaptive)


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    model: str | None = None
    input: str | list[str]
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: int | None = None
    pooling: Literal["mean", "last"] = "mean"  # extension


# --- the engine that owns the model, and the worker that hands it requests -------------------------------------
# Messages to the engine: ("complete", id, prompt ids, GenerationConfig, stream), ("call", id, TextModel method, args),
# ("cancel", id); None stops it. Events back, a list per step: (id, "item" | "done" | "error", value).
Message = tuple[Any, ...] | None
Event = tuple[int, str, Any]


@dataclass
class Chunk:
    """A step's new tokens for one completion (with their log-probabilities when asked; the prompt's come first)."""

    tokens: list[int]
    logprobs: list[TokenLogprob]
    prompt_logprobs: list[TokenLogprob]

    @staticmethod
    def merge(chunks: list[Chunk]) -> Chunk:
        return Chunk(
            [t for c in chunks for t in c.tokens],
            [e for c in chunks for e in c.logprobs],
            [e for c in chunks for e in c.prompt_logprobs],
        )


class Engine:
    """The only code that runs the model. Completions are rows of one DecodeSession: every step advances all of them
    in one batched forward; requests that arrive join at the next step (up to max_batch rows, the rest wait),
    finished and cancelled ones leave. Other calls (embeddings) run between steps. It knows requests only by id and
    talks through two functions, so it runs the same on a thread or in a process of its own."""

    def __init__(
        self, tm: TextModel, max_batch: int, receive: Callable[[bool], Message], send: Callable[[list[Event]], None]
    ) -> None:
        self.tm, self.max_batch, self.receive, self.send = tm, max_batch, receive, send
        self.waiting: deque[tuple[int, list[int], GenerationConfig, bool]] = deque()
        self.rows: dict[int, Row] = {}  # job id -> its row
        self.held: dict[int, list[Chunk]] = {}  # non-streamed completions' chunks, handed over at their end

    def run(self) -> None:
        session = self.tm.session()
        while True:
            events: list[Event] = []
            try:  # block only when idle; otherwise take whatever arrived since the last step
                while True:
                    message = self.receive(not (self.rows or self.waiting or events))
                    if message is None:
                        return
                    self._handle(session, message, events)
            except queue.Empty:
                pass
            while self.waiting and len(self.rows) < self.max_batch:
                self._admit(session, *self.waiting.popleft(), events)
            if self.rows:
                session = self._step(session, events)
            if events:
                self.send(events)

    def _handle(self, session: DecodeSession, message: tuple[Any, ...], events: list[Event]) -> None:
        kind, job = message[:2]
        if kind == "complete":
            self.waiting.append(message[1:])
        elif kind == "call":
            try:
                events.append((job, "item", getattr(self.tm, message[2])(*message[3])))
                events.append((job, "done", None))
            except BaseException as e:  # noqa: BLE001 - handed to the request, which answers for it
                events.append((job, "error", e))
        elif job in self.rows:  # "cancel": the row leaves at the next step
            session.cancel(self.rows[job])
        elif any(w[0] == job for w in self.waiting):
            self.waiting = deque(w for w in self.waiting if w[0] != job)
            events.append((job, "done", None))

    def _admit(
        self,
        session: DecodeSession,
        job: int,
        prompt: list[int],
        config: GenerationConfig,
        stream: bool,
        events: list[Event],
    ) -> None:
        try:
            row = session.add(prompt, config)
        except BaseException as e:  # noqa: BLE001 - handed to the request, which answers for it
            return events.append((job, "error", e))
        if row.finished:
            return events.append((job, "done", None))
        self.rows[job] = row
        if not stream:
            self.held[job] = []

    def _step(self, session: DecodeSession, events: list[Event]) -> DecodeSession:
        """One step of every row; their chunks (and the ends of those that finished) added to events."""
        try:
            produced = session.step()
        except BaseException as e:  # noqa: BLE001 - handed to the requests, which answer for it
            events += [(job, "error", e) for job in self.rows]
            self.rows.clear()
            self.held.clear()
            return self.tm.session()
        job_of = {id(row): job for job, row in self.rows.items()}
        for row, new in produced:
            job = job_of[id(row)]
            chunk = Chunk(
                new,
                row.logprobs[len(row.logprobs) - len(new) :] if row.config.logprobs is not None else [],
                row.prompt_logprobs if len(row.out) == len(new) else [],
            )
            if job in self.held:
                self.held[job].append(chunk)
            else:
                events.append((job, "item", chunk))
        for job in [job for job, row in self.rows.items() if row.finished]:
            del self.rows[job]
            held = self.held.pop(job, [])
            if held:
                events.append((job, "item", Chunk.merge(held)))
            events.append((job, "done", None))
        return session


def _engine_process(source: TextModel | str, threads: int, max_batch: int, inbox: Any, outbox: Any) -> None:
    """A spawned process's whole life: load the model, run the engine until told to stop or the server is gone."""
    torch.set_num_threads(threads)
    tm = source if isinstance(source, TextModel) else load(source)
    gc.freeze()  # the model's objects leave the collector's view: no full collection pauses a step (~80 ms)

    def receive(block: bool) -> Message:
        if not block and not inbox.poll():
            raise queue.Empty
        return inbox.recv()

    def send(events: list[Event]) -> None:
        try:
            outbox.send(events)
        except Exception:  # noqa: BLE001 - an error that does not pickle: sent as its text
            outbox.send([(j, k, RuntimeError(f"{type(v).__name__}: {v}") if k == "error" else v) for j, k, v in events])

    with contextlib.suppress(EOFError, BrokenPipeError, KeyboardInterrupt):
        Engine(tm, max_batch, receive, send).run()


class Job:
    """A request's work in the engine; its results flow to an asyncio queue: ("item", value)..., then ("done", None)
    or ("error", exception)."""

    def __init__(self, worker: ModelWorker, loop: asyncio.AbstractEventLoop, id: int) -> None:  # noqa: A002 - Job.id, as OpenAI names it
        self.worker, self.loop, self.id = worker, loop, id
        self.results: asyncio.Queue = asyncio.Queue()

    def push(self, kind: str, value: Any = None) -> None:  # any thread -> event loop, never blocks
        with contextlib.suppress(RuntimeError):  # the loop is gone (server shutting down)
            self.loop.call_soon_threadsafe(self.results.put_nowait, (kind, value))

    def cancel(self) -> None:
        """The client has gone (or has all it wanted): the engine drops the request at its next step."""
        self.worker.cancel(self)

    async def __aiter__(self) -> AsyncIterator[Any]:
        async for items in self.batches():
            for item in items:
                yield item

    async def batches(self) -> AsyncIterator[list[Any]]:
        """The items as they come, those already waiting taken together (a stream that lags behind sends fewer,
        larger events)."""
        while True:
            kind, value = await self.results.get()
            items: list[Any] = []
            while kind == "item":
                items.append(value)
                if self.results.empty():
                    break
                kind, value = self.results.get_nowait()
            if items:
                yield items
            if kind == "done":
                return
            if kind == "error":
                raise value


class ModelWorker:
    """Hands requests to the `Engine` and its events back to the requests. The engine runs on a thread of this
    process, or in a process of its own that loads `process_source` (a path, or a TextModel it gets a copy of):
    decoding then does not share an interpreter lock with the HTTP handling (on 2 cores, 50-client `bench serve`
    on `mini`: ~290 req/s instead of ~245, p99 latency ~0.25 s instead of ~0.3 s)."""

    def __init__(
        self,
        tm: TextModel | None = None,
        max_pending: int = 256,
        max_batch: int = MAX_BATCH,
        process_source: str | TextModel | None = None,
    ) -> None:
        self.tm, self.max_pending, self.max_batch, self.source = tm, max_pending, max_batch, process_source
        self.pending = 0  # jobs submitted and not finished (read by the event loop for back-pressure)
        self.jobs: dict[int, Job] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._send: Callable[[Message], None] | None = None
        self._threads: list[threading.Thread] = []
        self._process: Any = None

    def start(self) -> None:
        if self._send is not None:
            return
        if self.source is None:
            inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
            engine = Engine(self.tm, self.max_batch, lambda block: inbox.get(block=block), self._deliver)  # type: ignore[arg-type]  # tm is set for an engine on a thread
            self._threads = [threading.Thread(target=engine.run, name="ftplm-model", daemon=True)]
            self._send = inbox.put
        else:
            spawn = multiprocessing.get_context("spawn")
            (inbox_r, inbox_w), (outbox_r, outbox_w) = spawn.Pipe(duplex=False), spawn.Pipe(duplex=False)
            self._process = spawn.Process(
                target=_engine_process,
                name="ftplm-model",
                daemon=True,
                args=(self.source, torch.get_num_threads(), self.max_batch, inbox_r, outbox_w),
            )
            self._process.start()
            inbox_r.close()
            outbox_w.close()
            self._threads = [threading.Thread(target=self._receive, args=(outbox_r,), name="ftplm-events", daemon=True)]
            self._send = inbox_w.send
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._send is None:
            return
        with contextlib.suppress(OSError):
            self._send(None)
        for t in self._threads:
            t.join(timeout)
        if self._process is not None:
            self._process.join(timeout)
            if self._process.is_alive():
                self._process.terminate()
            self._process = None
        self._send = None

    def call(self, method: str, *args: Any) -> Job:
        """TextModel.method(*args) in the engine, between steps; its value is the job's one item."""
        return self._submit(lambda job: ("call", job, method, args))

    def complete(self, prompt: list[int], config: GenerationConfig, stream: bool = True) -> Job:
        """A completion: its items are Chunks, one per step that produced tokens (stream=False: one, at the end)."""
        return self._submit(lambda job: ("complete", job, prompt, config, stream))

    def cancel(self, job: Job) -> None:
        with self._lock:
            live = job.id in self.jobs
        if live and self._send is not None:
            with contextlib.suppress(OSError):
                self._send(("cancel", job.id))

    def _submit(self, message: Callable[[int], tuple[Any, ...]]) -> Job:
        if self.pending >= self.max_pending:
            raise APIError(
                429,
                f"server busy: {self.pending} requests queued; retry later",
                code="server_busy",
                type="rate_limit_error",
            )
        self.start()
        job = Job(self, asyncio.get_running_loop(), next(self._ids))
        with self._lock:
            self.pending += 1
            self.jobs[job.id] = job
        try:
            self._send(message(job.id))  # type: ignore[misc]  # start() has set _send
        except (OSError, TypeError):  # the engine process died just now (its receiver has set _send to None)
            self._deliver([(job.id, "error", RuntimeError("the model process has exited"))])
        return job

    def _deliver(self, events: list[Event]) -> None:
        for job_id, kind, value in events:
            with self._lock:
                job = self.jobs.get(job_id) if kind == "item" else self.jobs.pop(job_id, None)
                if job is not None and kind != "item":
                    self.pending -= 1
            if job is not None:
                job.push(kind, value)

    def _receive(self, outbox: Any) -> None:
        """The engine process's events to their jobs; if it dies, every job still open ends with an error."""
        with contextlib.suppress(EOFError, OSError):
            while True:
                self._deliver(outbox.recv())
        gone = RuntimeError("the model process has exited")
        with self._lock:
            open_jobs = list(self.jobs)
        self._deliver([(job, "error", gone) for job in open_jobs])
        self._send = None  # the next request starts a new engine


# --- completions --------------------------------------------------------------------------------------------
class TextAssembler:
    """Generated ids -> text deltas. Cuts at EOS and at stop strings; holds back text that may still become a stop
    string or is an incomplete UTF-8 character, so the deltas always add up to the final text."""

    def __init__(self, tm: TextModel, stops: list[str]) -> None:
        self.tm, self.stops = tm, stops
        self.ids: list[int] = []
        self.n_generated = 0
        self.sent = 0
        self.finish_reason: str | None = None

    def add(self, new: list[int]) -> str:
        self.n_generated += len(new)
        for t in new:
            if t == self.tm.eos_id:
                self.finish_reason = "stop"
                break
            self.ids.append(t)
        text = self.tm.decode(self.ids)
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.finish_reason = "stop"
            return self._emit(text, max(min(hits), self.sent))
        if self.finish_reason:
            return self._emit(text, len(text))
        safe = len(text.rstrip("\ufffd"))  # a multi-byte character split across tokens
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    safe = min(safe, len(text) - k)
                    break
        return self._emit(text, max(safe, self.sent))

    def flush(self) -> str:
        """The rest of the text once generation has ended without a stop."""
        return self._emit(self.tm.decode(self.ids), None)

    def _emit(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else end
        delta, self.sent = text[self.sent : end], end
        return delta


# --- the app ------------------------------------------------------------------------------------------------
def _drafters(tm: TextModel, speculative: str | None, adaptive: bool = False) -> dict[str, str | None]:
    """The drafter for greedy and for sampled requests ("auto": `auto_drafter`; None = plain decoding). Checked
    here, at startup: an unknown drafter or ftp on a GPT model is one clear line."""
    if speculative == "auto":
        chosen = {mode: auto_drafter(tm.config.model_type, mode == "greedy") for mode in ("greedy", "sampled")}
    else:
        chosen = dict.fromkeys(("greedy", "sampled"), None if speculative in (None, "none") else speculative)
    if adaptive and not any(chosen.values()):
        raise FtplmError("adaptive draft length needs a speculative drafter; this server decodes plainly")
    for name in set(chosen.values()) - {None}:
        get_drafter(name, tm.model)  # type: ignore[arg-type]  # tm.model is a LanguageModel
    return chosen


def describe_drafters(drafters: dict[str, str | None]) -> str:
    """ "ftp-lookup", "off", or "greedy: lookup, sampled: off" where the two differ."""
    if drafters["greedy"] == drafters["sampled"]:
        return drafters["greedy"] or "off"
    return ", ".join(f"{mode}: {name or 'off'}" for mode, name in drafters.items())


def completion_config(
    req: CompletionRequest, cap: int, drafters: dict[str, str | None], adaptive: bool
) -> GenerationConfig:
    """A completion request as the engine's GenerationConfig (OpenAI's names and defaults): the one place they
    meet, so a bad option gets the engine's own one-line message, as a 400."""
    if req.n not in (None, 1) or req.best_of not in (None, 1):
        raise APIError(400, "only n=1 (and best_of=1) is supported", "n")
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    if max_tokens > cap:
        raise APIError(400, f"max_tokens is at most {cap}, got {max_tokens}", "max_tokens")
    # the options a request shares with the engine, by name; those it leaves unset keep the engine's defaults
    options = {
        f.name: getattr(req, f.name)
        for f in fields(GenerationConfig)
        if f.name in CompletionRequest.model_fields and getattr(req, f.name) is not None
    }
    options["stop"] = req.stop or ()
    drafter = drafters["greedy" if options.get("temperature", GenerationConfig.temperature) == 0 else "sampled"]
    options["adaptive"] = bool(drafter) and options.get("adaptive", adaptive)
    try:
        return GenerationConfig(**options, max_new_tokens=max_tokens, speculative=drafter)
    except FtplmError as e:
        raise APIError(400, str(e)) from None


class LogprobsJSON:
    """OpenAI's completion logprobs ({tokens, token_logprobs, top_logprobs, text_offset}) for the chunks of a
    completion, in order (the prompt's first, with echo): offsets count characters of the returned text."""

    def __init__(self, tm: TextModel, echoed: list[int]) -> None:
        self.tm, self.prompt_done = tm, not echoed
        self.ids: list[int] = []

    def add(self, chunk: Chunk) -> dict[str, Any]:
        entries = chunk.logprobs if self.prompt_done else chunk.prompt_logprobs + chunk.logprobs
        self.prompt_done = True
        out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
            out["text_offset"].append(len(self.tm.decode(self.ids)))
            self.ids.append(e.token)
            out["tokens"].append(self.tm.decode([e.token]))
            out["token_logprobs"].append(e.logprob)
            out["top_logprobs"].append({self.tm.decode([t]): lp for t, lp in e.top} if e.logprob is not None else None)
        return out


def _check_model(requested: str | None, name: str) -> None:
    if requested is not None and requested != name:
        raise APIError(
            404, f"the model {requested!r} does not exist; this server serves {name!r}", "model", "model_not_found"
        )


@dataclass
class Served:
    """What every route needs: the model, the engine worker that decodes for it, and the server's settings
    (app.state.served)."""

    text_model: TextModel
    worker: ModelWorker
    model_name: str
    max_tokens_cap: int
    drafters: dict[str, str | None]
    adaptive: bool
    created: int

    @property
    def block(self) -> int:
        return self.text_model.config.block_size

    def model_card(self) -> dict[str, Any]:
        cfg = self.text_model.config
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "ftplm",
            "model_type": cfg.model_type,
            "context_length": cfg.block_size,
            "embedding_dim": cfg.n_embd,
        }

    def prompt_ids(self, prompt: str | list[str] | list[int], max_tokens: int) -> list[int]:
        """A request's prompt as token ids (text, one text in a list, or ids), checked against the context."""
        tm = self.text_model
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            if any(not 0 <= t < tm.config.vocab_size for t in prompt):
                raise APIError(400, f"token ids must be in [0, {tm.config.vocab_size})", "prompt")
            ids = list(prompt)
        elif isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, f"one prompt per request is supported, got {len(prompt)}", "prompt")
            ids = tm.encode(str(prompt[0]))  # a list of strings (pydantic: lists are all str or all int)
        else:
            ids = tm.encode(prompt)
        if not ids:  # OpenAI: an empty prompt means the start of a document
            if tm.eos_id is None:
                raise APIError(400, "the prompt is empty", "prompt")
            ids = [tm.eos_id]
        if len(ids) > self.block or (len(ids) == self.block and max_tokens > 0):
            raise APIError(
                400,
                f"the prompt has {len(ids)} tokens; this model's context is {self.block} tokens, "
                "including the completion",
                "prompt",
                "context_length_exceeded",
            )
        return ids


def served(request: Request) -> Served:
    return request.app.state.served


ServedDep = Annotated[Served, Depends(served)]  # a route's parameter: FastAPI passes the app's Served


# --- errors: every failure is an OpenAI-style JSON error --------------------------------------------------------
async def _api_error(request: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, APIError)
    return e.response()


async def _invalid_request(request: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, RequestValidationError)

    def field(err: dict) -> str | None:
        return next((str(x) for x in err.get("loc", ()) if x != "body"), None)

    errors = e.errors()
    err = errors[0] if errors else {}
    if err.get("type") == "json_invalid":
        return APIError(
            400, f"the body is not valid JSON: {err.get('ctx', {}).get('error', '')}".rstrip(": "), code="invalid_json"
        ).response()
    param = field(err)
    # a union field (e.g. prompt: str | list[str]) fails once per member: say all of it, under the field's name
    msgs = dict.fromkeys(x.get("msg", "invalid value") for x in errors if field(x) == param)
    return APIError(400, f"{param or 'body'}: {'; or '.join(msgs)}", param, "invalid_value").response()


async def _bad_input(request: Request, e: Exception) -> JSONResponse:
    return APIError(400, str(e)).response()


async def _http_error(request: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(e.status_code)
    return APIError(e.status_code, str(e.detail), code=code).response()


async def _internal_error(request: Request, e: Exception) -> JSONResponse:
    return APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").response()


EXCEPTION_HANDLERS: dict[Any, Callable[[Request, Exception], Any]] = {
    APIError: _api_error,
    RequestValidationError: _invalid_request,
    FtplmError: _bad_input,
    HTTPException: _http_error,
    Exception: _internal_error,
}


# --- routes -----------------------------------------------------------------------------------------------------
router = APIRouter()


@router.get("/health")
async def health(s: ServedDep) -> dict[str, Any]:
    return {
        "status": "ok",
        "model": s.model_name,
        "pending": s.worker.pending,
        "speculative": s.drafters,
        "adaptive": s.adaptive,
    }


@router.get("/v1/models")
async def models(s: ServedDep) -> dict[str, Any]:
    return {"object": "list", "data": [s.model_card()]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, s: ServedDep) -> dict[str, Any]:
    _check_model(model_id, s.model_name)
    return s.model_card()


class Completion:
    """One completion's response, whole or streamed: its text (stop strings applied), logprobs and usage."""

    def __init__(self, s: Served, req: CompletionRequest, ids: list[int], job: Any, config: GenerationConfig) -> None:
        tm = s.text_model
        self.req, self.ids, self.job = req, ids, job
        self.asm = TextAssembler(tm, list(config.stop))
        self.logprobs = LogprobsJSON(tm, ids if req.echo else []) if config.logprobs is not None else None
        self.echo = tm.decode(ids) if req.echo else ""
        self.head = {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": s.model_name,
        }

    def usage(self) -> dict[str, int]:
        n = self.asm.n_generated
        return {"prompt_tokens": len(self.ids), "completion_tokens": n, "total_tokens": len(self.ids) + n}

    def choice(self, text: str, finish: str | None, chunk: Chunk | None = None) -> dict[str, Any]:
        lp = self.logprobs.add(chunk) if self.logprobs is not None and chunk is not None else None
        return {"text": text, "index": 0, "logprobs": lp, "finish_reason": finish}

    async def whole(self) -> JSONResponse:
        try:
            whole = Chunk.merge([chunk async for chunk in self.job])  # one at most: the worker holds them till the end
        finally:
            self.job.cancel()
        asm = self.asm
        text = self.echo + asm.add(whole.tokens)
        text += "" if asm.finish_reason else asm.flush()
        return JSONResponse(
            {**self.head, "choices": [self.choice(text, asm.finish_reason or "length", whole)], "usage": self.usage()}
        )

    def _sse(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        return f"data: {json.dumps({**self.head, 'choices': choices, **extra})}\n\n"

    async def events(self) -> AsyncIterator[str]:
        """Server-sent events: a chunk per engine step that adds text (or logprobs), then the finish reason."""
        asm = self.asm
        try:
            if self.echo:
                yield self._sse([self.choice(self.echo, None)])
            async for chunks in self.job.batches():
                chunk = Chunk.merge(chunks)
                delta = asm.add(chunk.tokens)
                if delta or self.logprobs is not None:
                    yield self._sse([self.choice(delta, None, chunk)])
                if asm.finish_reason:
                    break
            rest = "" if asm.finish_reason else asm.flush()
            yield self._sse([self.choice(rest, asm.finish_reason or "length")])
            if self.req.stream_options is not None and self.req.stream_options.include_usage:
                yield self._sse([], usage=self.usage())
        except Exception as e:  # noqa: BLE001 - the status line is sent; report in-band, as OpenAI does
            error = APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").body()
            yield f"data: {json.dumps(error)}\n\n"
        finally:
            self.job.cancel()
        yield "data: [DONE]\n\n"


@router.post("/v1/completions", response_model=None)
async def completions(req: CompletionRequest, s: ServedDep) -> JSONResponse | StreamingResponse:
    _check_model(req.model, s.model_name)
    config = completion_config(req, s.max_tokens_cap, s.drafters, s.adaptive)
    ids = s.prompt_ids(req.prompt, config.max_new_tokens)
    completion = Completion(s, req, ids, s.worker.complete(ids, config, bool(req.stream)), config)
    if not req.stream:
        return await completion.whole()
    return StreamingResponse(
        completion.events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.post("/v1/embeddings")
async def embeddings(req: EmbeddingRequest, s: ServedDep) -> JSONResponse:
    _check_model(req.model, s.model_name)
    tm, block = s.text_model, s.block
    texts = [req.input] if isinstance(req.input, str) else req.input
    if not texts or len(texts) > MAX_EMBED_INPUTS:
        raise APIError(400, f"input must hold 1 to {MAX_EMBED_INPUTS} texts, got {len(texts)}", "input")
    if req.dimensions is not None and req.dimensions != tm.config.n_embd:
        raise APIError(400, f"this model's embeddings have {tm.config.n_embd} dimensions", "dimensions")
    n_tokens = []
    for i, text in enumerate(texts):
        n = len(tm.encode(text))
        if n == 0:
            raise APIError(400, f"input[{i}] is empty", "input")
        if n > block:
            raise APIError(
                400,
                f"input[{i}] has {n} tokens; this model's context is {block} tokens",
                "input",
                "context_length_exceeded",
            )
        n_tokens.append(n)

    (vectors,) = [v async for v in s.worker.call("embed", texts, req.pooling)]  # the job's one item
    if req.encoding_format == "base64":
        data = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
    else:
        data = [v.tolist() for v in vectors]
    return JSONResponse(
        {
            "object": "list",
            "model": s.model_name,
            "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
            "usage": {"prompt_tokens": sum(n_tokens), "total_tokens": sum(n_tokens)},
        }
    )


# --- the app ------------------------------------------------------------------------------------------------------
def create_app(
    model: TextModel | str | Path,
    *,
    model_name: str | None = None,
    speculative: str | None = "auto",
    adaptive: bool = False,
    max_tokens_cap: int | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_pending: int = 256,
    max_batch: int = MAX_BATCH,
    engine_process: bool | None = None,
) -> FastAPI:
    """The FastAPI app serving one model (a TextModel or a run / saved-model path).

    speculative: "auto" (per request: FTP models `ftp-lookup`; GPT `lookup` when greedy, plain when sampling), a
        drafter name, or None.
    adaptive: with a drafter, choose each round's draft length from the acceptances so far (per request; a request
        may say otherwise with "adaptive").
    max_tokens_cap: the most tokens one completion may ask for (default: the model's context length).
    max_batch: completions decoded together (more wait for a free row); max_pending: requests accepted at once
        (more get 429).
    engine_process: run the model in a process of its own (default: when `model` is a path, which that process
        loads; a TextModel passed in runs on a thread of this process, or is copied to that process if asked).
    """
    in_memory = isinstance(model, TextModel)
    tm = model if isinstance(model, TextModel) else load(model)
    drafters = _drafters(tm, speculative, adaptive)
    process = not in_memory if engine_process is None else engine_process
    source = (tm if in_memory else str(tm.path)) if process else None
    worker = ModelWorker(tm, max_pending, max_batch, source)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="ftplm", lifespan=lifespan, exception_handlers=EXCEPTION_HANDLERS)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.include_router(router)
    app.state.served = Served(
        tm,
        worker,
        model_name or (tm.path.name if tm.path is not None else "ftplm"),
        max_tokens_cap or tm.config.block_size,
        drafters,
        adaptive and any(drafters.values()),
        int(time.time()),
    )
    return app


# --- running it ---------------------------------------------------------------------------------------------
def set_cpu_threads(threads: int | None = None) -> int:
    """Torch CPU threads for serving: by default one core is left to the HTTP thread (OpenMP threads spin-wait for
    busy cores: on a busy 2-core machine 2 threads were ~50x slower than 1)."""
    if threads is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores - 1)
    torch.set_num_threads(threads)
    return threads


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0 = a free one), or one clear error (port taken, unknown host)."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server((host, port), family=family)
    except OSError as e:
        raise FtplmError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def serve(
    run: str | Path, host: str = "127.0.0.1", port: int = 8000, threads: int | None = None, **app_kwargs: Any
) -> None:
    """Serve a run until interrupted (Ctrl-C)."""
    import uvicorn

    set_cpu_threads(threads)
    # the model thread gives the GIL up at every torch op and waits up to a switch interval to get it back: 1 ms
    # instead of 5 took 50-client `bench serve` p99 from ~1 s to ~0.4 s
    sys.setswitchinterval(0.001)
    app = create_app(run, **app_kwargs)
    sock = bind(host, port)
    s: Served = app.state.served
    adaptive = ", adaptive" if s.adaptive else ""
    print(
        f"serving {s.model_name} ({s.text_model.config.model_type}, speculative: "
        f"{describe_drafters(s.drafters)}{adaptive}) on http://{host}:{port}/v1",
        flush=True,
    )
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])


@contextlib.contextmanager
def running_server(app: FastAPI, host: str = "127.0.0.1", timeout: float = 30.0) -> Iterator[str]:
    """Run `app` with uvicorn in a background thread on a free port of `host`; yields its base URL."""
    import uvicorn

    sock = bind(host, 0)  # the OS picks the port: no race with other tests or servers
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="ftplm-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise FtplmError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
