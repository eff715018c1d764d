"""Sampling, plain autoregressive generation with a KV cache, and lossless speculative generation.

FTP's p(x_{t+1} | x_<=t) is its decoder's first output: the trunk runs incrementally with its KV cache, and each new
state vector h_t is decoded for one token. `--temperature 0` means greedy everywhere.

Speculative generation (`speculative_generate`, or `generate(..., speculative=NAME)`): a drafter (ftplm.drafters)
proposes a token tree after the last accepted token; ONE trunk forward verifies the root and every draft node
through the KV cache (a tree attention mask and depth-based positions for trees); the target distribution at each
node is model.next_token_logits there. Greedy: the longest path whose tokens equal the argmax at their parent;
sampling: the speculative-sampling rule (accept x ~ q with prob min(1, p/q), else continue from the residual
norm(max(0, p - q))), then a bonus token from the last node's (residual) distribution, so the output is exactly
distributed as plain sampling. The cache is cut back to the accepted path (copied into contiguous slots for trees).
A batch is verified together, one trunk forward per round, each row accepting its own number of drafts
(`_speculative_batch`: holes in a shared cache, masked); batch 1 runs without masks (`_speculative_row`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from ftplm.errors import FtplmError
from ftplm.model import KVCache, LanguageModel

if TYPE_CHECKING:
    from ftplm.drafters import Draft, Drafter, Template


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
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1):
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

    def sample(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One token per row of logits (B, V) -> (B,)."""
        if self.greedy:
            return logits.argmax(-1)
        return self.draw(self.probs(logits), generator)[..., 0]

    @staticmethod
    def draw(probs: torch.Tensor, generator: torch.Generator | None = None, n: int = 1) -> torch.Tensor:
        """n independent draws (with replacement) from each row of probs (V,) or (B, V) -> (n,) or (B, n).

        For a single draw torch.multinomial races one exponential variate per vocabulary entry (0.22 ms for 8,192
        on our CPU, a tenth of a decode step); with replacement and two or more draws it inverts the CDF (7 us). So a
        single draw is the first of two: the same distribution, 30x faster."""
        return torch.multinomial(probs, max(n, 2), replacement=True, generator=generator)[..., :n]


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def check_budget(model: LanguageModel, prompt_len: int, max_new_tokens: int) -> int:
    """Validate lengths; returns how many tokens can actually be generated within the context."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise FtplmError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if prompt_len == 0:
        raise FtplmError("the prompt is empty")
    block = model.cfg.block_size
    if prompt_len >= block and max_new_tokens > 0:
        raise FtplmError(f"prompt of {prompt_len} tokens leaves no room in the model's context of {block} tokens")
    return min(max_new_tokens, block - prompt_len)


class _Clock:
    """Splits verification time into the trunk's forwards and the target logits (perf_counter: host time; on CUDA
    the split is only exact with CUDA_LAUNCH_BLOCKING=1, since kernels run asynchronously)."""

    def __init__(self) -> None:
        self.trunk_time = self.target_time = 0.0

    def _timed(self, part: str, fn: Callable[..., Any], *args: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args)
        setattr(self, part, getattr(self, part) + time.perf_counter() - t0)
        return out

    def trunk(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self._timed("trunk_time", fn, *args)

    def targets(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self._timed("target_time", fn, *args)

    def settle(self, stats: SpecStats, new_tokens: int, forwards: int, draft_time: float, started: float) -> None:
        """Add a generation's counts and times (since `started`) to stats."""
        total = time.perf_counter() - started
        stats.new_tokens += new_tokens
        stats.target_forwards += forwards
        stats.draft_time += draft_time
        stats.verify_time += total - draft_time
        stats.total_time += total
        stats.trunk_time += self.trunk_time
        stats.target_time += self.target_time


def _targets(model: LanguageModel, drafter: "Drafter", clock: _Clock) -> Callable[..., tuple[torch.Tensor, Any]]:
    """h (B, T, C), x (B, T) -> next-token logits (B, T, V) at the fed positions, and, for drafters that continue
    from it, the FTP decoder's state after that first step (else None)."""
    if drafter.wants_decoder_start and hasattr(model, "first_decoder_step"):
        return lambda h, x: clock.targets(model.first_decoder_step, h, x)
    return lambda h, x: (clock.targets(model.next_token_logits, h, x), None)


