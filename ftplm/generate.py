"""The decoding engine: every option in one `GenerationConfig`, one `DecodeSession` that advances rows by steps.

Each `step()` runs ONE trunk forward for every active row: its last accepted token (the root) plus whatever its
drafter proposed (ftplm.drafters: a token tree; none for plain decoding). Rows join (their prompts prefilled
together at the next step) and leave between steps. Plain and speculative decoding, batch 1 and batch > 1, are this
one loop; `generate`, `generate_batch`, `TextModel`, the CLI, `bench decode` and the server call it.

Verification is lossless: greedy accepts the longest path whose tokens equal the argmax at their parent; sampling
accepts x ~ q with probability min(1, p/q), else continues from norm(max(0, p - q)), so the output is distributed
exactly as plain sampling. Each row samples with its own generator (its seed) and drafts with its own drafter
(one passed in by the caller is shared on purpose), so its tokens do not depend on which rows share its steps.
Rows whose drafters keep no state that matters (`Drafter.batch_key`) are still drafted together.

The KV cache is shared: every step writes all rows at the same slots; a row's accepted nodes move to the front of
its new slots and the rest become holes, masked out of attention (rows that stay in step need no mask). When the
slots run out, every row's tokens are moved to the front (`_compact`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ftplm.drafters import (
    DRAFTERS,
    AdaptiveDepth,
    Draft,
    DraftContext,
    Drafter,
    auto_drafter,
    check_template,
    get_drafter,
)
from ftplm.errors import FtplmError
from ftplm.model import DecoderStart, KVCache, LanguageModel

MAX_LOGPROBS = 20
MAX_STOP = 4


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class Sampling:
    """How to turn logits into a token. temperature 0 = greedy (argmax)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t < 0:
            raise FtplmError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise FtplmError(f"top_k must be a positive integer, got {self.top_k!r}")
        p = self.top_p
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1):
            raise FtplmError(f"top_p must be in (0, 1], got {p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution we sample from (..., V): temperature, then top-k, then top-p (nucleus) filtering."""
        logits = logits.float()
        if self.greedy:
            return torch.nn.functional.one_hot(logits.argmax(-1), logits.size(-1)).float()
        logits = logits / self.temperature
        if self.top_k is not None and self.top_k < logits.size(-1):
            kth = torch.topk(logits, self.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if self.top_p is not None and self.top_p < 1:
            sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
            drop = (sorted_probs.cumsum(-1) - sorted_probs) >= self.top_p  # keep the smallest prefix reaching top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
            probs = probs / probs.sum(-1, keepdim=True)
        return probs

    @staticmethod
    def draw(probs: torch.Tensor, generator: torch.Generator | None = None, n: int = 1) -> torch.Tensor:
        """n independent draws (with replacement) from each row of probs (V,) or (B, V) -> (n,) or (B, n).
        A single draw is the first of two: multinomial then inverts the CDF, 30x faster than its one-draw path."""
        return torch.multinomial(probs, max(n, 2), replacement=True, generator=generator)[..., :n]


@dataclass(frozen=True)
class GenerationConfig:
    """Every decoding option, validated once: the Python API, the CLI flags and the server's requests map onto it.

    speculative: a drafter name (ftplm.drafters), "auto" (`auto_drafter`: the fastest on our models for the model
    type and temperature) or None; the output is the same either way (greedy) or has the same distribution
    (sampling). draft_len: tokens drafted per step; tree: verify a tree of candidates (True, or a template of rank
    paths); adaptive: choose each step's draft length from the acceptances so far. stop: strings that end a text
    completion (applied to decoded text by TextModel and the server). logprobs: also return each new token's
    log-probability and the top `logprobs` alternatives; echo: also the prompt's tokens' (the first has none).
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_at_eos: bool = True
    stop: tuple[str, ...] = ()
    speculative: str | None = None
    draft_len: int | None = None
    tree: bool | tuple[tuple[int, ...], ...] | None = None
    adaptive: bool = False
    logprobs: int | None = None
    echo: bool = False

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 - frozen: normalise in place
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            raise FtplmError(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        self.sampling  # noqa: B018 - validates temperature, top_k, top_p
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise FtplmError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if (
            not isinstance(stop, (tuple, list))
            or len(stop) > MAX_STOP
            or not all(isinstance(s, str) and s for s in stop)
        ):
            raise FtplmError(f"stop takes up to {MAX_STOP} non-empty strings, got {self.stop!r}")
        set_("stop", tuple(stop))
        if self.speculative is not None and not isinstance(self.speculative, str):
            raise FtplmError(f"speculative must be a drafter name, 'auto' or None, got {self.speculative!r}")
        if self.speculative == "none":
            set_("speculative", None)
        if self.speculative is not None and self.speculative != "auto" and self.speculative not in DRAFTERS:
            raise FtplmError(
                f"unknown speculative drafter {self.speculative!r}; choose one of: auto, "
                f"{', '.join(sorted(DRAFTERS))} (or None)"
            )
        if self.draft_len is not None and (not _is_int(self.draft_len) or self.draft_len <= 0):
            raise FtplmError(f"draft_len must be a positive integer, got {self.draft_len!r}")
        if self.tree is not None and not isinstance(self.tree, bool):
            set_("tree", tuple(check_template(self.tree)))
        if self.adaptive and self.speculative is None:
            raise FtplmError("adaptive draft length needs a speculative drafter (speculative='ftp', 'recycling', ...)")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise FtplmError(f"logprobs must be an integer in 0..{MAX_LOGPROBS}, got {self.logprobs!r}")
        for f in dataclasses.fields(self):
            if f.type == "bool" and not isinstance(getattr(self, f.name), bool):
                raise FtplmError(f"{f.name} must be true or false, got {getattr(self, f.name)!r}")

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_k, None if self.top_p == 1 else self.top_p)

    def replace(self, **changes: Any) -> GenerationConfig:
        return dataclasses.replace(self, **changes)

    def resolved(self, model_type: str) -> GenerationConfig:
        """speculative="auto" replaced by the drafter it stands for here (adaptive dropped if that is none)."""
        if self.speculative != "auto":
            return self
        name = auto_drafter(model_type, self.sampling.greedy)
        return self.replace(speculative=name, adaptive=self.adaptive and name is not None)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def check_budget(model: LanguageModel, prompt_len: int, max_new_tokens: int) -> int:
    """How many tokens can be generated within the context (max_new_tokens: validated by GenerationConfig)."""
    if prompt_len == 0:
        raise FtplmError("the prompt is empty")
    block = model.cfg.block_size
    if prompt_len >= block and max_new_tokens > 0:
        raise FtplmError(f"prompt of {prompt_len} tokens leaves no room in the model's context of {block} tokens")
    return min(max_new_tokens, block - prompt_len)


@dataclass
class SpecStats:
    """Bookkeeping of generations (summed over rows and calls). τ = new tokens per target forward, bonus included,
    prefill included (plain decoding has τ = 1.00), as in Spec-Bench; a forward of B rows counts B."""

    new_tokens: int = 0
    target_forwards: int = 0
    draft_tokens: int = 0  # draft nodes verified
    accepted_tokens: int = 0  # draft tokens accepted
    draft_time: float = 0.0  # seconds in drafter.propose
    verify_time: float = 0.0  # seconds in target forwards + acceptance + cache bookkeeping
    trunk_time: float = 0.0  # of verify_time: the trunk's forward passes (prefill included)
    target_time: float = 0.0  # of verify_time: next-token logits from the state vectors (FTP: decoder's first step)
    total_time: float = 0.0

    @property
    def overhead_time(self) -> float:
        """Everything but drafting, trunk and targets: sampling/acceptance, cache roll-back, Python."""
        return self.total_time - self.draft_time - self.trunk_time - self.target_time

    @property
    def tau(self) -> float:
        return self.new_tokens / self.target_forwards if self.target_forwards else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "overhead_time": self.overhead_time, "tau": self.tau}


def speculative_accept(p: torch.Tensor, token: int, q: torch.Tensor | None, u: float) -> tuple[bool, torch.Tensor]:
    """The speculative-sampling rule for one drafted token x drawn from q, given u ~ U[0, 1).

    Accept when u < p[x] / q[x]; otherwise return the distribution the output must then be drawn from (or the next
    sibling candidate tested against): the residual norm(max(0, p - q)). q None = x chosen deterministically
    (one-hot q: accept with probability p[x], residual = p without x). Returns (accepted, p or residual).
    """
    px = float(p[token])
    qx = 1.0 if q is None else float(q[token])
    if u * qx < px:
        return True, p
    if q is None:
        residual = p.clone()
        residual[token] = 0.0
    else:
        residual = (p - q).clamp_(min=0.0)
    total = float(residual.sum())
    if total <= 0.0:  # only when p == q up to rounding, where rejection has probability ~0
        return False, p
    return False, residual / total


def _draft_mask(draft: Draft, width: int) -> torch.Tensor:
    """(width, width) attention among root + draft nodes: each sees its ancestors and itself; padding up to width
    sees only itself (a query that sees nothing would give NaN) and nobody sees padding."""
    mask = torch.eye(width, dtype=torch.bool)
    ancestors: list[list[int]] = [[0]]
    for i, parent in enumerate(draft.parents, start=1):
        ancestors.append(ancestors[parent + 1] + [i])
    for i, anc in enumerate(ancestors):
        mask[i, anc] = True
    return mask


def _accept_path(
    inputs: list[int], logits: torch.Tensor, draft: Draft, sampling: Sampling, generator: torch.Generator
) -> tuple[list[int], list[int]]:
    """Walk the verified tree from the root: (indices into inputs of the accepted path incl. root 0, new tokens
    = accepted draft tokens + the bonus token). With no draft: one plain decoding step."""
    children: list[list[int]] = [[] for _ in inputs]
    for i, parent in enumerate(draft.parents, start=1):
        children[parent + 1].append(i)
    node, path, new = 0, [0], []
    if sampling.greedy:
        targets = logits.argmax(-1).tolist()
        while True:
            target = targets[node]
            new.append(target)
            node = next((c for c in children[node] if inputs[c] == target), -1)
            if node < 0:
                return path, new
            path.append(node)
    while True:
        p = sampling.probs(logits[node])
        for child in children[node]:
            u = float(torch.rand((), generator=generator, device=generator.device))
            accepted, p = speculative_accept(p, inputs[child], draft.q[child - 1], u)
            if accepted:
                break
        else:
            new.append(int(sampling.draw(p, generator)[0]))
            return path, new
        node = child
        path.append(node)
        new.append(inputs[node])


def _compact(cache: KVCache, valid: torch.Tensor, lengths: list[int]) -> None:
    """Move each row's valid cache slots to the front (in order), so that the shared write position starts again
    after the longest row."""
    for r, n in enumerate(lengths):
        slots = valid[r].nonzero().squeeze(1)
        cache.k[:, r, :, :n] = cache.k[:, r, :, slots]  # type: ignore[index]  # the pools and views exist once a row has joined
        cache.v[:, r, :, :n] = cache.v[:, r, :, slots]  # type: ignore[index]  # the pools and views exist once a row has joined
        valid[r] = False
        valid[r, :n] = True
    cache.length = max(lengths)


@dataclass
class TokenLogprob:
    """A token's log-probability under the model (before temperature and filtering) and the most likely ones."""

    token: int
    logprob: float | None  # None: the first prompt token (nothing before it)
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Row:
    """One generation in a session. `out` grows by each step's new tokens; `finish_reason` is set when it ends:
    "stop" (EOS), "length" (max_new_tokens or the context) or "cancelled"."""

    prompt: list[int]
    config: GenerationConfig
    budget: int  # new tokens it may produce (max_new_tokens cut to the context)
    sampling: Sampling
    generator: torch.Generator
    drafter: Drafter | None
    adaptive: AdaptiveDepth | None
    out: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    length: int = 0  # its tokens in the session's cache
    h_prev: torch.Tensor | None = None  # state vector before the root (what drafters continue from)
    decoder_start: DecoderStart | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class DecodeSession:
    """Rows decoded together, step by step: `add` rows at any time, `step()` for every active row's new tokens,
    `cancel` a row to drop it at the next step. One session per model and thread; not thread-safe."""

    # cache slots per context length: room for holes, so that compaction (`_compact`) is needed at most every
    # (CAPACITY - 1) x block_size tokens written
    CAPACITY = 2.0

    def __init__(self, model: LanguageModel, eos_id: int | None = None, stats: SpecStats | None = None) -> None:
        self.model, self.eos_id = model.eval(), eos_id
        self.stats = stats if stats is not None else SpecStats()
        self.block = model.cfg.block_size
        self.capacity = int(self.CAPACITY * self.block)
        self.rows: list[Row] = []  # active, in cache order
        self.joining: list[Row] = []
        # the cache of every row, grown as rows join; active rows are its first len(rows) rows (self.cache and
        # self.valid are views of them): (layers, rows, heads, slots, head dim) keys/values, (rows, slots) masks
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._valid: torch.Tensor | None = None
        self.cache: KVCache | None = None
        self.valid: torch.Tensor | None = None  # the slots each active row's tokens are in

    # --- rows in and out ------------------------------------------------------------------------------
    def add(
        self,
        prompt: Sequence[int],
        config: GenerationConfig | None = None,
        drafter: Drafter | None = None,
        adaptive: bool | None = None,
    ) -> Row:
        """A new row, prefilled at the next step. drafter: an instance to use (shared) instead of the config's, with
        adaptive draft lengths or not (default: the config's)."""
        config = (config or GenerationConfig()).resolved(self.model.cfg.model_type)
        prompt = list(prompt)
        if not all(_is_int(t) and 0 <= t < self.model.cfg.vocab_size for t in prompt):
            raise FtplmError(f"token ids must be integers in [0, {self.model.cfg.vocab_size})")
        budget = check_budget(self.model, len(prompt), config.max_new_tokens)
        shared = drafter is not None
        if drafter is None and config.speculative is not None:
            drafter = get_drafter(config.speculative, self.model, config.draft_len, config.tree)
        if drafter is not None:
            drafter.begin()
        adaptive = config.adaptive if adaptive is None else adaptive
        depth = (
            AdaptiveDepth(drafter.draft_len, drafter.node_cost, drafter.fixed_cost) if drafter and adaptive else None
        )
        if depth is not None and shared:  # a drafter the caller shares keeps one set of statistics, carried over
            depth = drafter.adaptive_depth = drafter.adaptive_depth or depth  # type: ignore[union-attr]  # a shared drafter: the caller's instance
        row = Row(
            prompt, config, budget, config.sampling, make_generator(config.seed, self.model.device), drafter, depth
        )
        if budget == 0 and not config.echo:
            row.finish_reason = "length"
        else:
            self.joining.append(row)
        return row

    def cancel(self, row: Row) -> None:
        if not row.finished:
            row.finish_reason = "cancelled"

    @property
    def active(self) -> bool:
        return bool(self.rows or self.joining)

    # --- stepping -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[tuple[Row, list[int]]]:
        """One verification forward for the active rows, then the prefill of the rows that joined: each row that
        produced tokens, with them. Rows that finished (or were cancelled) have left the session afterwards."""
        started = time.perf_counter()
        self._leave()
        events: list[tuple[Row, list[int]]] = []
        draft_time = self._verify(events) if self.rows else 0.0
        if self.joining:
            self._prefill(events)
        self._leave()
        s = self.stats
        total = time.perf_counter() - started
        s.draft_time += draft_time
        s.verify_time += total - draft_time
        s.total_time += total
        return events

    def run(self) -> Iterator[tuple[Row, list[int]]]:
        """Step until every row has finished, yielding each step's new tokens per row."""
        while self.active:
            yield from self.step()

    def _leave(self) -> None:
        """Finished and cancelled rows leave the batch: the last row takes each one's place in the cache (one row
        copied, not the batch)."""
        self.joining = [r for r in self.joining if not r.finished]
        dead = [i for i, r in enumerate(self.rows) if r.finished]
        if not dead:
            return
        length = self.cache.length  # type: ignore[union-attr]  # the pools and views exist once a row has joined
        for i in reversed(dead):
            last = len(self.rows) - 1
            if i != last:
                for pool in (self._k, self._v):
                    pool[:, i, :, :length] = pool[:, last, :, :length]  # type: ignore[index]  # the pools and views exist once a row has joined
                self._valid[i] = self._valid[last]  # type: ignore[index]  # the pools and views exist once a row has joined
                self.rows[i] = self.rows[last]
            self.rows.pop()
        self._view(length if self.rows else 0)

    def _view(self, length: int) -> None:
        """The cache and slot masks of the active rows: views of the first len(rows) rows of the pool."""
        n = len(self.rows)
        self.cache = KVCache(self.model.cfg.n_layer, self.capacity)
        self.cache.k, self.cache.v, self.cache.length = self._k[:, :n], self._v[:, :n], length  # type: ignore[index]  # the pools and views exist once a row has joined
        self.valid = self._valid[:n]  # type: ignore[index]  # the pools and views exist once a row has joined

    def _forward(
        self,
        rows: list[Row],
        x: torch.Tensor,
        cache: KVCache,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        last: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """One target forward of the rows' inputs x (masked where a (rows, T, slots) mask is given): the state
        vectors, the next-token logits at the fed positions (last: at the last only) and, for FTP drafters, the
        decoder state after that first step."""
        t0 = time.perf_counter()
        h = self.model.state_vectors(x, cache, positions, None if mask is None else mask[:, None])
        t1 = time.perf_counter()
        hx = (h[:, -1:], x[:, -1:]) if last else (h, x)
        first_decoder_step = getattr(self.model, "first_decoder_step", None)  # FTP's
        if first_decoder_step is not None and any(
            r.drafter is not None and r.drafter.wants_decoder_start for r in rows
        ):
            logits, decoder = first_decoder_step(*hx)
        else:
            logits, decoder = self.model.next_token_logits(*hx), None
        self.stats.trunk_time += t1 - t0
        self.stats.target_time += time.perf_counter() - t1
        self.stats.target_forwards += len(rows)
        return h, logits, decoder

    def _prefill(self, events: list[tuple[Row, list[int]]]) -> None:
        """The joining rows' prompts in one forward (shorter ones left-padded, the padding a hole like the others),
        their first tokens, and their caches appended to the session's."""
        rows, self.joining = self.joining, []
        device = self.model.device
        width = max(len(r.prompt) for r in rows)
        pads = [width - len(r.prompt) for r in rows]
        x = torch.tensor([r.prompt[:1] * pad + r.prompt for r, pad in zip(rows, pads)], device=device)
        cache = KVCache(self.model.cfg.n_layer, width)
        start, slots = torch.tensor(pads, device=device)[:, None], torch.arange(width, device=device)
        valid = slots >= start
        positions = mask = None
        if any(pads):
            causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
            mask = (causal & valid[:, None, :width]) | torch.eye(width, dtype=torch.bool, device=device)
            positions = (slots - start).clamp(min=0)
        h, logits, decoder = self._forward(rows, x, cache, positions, mask, last=True)
        for i, (row, pad) in enumerate(zip(rows, pads)):
            if row.config.echo and row.config.logprobs is not None:  # the prompt's own, from the same forward
                prompt_logits = self.model.next_token_logits(h[i : i + 1, pad:-1], x[i : i + 1, pad:-1])[0]
                row.prompt_logprobs = [TokenLogprob(row.prompt[0], None)] + _logprobs(
                    prompt_logits, row.prompt[1:], row.config.logprobs
                )
            row.length, row.h_prev = len(row.prompt), h[i, -1]
            row.decoder_start = decoder.row(i) if decoder is not None else None
            if row.drafter is not None:
                row.drafter.observe(row.prompt[-1:], logits[i], [0])
            if row.budget == 0:  # echo only
                row.finish_reason = "length"
                events.append((row, []))
                continue
            token = int(_accept_path(row.prompt[-1:], logits[i], Draft(), row.sampling, row.generator)[1][0])
            self._emit(row, [token], logits[i], [0], events)
        self._append(rows, cache, valid)

    def _append(self, rows: list[Row], cache: KVCache, valid: torch.Tensor) -> None:
        """Rows prefilled into their own cache join the session's, their tokens ending where the others' do (so that
        nobody's holes grow): one cache, verified together from the next step on."""
        n, joining, width = len(self.rows), len(rows), cache.length
        length = self.cache.length if n else 0  # type: ignore[union-attr]  # the pools and views exist once a row has joined
        new_length = max(length, width)
        if cache.k is None:  # a model that keeps nothing in its cache (a test double): an empty one stands in
            cache.k = cache.v = torch.zeros(1, joining, 1, width, 0, device=valid.device)
        k = cache.k
        if self._k is None or self._k.dtype != k.dtype or self._k.size(1) < n + joining:
            size = n + joining if self._k is None else max(n + joining, 2 * self._k.size(1))
            # zeros, not empty: masked slots still enter attention's products, and garbage could be NaN
            pools = [k.new_zeros((k.size(0), size, *k.shape[2:3], self.capacity, k.size(-1))) for _ in range(2)]
            valid_pool = torch.zeros(size, self.capacity, dtype=torch.bool, device=k.device)
            if n:
                pools[0][:, :n, :, :length], pools[1][:, :n, :, :length] = (
                    self.cache.k[..., :length, :],  # type: ignore[union-attr,index]  # the pools exist once a row has joined
                    self.cache.v[..., :length, :],  # type: ignore[union-attr,index]
                )
                valid_pool[:n] = self._valid[:n]  # type: ignore[index]  # the pools and views exist once a row has joined
            self._k, self._v, self._valid = pools[0], pools[1], valid_pool
        end = slice(new_length - width, new_length)
        self._k[:, n : n + joining, :, end] = cache.k[:, :, :, :width]
        self._v[:, n : n + joining, :, end] = cache.v[:, :, :, :width]  # type: ignore[index]  # the pools and views exist once a row has joined
        self._valid[n : n + joining] = False  # type: ignore[index]  # the pools and views exist once a row has joined
        self._valid[n : n + joining, end] = valid[:, :width]  # type: ignore[index]  # the pools and views exist once a row has joined
        self.rows = self.rows + rows
        self._view(new_length)

    def _propose(self) -> list[Draft]:
        """Each active row's draft (empty without a drafter); rows sharing a drafter and greedy-or-not are drafted
        together (`Drafter.propose_batch`), then observed in the same order."""
        drafts = [Draft() for _ in self.rows]
        groups: dict[tuple[object, bool], list[int]] = {}
        for i, row in enumerate(self.rows):
            if row.drafter is not None:
                groups.setdefault((row.drafter.batch_key(), row.sampling.greedy), []).append(i)
        for members in groups.values():
            ctxs = []
            for i in members:
                row = self.rows[i]
                tokens = row.prompt + row.out
                max_depth, max_nodes = row.budget - len(row.out) - 1, self.block - len(tokens)
                if row.adaptive is not None:
                    max_depth = min(max_depth, row.adaptive.depth())
                ctxs.append(
                    DraftContext(
                        tokens,
                        row.h_prev,  # type: ignore[arg-type]  # h_prev: set at prefill
                        max_depth,
                        max_nodes,
                        row.sampling,
                        row.generator,
                        row.decoder_start,
                        row.drafter,
                    )
                )
            proposed = self.rows[members[0]].drafter.propose_batch(ctxs)  # type: ignore[union-attr]  # rows in a group all have a drafter
            for i, draft, ctx in zip(members, proposed, ctxs):
                drafts[i] = draft.truncated(ctx.max_depth, ctx.max_nodes)
        return drafts

    def _verify(self, events: list[tuple[Row, list[int]]]) -> float:
        """One forward over every active row's root and draft; returns the seconds spent drafting."""
        t0 = time.perf_counter()
        drafting = any(r.drafter is not None for r in self.rows)
        drafts = self._propose() if drafting else [Draft() for _ in self.rows]
        draft_time = time.perf_counter() - t0 if drafting else 0.0
        rows, cache, valid, device = self.rows, self.cache, self.valid, self.model.device
        assert cache is not None and valid is not None
        width = 1 + max(len(d) for d in drafts)
        if cache.length + width > self.capacity:
            _compact(cache, valid, [r.length for r in rows])
            room = self.capacity - cache.length - 1  # at CAPACITY >= 2 every draft fits: a smaller pool cuts them
            drafts = [d.truncated(len(d), room) for d in drafts]
            width = 1 + max(len(d) for d in drafts)
        start = cache.length
        inputs = [[r.out[-1] if r.out else r.prompt[-1]] + d.tokens for r, d in zip(rows, drafts)]
        x = torch.tensor([row + [row[0]] * (width - len(row)) for row in inputs], device=device)
        positions = mask = None  # every row contiguous, chains of one length: the plain causal path, no mask
        holes = any(r.length != start for r in rows)
        if holes or any(len(row) != width for row in inputs) or not all(d.is_chain() for d in drafts):
            positions = torch.tensor(
                [
                    [r.length + depth for depth in [0] + d.depths()] + [r.length] * (width - 1 - len(d))
                    for r, d in zip(rows, drafts)
                ],
                device=device,
            )
            among = torch.stack([_draft_mask(d, width) for d in drafts]).to(device)
            mask = torch.cat([valid[:, None, :start].expand(-1, width, -1), among], dim=2)
        h, logits, decoder = self._forward(rows, x, cache, positions, mask)
        longest = 0
        for i, (row, draft) in enumerate(zip(rows, drafts)):
            n = len(inputs[i])
            path, new = _accept_path(inputs[i], logits[i, :n], draft, row.sampling, row.generator)
            if row.drafter is not None:
                row.drafter.observe(inputs[i], logits[i, :n], path)
                if row.adaptive is not None:
                    row.adaptive.update(draft, len(path) - 1)
            self._keep(i, start, path)
            longest = max(longest, len(path))
            row.h_prev = h[i, path[-1]]
            row.decoder_start = decoder.row(i * width + path[-1]) if decoder is not None else None
            self.stats.draft_tokens += len(draft)
            self.stats.accepted_tokens += len(path) - 1
            self._emit(row, new, logits[i], path, events)
        cache.length = start + longest
        return draft_time

    def _keep(self, i: int, start: int, path: list[int]) -> None:
        """Row i's accepted nodes (slots start + path) become its slots start.. in order; the rest are holes."""
        cache, valid = self.cache, self.valid
        n = len(path)
        if path != list(range(n)):
            src = torch.tensor(path, device=valid.device) + start  # type: ignore[union-attr]  # the pools and views exist once a row has joined
            cache.k[:, i, :, start : start + n] = cache.k[:, i, :, src]  # type: ignore[union-attr,index]  # the pools and views exist once a row has joined
            cache.v[:, i, :, start : start + n] = cache.v[:, i, :, src]  # type: ignore[union-attr,index]  # the pools and views exist once a row has joined
        valid[i, start : start + n] = True  # type: ignore[index]  # the pools and views exist once a row has joined
        self.rows[i].length += n

    def _emit(
        self, row: Row, new: list[int], logits: torch.Tensor, path: list[int], events: list[tuple[Row, list[int]]]
    ) -> None:
        """Add a step's new tokens to a row (cut at EOS and at its budget) and record whether it has finished."""
        eos = self.eos_id if row.config.stop_at_eos else None
        if eos is not None and eos in new:
            new = new[: new.index(eos) + 1]
        new = new[: row.budget - len(row.out)]
        if row.config.logprobs is not None:
            row.logprobs += _logprobs(logits[path[: len(new)]], new, row.config.logprobs)
        row.out += new
        self.stats.new_tokens += len(new)
        if eos is not None and new and new[-1] == eos:
            row.finish_reason = "stop"
        elif len(row.out) >= row.budget:
            row.finish_reason = "length"
        events.append((row, new))


def _logprobs(logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """Each token's log-probability under logits (one row each) and the `top` most likely alternatives."""
    logp = logits.float().log_softmax(-1)
    chosen = logp.gather(1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()
    best = logp.topk(top, dim=-1)
    alts = [list(zip(i, v)) for i, v in zip(best.indices.tolist(), best.values.tolist())]
    return [TokenLogprob(token, lp, alt) for token, lp, alt in zip(tokens, chosen, alts)]


# --- the session's usual callers ----------------------------------------------------------------------------
def as_config(
    config: GenerationConfig | int | None = None,
    sampling: Sampling | None = None,
    options: dict[str, Any] | None = None,
) -> GenerationConfig:
    """generate's arguments as one GenerationConfig: a config, or max_new_tokens [+ Sampling] [+ its fields]."""
    options = dict(options or {})
    if isinstance(config, GenerationConfig):
        return config.replace(**options) if options else config
    if sampling is not None:
        options = {**asdict(sampling), **options}
    if config is not None:
        options["max_new_tokens"] = config
    try:
        return GenerationConfig(**options)
    except TypeError as e:
        raise FtplmError(str(e).replace("__init__()", "generate()")) from None


def _row_seed(seed: int | None, r: int) -> int | None:
    """Row r's seed in a batch generated with one seed (row 0 keeps it: batch 1 equals `generate`)."""
    return None if seed is None else (seed + r * 0x9E3779B97F4A7C15) % 2**63


@torch.inference_mode()
def generate_batch(
    model: LanguageModel,
    prompts: list[list[int]],
    config: GenerationConfig | int | None = None,
    sampling: Sampling | None = None,
    *,
    eos_id: int | None = None,
    stats: SpecStats | None = None,
    drafter: Drafter | None = None,
    session: DecodeSession | None = None,
    **options: Any,
) -> list[list[int]]:
    """New token ids for prompts of any lengths, generated together: a list per prompt, ending at its EOS when one
    was produced (eos_id). `config` is a GenerationConfig, or max_new_tokens with an optional Sampling and any
    GenerationConfig field as a keyword (speculative="ftp", seed=0, ...); drafter = a Drafter instance to use (and
    keep learning across calls); session = an idle session to run in. Row r samples with
    its own seed derived from (seed, r)."""
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, list) for p in prompts):
        raise FtplmError("prompts must be a non-empty list of token-id lists")
    if any(not p for p in prompts):
        raise FtplmError("a prompt is empty")
    if drafter is not None and isinstance(options.get("speculative"), Drafter):
        raise FtplmError("give the drafter once")
    if isinstance(options.get("speculative"), Drafter):  # a drafter instance for the name's place
        drafter = options.pop("speculative")
    adaptive = bool(options.pop("adaptive", False)) if drafter is not None else None  # the instance's, not a name's
    config = as_config(config, sampling, options)
    if session is None:
        session = DecodeSession(model, eos_id, stats)
    elif session.active:
        raise FtplmError("the session is busy with other rows")
    rows = [
        session.add(p, config.replace(seed=_row_seed(config.seed, r)), drafter, adaptive) for r, p in enumerate(prompts)
    ]
    for _ in session.run():
        pass
    return [row.out for row in rows]


@torch.inference_mode()
def generate(
    model: LanguageModel,
    idx: torch.Tensor,
    config: GenerationConfig | int | None = None,
    sampling: Sampling | None = None,
    *,
    eos_id: int | None = None,
    stats: SpecStats | None = None,
    drafter: Drafter | None = None,
    **options: Any,
) -> torch.Tensor:
    """idx (B, T) -> (B, T + n): `generate_batch` on a tensor. Rows that stop at EOS before the others are padded
    with eos_id. Generation stops at the context length (no sliding window: positions are learned)."""
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2:
        raise FtplmError("idx must be a (batch, time) tensor of token ids")
    rows = generate_batch(model, idx.tolist(), config, sampling, eos_id=eos_id, stats=stats, drafter=drafter, **options)
    width = max(len(r) for r in rows)
    pad = eos_id if eos_id is not None else 0  # rows only differ in length when they ended with EOS
    new = torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=idx.dtype, device=idx.device)
    return torch.cat([idx, new.view(idx.size(0), width)], dim=1)