@torch.inference_mode()
def generate(
    model: LanguageModel,
    idx: torch.Tensor,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    seed: int | None = None,
    eos_id: int | None = None,
    speculative: "str | Drafter | None" = None,
    draft_len: int | None = None,
    tree: "bool | Template | None" = None,
    stats: "SpecStats | None" = None,
    adaptive: bool = False,
) -> torch.Tensor:
    """KV-cache generation. idx (B, T) -> (B, T + n) with n <= max_new_tokens.

    Generation stops at the context length (no sliding window: positions are learned) and, when eos_id is given,
    once every row has produced it (finished rows are padded with eos_id). speculative = a drafter name ("ftp",
    "ftp-lookup", "recycling", ...: ftplm.drafters) or a Drafter gives the same tokens (greedy) / the same
    distribution (sampling), faster; adaptive = pick each round's draft length from the acceptances so far; `stats`
    collects τ, target forwards and timings.
    """
    if speculative not in (None, "none"):
        return speculative_generate(
            model, idx, max_new_tokens, sampling, seed, eos_id, speculative, draft_len, tree, stats, adaptive
        )
    if adaptive:
        raise FtplmError("adaptive draft length needs a speculative drafter (speculative='ftp', 'recycling', ...)")
    if draft_len is not None and (isinstance(draft_len, bool) or not isinstance(draft_len, int) or draft_len <= 0):
        raise FtplmError(f"draft_len must be a positive integer, got {draft_len!r}")
    if idx.dim() != 2:
        raise FtplmError("idx must be a (batch, time) tensor of token ids")
    n_new = check_budget(model, idx.size(1), max_new_tokens)
    started = time.perf_counter()
    model.eval()
    generator = make_generator(seed, idx.device)
    cache = model.new_cache()
    clock = _Clock()
    h = clock.trunk(model.state_vectors, idx, cache)
    logits = clock.targets(model.next_token_logits, h[:, -1:], idx[:, -1:])[:, -1]
    finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    out = [idx]
    for i in range(n_new):
        nxt = sampling.sample(logits, generator)
        if eos_id is not None:
            nxt = nxt.masked_fill(finished, eos_id)
            finished |= nxt == eos_id
        out.append(nxt[:, None])
        if i == n_new - 1 or (eos_id is not None and bool(finished.all())):
            break
        h = clock.trunk(model.state_vectors, nxt[:, None], cache)
        logits = clock.targets(model.next_token_logits, h, nxt[:, None])[:, -1]
    tokens = torch.cat(out, dim=1)
    if stats is not None:
        new_tokens, forwards = (tokens.size(1) - idx.size(1)) * idx.size(0), max(len(out) - 1, 0) * idx.size(0)
        clock.settle(stats, new_tokens, forwards, 0.0, started)
    return tokens


# ------------------------------------------------------------------------------------------------------
# speculative generation
# ------------------------------------------------------------------------------------------------------
@dataclass
class SpecStats:
    """Bookkeeping of generations (summed over rows and calls). τ = new tokens per target forward, bonus included,
    prefill included (plain decoding has τ = 1.00), as in Spec-Bench."""

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


def _draft_mask(draft: "Draft", width: int) -> torch.Tensor:
    """(width, width) attention among root + draft nodes: each sees its ancestors and itself; padding up to width
    sees only itself (a query that sees nothing would give NaN) and nobody sees padding."""
    mask = torch.eye(width, dtype=torch.bool)
    ancestors: list[list[int]] = [[0]]
    for i, parent in enumerate(draft.parents, start=1):
        ancestors.append(ancestors[parent + 1] + [i])
    for i, anc in enumerate(ancestors):
        mask[i, anc] = True
    return mask


def _tree_inputs(draft: "Draft", start: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (start + depth) and the attention mask (T, start + T) of root + draft nodes: each node sees the
    cache and its own ancestors."""
    positions = torch.tensor([start + d for d in [0] + draft.depths()], device=device)
    T = len(positions)
    mask = torch.cat([torch.ones(T, start, dtype=torch.bool), _draft_mask(draft, T)], dim=1)
    return positions, mask.to(device)


def _accept_path(
    inputs: list[int], logits: torch.Tensor, draft: "Draft", sampling: Sampling, generator: torch.Generator
) -> tuple[list[int], list[int]]:
    """Walk the verified tree from the root: (indices into inputs of the accepted path incl. root 0, new tokens
    = accepted draft tokens + the bonus token)."""
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


def _keep_path(cache: KVCache, start: int, path: list[int]) -> None:
    """Roll the cache back to the accepted path: its entries (slots start + path) become slots start.. contiguous."""
    n = len(path)
    if path != list(range(n)) and cache.k is not None:
        src = torch.tensor(path, device=cache.k.device) + start
        cache.k[:, :, :, start : start + n] = cache.k[:, :, :, src]
        cache.v[:, :, :, start : start + n] = cache.v[:, :, :, src]
    cache.length = start + n


def _speculative_row(
    model: LanguageModel, prompt: list[int], n_new: int, sampling: Sampling, generator: torch.Generator,
    eos_id: int | None, drafter: "Drafter", stats: SpecStats,
) -> list[int]:
    """New tokens for one prompt. Invariant: the cache holds every token but the last accepted one (the root)."""
    from ftplm.drafters import DraftContext

    if n_new == 0:
        return []
    started = time.perf_counter()
    device, block = model.device, model.cfg.block_size
    clock = _Clock()
    targets = _targets(model, drafter, clock)

    cache = model.new_cache()
    x = torch.tensor([prompt], device=device)
    h = clock.trunk(model.state_vectors, x, cache)
    logits, decoder = targets(h[:, -1:], x[:, -1:])
    logits = logits[0]
    drafter.observe(prompt[-1:], logits, [0])
    out = [int(sampling.sample(logits, generator)[0])]
    h_prev, decoder_start = h[0, -1], decoder.row(0) if decoder else None
    forwards = 1
    draft_time = 0.0
    while len(out) < n_new and out[-1] != eos_id:
        tokens = prompt + out
        t0 = time.perf_counter()
        max_depth, max_nodes = n_new - len(out) - 1, block - len(tokens)
        if drafter.adaptive is not None:
            max_depth = min(max_depth, drafter.adaptive.depth())
        ctx = DraftContext(tokens, h_prev, max_depth, max_nodes, sampling, generator, decoder_start)
        draft = drafter.propose(ctx).truncated(max_depth, max_nodes)
        draft_time += time.perf_counter() - t0
        start = cache.length  # == len(tokens) - 1
        inputs = [tokens[-1]] + draft.tokens
        x = torch.tensor([inputs], device=device)
        if draft.is_chain():
            h = clock.trunk(model.state_vectors, x, cache)
        else:
            positions, mask = _tree_inputs(draft, start, device)
            h = clock.trunk(model.state_vectors, x, cache, positions, mask)
        logits, decoder = targets(h, x)
        logits = logits[0]
        path, new = _accept_path(inputs, logits, draft, sampling, generator)
        _keep_path(cache, start, path)
        drafter.observe(inputs, logits, path)
        if drafter.adaptive is not None:
            drafter.adaptive.update(draft, len(path) - 1)
        h_prev, decoder_start = h[0, path[-1]], decoder.row(path[-1]) if decoder else None
        forwards += 1
        stats.draft_tokens += len(draft)
        stats.accepted_tokens += len(path) - 1
        if eos_id is not None and eos_id in new:
            new = new[: new.index(eos_id) + 1]
        out.extend(new)
    out = out[:n_new]
    clock.settle(stats, len(out), forwards, draft_time, started)
    return out


def _compact(cache: KVCache, valid: torch.Tensor, lengths: list[int]) -> None:
    """Move each row's valid cache slots to the front (in order), so that the shared write position starts again
    after the longest row."""
    for r, n in enumerate(lengths):
        slots = valid[r].nonzero().squeeze(1)
        cache.k[:, r, :, :n] = cache.k[:, r, :, slots]  # type: ignore[index]
        cache.v[:, r, :, :n] = cache.v[:, r, :, slots]  # type: ignore[index]
        valid[r] = False
        valid[r, :n] = True
    cache.length = max(lengths)


def _speculative_batch(
    model: LanguageModel, prompts: list[list[int]], n_new: int, sampling: Sampling, generator: torch.Generator,
    eos_id: int | None, drafter: "Drafter", stats: SpecStats,
) -> list[list[int]]:
    """New tokens for several prompts (of any lengths), verified together: one trunk forward per round for the batch.

    Rows accept different numbers of drafts, so rather than keeping each row's cache contiguous, every round writes
    all rows' inputs at the same cache slots and each row keeps a mask of the slots it accepted (its positions count
    only those): rejected drafts and padding are holes that attention never sees. When the shared slots run out,
    each row's accepted slots are moved to the front (`_compact`). Finished rows leave the batch. Shorter prompts
    are padded on the left at the prefill, the padding being holes like the others. Drafts are proposed per row
    (`Drafter.propose_batch`: the FTP chain drafts every row in one decoder step per depth).
    Invariant, as for one row: the cache holds every token of a row but its last accepted one (the root)."""
    from ftplm.drafters import DraftContext

    started = time.perf_counter()
    device, block = model.device, model.cfg.block_size
    clock = _Clock()
    targets = _targets(model, drafter, clock)

    capacity = 2 * block  # room for holes: compaction happens at most every block tokens of writes
    cache = KVCache(model.cfg.n_layer, capacity)
    width = max(len(p) for p in prompts)
    pads = [width - len(p) for p in prompts]  # prompts of different lengths are padded on the left
    x = torch.tensor([p[:1] * pad + p for p, pad in zip(prompts, pads)], device=device)
    valid = torch.zeros(len(prompts), capacity, dtype=torch.bool, device=device)
    for r, pad in enumerate(pads):
        valid[r, pad:width] = True
    if any(pads):
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        mask = (causal & valid[:, None, :width]) | torch.eye(width, dtype=torch.bool, device=device)
        positions = (torch.arange(width, device=device) - torch.tensor(pads, device=device)[:, None]).clamp(min=0)
        h = clock.trunk(model.state_vectors, x, cache, positions, mask[:, None])
    else:
        h = clock.trunk(model.state_vectors, x, cache)
    logits, decoder = targets(h[:, -1:], x[:, -1:])
    first = sampling.sample(logits[:, 0], generator).tolist()
    for r, prompt in enumerate(prompts):
        drafter.observe(prompt[-1:], logits[r], [0])
    rows = list(range(len(prompts)))  # the batch's rows, as indices into prompts
    outs: list[list[int]] = [[t] for t in first]
    lengths = [len(p) for p in prompts]  # tokens in the cache per row
    h_prev = [h[r, -1] for r in rows]
    starts = [decoder.row(r) if decoder else None for r in rows]
    forwards, draft_time = len(prompts), 0.0

    def done(r: int) -> bool:
        return len(outs[r]) >= n_new or outs[r][-1] == eos_id

    while True:
        active = [i for i, r in enumerate(rows) if not done(r)]
        if not active:
            break
        if len(active) < len(rows):  # finished rows leave the batch
            index = torch.tensor(active, device=device)
            cache, valid = cache.select(index), valid[index]
            rows, lengths = [rows[i] for i in active], [lengths[i] for i in active]
            h_prev, starts = [h_prev[i] for i in active], [starts[i] for i in active]
        t0 = time.perf_counter()
        ctxs = []
        for i, r in enumerate(rows):
            tokens = prompts[r] + outs[r]
            max_depth, max_nodes = n_new - len(outs[r]) - 1, block - len(tokens)
            if drafter.adaptive is not None:
                max_depth = min(max_depth, drafter.adaptive.depth())
            ctxs.append(DraftContext(tokens, h_prev[i], max_depth, max_nodes, sampling, generator, starts[i]))
        drafts = [d.truncated(c.max_depth, c.max_nodes) for d, c in zip(drafter.propose_batch(ctxs), ctxs)]
        draft_time += time.perf_counter() - t0
        width = 1 + max(len(d) for d in drafts)
        if cache.length + width > capacity:
            _compact(cache, valid, lengths)
        start = cache.length
        inputs = [[c.tokens[-1]] + d.tokens for c, d in zip(ctxs, drafts)]
        x = torch.tensor([row + [row[0]] * (width - len(row)) for row in inputs], device=device)
        positions = [[n + depth for depth in [0] + d.depths()] + [n] * (width - 1 - len(d))
                     for d, n in zip(drafts, lengths)]
        among = torch.stack([_draft_mask(d, width) for d in drafts]).to(device)
        mask = torch.cat([valid[:, None, :start].expand(-1, width, -1), among], dim=2)
        h = clock.trunk(model.state_vectors, x, cache, torch.tensor(positions, device=device), mask[:, None])
        logits, decoder = targets(h, x)
        for i, r in enumerate(rows):
            n = len(inputs[i])
            path, new = _accept_path(inputs[i], logits[i, :n], drafts[i], sampling, generator)
            drafter.observe(inputs[i], logits[i, :n], path)
            if drafter.adaptive is not None:
                drafter.adaptive.update(drafts[i], len(path) - 1)
            valid[i, [start + j for j in path]] = True
            lengths[i] += len(path)
            h_prev[i] = h[i, path[-1]]
            starts[i] = decoder.row(i * width + path[-1]) if decoder else None
            stats.draft_tokens += len(drafts[i])
            stats.accepted_tokens += len(path) - 1
            if eos_id is not None and eos_id in new:
                new = new[: new.index(eos_id) + 1]
            outs[r].extend(new)
        forwards += len(rows)
    outs = [out[:n_new] for out in outs]
    clock.settle(stats, sum(len(out) for out in outs), forwards, draft_time, started)
    return outs


def _as_drafter(
    model: LanguageModel, drafter: "str | Drafter", draft_len: int | None, tree: "bool | Template | None",
    adaptive: bool,
) -> "Drafter":
    """A drafter by name, or the one given (made adaptive if asked: its statistics then carry over between calls)."""
    from ftplm.drafters import Drafter, get_drafter

    if not isinstance(drafter, Drafter):
        return get_drafter(drafter, model, draft_len, tree, adaptive)
    if adaptive and drafter.adaptive is None:
        drafter.make_adaptive()
    return drafter


@torch.inference_mode()
def generate_batch(
    model: LanguageModel,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    seed: int | None = None,
    eos_id: int | None = None,
    speculative: "str | Drafter | None" = None,
    draft_len: int | None = None,
    tree: "bool | Template | None" = None,
    stats: SpecStats | None = None,
    adaptive: bool = False,
) -> list[list[int]]:
    """New token ids for prompts of any lengths, generated together (`generate`'s arguments): a list per prompt,
    ending at its EOS when one was produced. Every row may generate up to max_new_tokens within the context of
    the longest prompt. Without a drafter the rows decode one token per forward through the same masked path."""
    from ftplm.drafters import Drafter, NoDrafts

    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, list) for p in prompts):
        raise FtplmError("prompts must be a non-empty list of token-id lists")
    if any(not p for p in prompts):
        raise FtplmError("a prompt is empty")
    if speculative in (None, "none"):
        if adaptive:
            raise FtplmError("adaptive draft length needs a speculative drafter (speculative='ftp', 'recycling', ...)")
        drafter: Drafter = NoDrafts(model)
    else:
        drafter = _as_drafter(model, speculative, draft_len, tree, adaptive)  # type: ignore[arg-type]
    n_new = check_budget(model, max(len(p) for p in prompts), max_new_tokens)
    if n_new == 0:
        return [[] for _ in prompts]
    return _decode(model, prompts, n_new, sampling, seed, eos_id, drafter, stats)


def _decode(
    model: LanguageModel, prompts: list[list[int]], n_new: int, sampling: Sampling, seed: int | None,
    eos_id: int | None, drafter: "Drafter", stats: SpecStats | None,
) -> list[list[int]]:
    """Each prompt's new tokens (ending at EOS): one prompt through the mask-free path, several together."""
    model.eval()
    generator = make_generator(seed, model.device)
    stats = stats if stats is not None else SpecStats()
    drafter.begin()
    if len(prompts) == 1:
        return [_speculative_row(model, prompts[0], n_new, sampling, generator, eos_id, drafter, stats)]
    return _speculative_batch(model, prompts, n_new, sampling, generator, eos_id, drafter, stats)


@torch.inference_mode()
def speculative_generate(
    model: LanguageModel,
    idx: torch.Tensor,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    seed: int | None = None,
    eos_id: int | None = None,
    drafter: "str | Drafter" = "ftp",
    draft_len: int | None = None,
    tree: "bool | Template | None" = None,
    stats: SpecStats | None = None,
    adaptive: bool = False,
) -> torch.Tensor:
    """Lossless speculative generation, same contract as `generate`. A batch is verified in one trunk forward per
    round (`_speculative_batch`), each row accepting its own number of drafts."""
    drafter = _as_drafter(model, drafter, draft_len, tree, adaptive)
    if idx.dim() != 2:
        raise FtplmError("idx must be a (batch, time) tensor of token ids")
    n_new = check_budget(model, idx.size(1), max_new_tokens)
    rows = _decode(model, idx.tolist(), n_new, sampling, seed, eos_id, drafter, stats)
    width = max(len(r) for r in rows)
    pad = eos_id if eos_id is not None else 0  # rows only differ in length when they ended with EOS
    new = torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=idx.dtype, device=idx.device)
    return torch.cat([idx, new.view(idx.size(0), width)], dim=1)
