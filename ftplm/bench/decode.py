"""`ftplm bench decode RUN`: plain KV-cache decoding vs lossless speculative decoding, measured side by side.

Held-out prompts (the run's validation documents, never trained on), batch 1 (or --batch-size: prompts generated
together, by every method), a fixed number of new tokens (no stop at EOS, so every method produces exactly the
same number of tokens), fp32 weights under inference_mode for every method. After one warm-up generation per
method, the methods run interleaved prompt by prompt (batch by batch; the order rotates) so that machine noise hits
them alike. Per method and mode (greedy, temperature 1):
tokens/s, speedup = plain wall time / method wall time over the same prompts, τ (tokens per target forward, bonus
and prefill included), the share of time spent drafting, for greedy whether the output equals plain's, how much
the output repeats itself (the share of new tokens completing a 4-gram seen before: copy drafters thrive on it),
and a profile per target forward (trunk, target logits, drafting, the rest).

`oracle-K` (greedy only) is a ceiling, not a method: a drafter that proposes the next K tokens of plain greedy
decoding's own output, at no cost. Every draft is accepted, so it shows what verification alone allows on this
machine: no drafter whose drafts are at most K deep, however good or cheap, can beat it (oracle-3 bounds the own
drafts of an N = 4 FTP model, chain or tree).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import torch

from ftplm.api import load
from ftplm.checkpoint import run_data_dir
from ftplm.data import TokenData
from ftplm.drafters import Draft, DraftContext, Drafter, get_drafter
from ftplm.drafters.ftp import draft_decoder
from ftplm.drafters.lookup import trie
from ftplm.errors import FtplmError
from ftplm.generate import Sampling, SpecStats, generate
from ftplm.kernels import inference_products
from ftplm.machine import provenance

# method -> (drafter, tree, adaptive draft length)
FTP_METHODS = {"plain": (None, None, False), "ftp": ("ftp", False, False), "ftp-adaptive": ("ftp", False, True),
               "ftp-tree": ("ftp", True, False), "ftp-recycling": ("ftp-recycling", None, False),
               "ftp-lookup": ("ftp-lookup", None, False),
               "recycling": ("recycling", None, False), "recycling-adaptive": ("recycling", None, True),
               "lookup": ("lookup", None, False)}  # fmt: skip
GPT_METHODS = {k: v for k, v in FTP_METHODS.items() if v[0] is None or not v[0].startswith("ftp")}
ORACLE = re.compile(r"oracle-([1-9][0-9]*)")


class Oracle(Drafter):
    """Drafts what plain greedy decoding produced after the same prompt (not registered: a benchmark ceiling).
    `answers` maps a prompt to its greedy continuation; a draft costs a list slice."""

    def __init__(self, model, draft_len: int, answers: dict[tuple[int, ...], list[int]]) -> None:
        super().__init__(model, draft_len)
        self.answers = answers
        self.prompt_tokens = len(next(iter(answers)))

    def propose(self, ctx: DraftContext) -> Draft:
        answer = self.answers[tuple(ctx.tokens[: self.prompt_tokens])]
        done = len(ctx.tokens) - self.prompt_tokens  # new tokens so far, the root included
        return trie([answer[done : done + self.draft_len]], ctx)  # one continuation: a chain


def heldout_prompts(run: str | Path, encode, n: int, prompt_tokens: int) -> list[list[int]]:
    """The first prompt_tokens tokens of the first n validation documents long enough to have them."""
    data_dir = run_data_dir(run)
    if data_dir is None:
        raise FtplmError(
            f"{run}: its training data directory is unknown or gone; bench decode needs its held-out documents"
        )
    prompts = []
    for doc in TokenData(data_dir).iter_heldout("val"):
        ids = encode(doc.text)
        if len(ids) >= prompt_tokens:
            prompts.append(ids[:prompt_tokens])
            if len(prompts) == n:
                break
    if not prompts:
        raise FtplmError(f"{data_dir}: no validation document has {prompt_tokens} tokens")
    return prompts


def profile(records: list[dict[str, Any]], seconds: float, forwards: int) -> dict[str, float]:
    """Where the time goes, in ms per target forward: the trunk's forwards (verification), the target logits
    (FTP: the decoder's first step), drafting, and the rest (sampling and acceptance, cache roll-back, Python)."""
    if not forwards:
        return {}
    parts = {name: sum(r.get(f"{name}_time", 0.0) for r in records) for name in ("trunk", "target", "draft")}
    ms = {name: 1e3 * t / forwards for name, t in parts.items()}
    return {
        "total": 1e3 * seconds / forwards,
        "trunk": ms["trunk"],
        "targets": ms["target"],
        "draft": ms["draft"],
        "other": 1e3 * (seconds - sum(parts.values())) / forwards,
    }


def repeated_share(prompt: list[int], new: list[int], n: int = 4) -> float:
    """The share of new tokens that complete an n-gram already seen earlier in the prompt or the output: how much
    the text loops, which is what copy drafters (prompt lookup, Token Recycling) live on."""
    text = list(prompt)
    seen = {tuple(text[i : i + n]) for i in range(len(text) - n + 1)}
    repeats = 0
    for token in new:
        text.append(token)
        gram = tuple(text[-n:])
        if len(gram) == n:
            repeats += gram in seen
            seen.add(gram)
    return repeats / len(new) if new else 0.0


def _rows(record: dict[str, Any]) -> tuple[list[int], list[list[int]]]:
    """A record's prompt indices and their new tokens (a record is one generation: a prompt, or a batch of them)."""
    if "rows" in record:
        return record["rows"], record["tokens"]
    return [record["prompt"]], [record["tokens"]]


def summarize(
    records: list[dict[str, Any]], prompts: list[list[int]] | None = None
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per mode and method: totals over generations (a record's "prompt" indexes a generation: a prompt, or with
    "rows" a batch), tokens/s, speedup over plain (same prompts), τ, lossless, and (given the prompts) the share of
    repeated 4-grams in the output."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for mode in dict.fromkeys(r["mode"] for r in records):
        rows = [r for r in records if r["mode"] == mode]
        plain = {r["prompt"]: r for r in rows if r["method"] == "plain"}
        plain_seconds = sum(r["seconds"] for r in plain.values())
        out[mode] = {}
        for method in dict.fromkeys(r["method"] for r in rows):
            mine = [r for r in rows if r["method"] == method]
            seconds = sum(r["seconds"] for r in mine)
            tokens = sum(r["new_tokens"] for r in mine)
            forwards = sum(r["target_forwards"] for r in mine)
            entry = {
                "prompts": sum(len(_rows(r)[0]) for r in mine),
                "new_tokens": tokens,
                "seconds": seconds,
                "tokens_per_s": tokens / seconds if seconds else 0.0,
                "speedup": plain_seconds / seconds if seconds and plain else None,
                "tau": tokens / forwards if forwards else 0.0,
                "target_forwards": forwards,
                "draft_share": sum(r["draft_time"] for r in mine) / seconds if seconds else 0.0,
                "profile_ms_per_forward": profile(mine, seconds, forwards),
            }
            if prompts is not None:
                shares = [repeated_share(prompts[i], tokens) for r in mine for i, tokens in zip(*_rows(r))]
                entry["repeated_4grams"] = sum(shares) / len(shares)
            if mode == "greedy" and plain:
                entry["lossless"] = sum(r["tokens"] == plain[r["prompt"]]["tokens"] for r in mine) / len(mine)
            out[mode][method] = entry
    return out


def checked_methods(methods: list[str] | None, available: dict[str, Any], model_type: str) -> list[str]:
    """The methods asked for (default: all that apply to the model), plain first: plain is every speedup's base."""
    methods = methods or list(available)
    unknown = [m for m in methods if m not in available and not ORACLE.fullmatch(m)]
    if unknown:
        raise FtplmError(
            f"unknown method(s) for a {model_type} model: {', '.join(unknown)}; choose from "
            f"{', '.join(available)}, oracle-K (K >= 1)"
        )
    return methods if "plain" in methods else ["plain", *methods]


def fit_context(block_size: int, prompt_tokens: int | None, max_new_tokens: int | None) -> tuple[int, int]:
    """Prompt and new-token counts that fit the context. Defaults: 64 prompt tokens and 128 new ones, or a quarter
    and the rest of a shorter context; a prompt too long for the new tokens asked for is shortened."""
    if prompt_tokens is None:
        prompt_tokens = min(64, block_size // 4)
    if max_new_tokens is None:
        max_new_tokens = min(128, block_size - prompt_tokens)
    if prompt_tokens + max_new_tokens > block_size:
        prompt_tokens = max(1, block_size - max_new_tokens)
    if prompt_tokens + max_new_tokens > block_size:
        raise FtplmError(f"--max-new-tokens {max_new_tokens} does not fit the context of {block_size} tokens")
    return prompt_tokens, max_new_tokens


def print_results(results: dict[str, dict[str, Any]]) -> None:
    """The speed table, then where each method's time goes."""
    print(
        f"{'mode':8} {'method':18} {'tok/s':>8} {'speedup':>8} {'tau':>6} {'draft%':>7} {'lossless':>9} {'repeats':>8}"
    )
    for mode, per_method in results.items():
        for method, r in per_method.items():
            lossless = f"{r['lossless']:.0%}" if "lossless" in r else "-"
            print(
                f"{mode:8} {method:18} {r['tokens_per_s']:8.1f} {r['speedup']:7.2f}x {r['tau']:6.2f} "
                f"{r['draft_share']:7.1%} {lossless:>9} {r['repeated_4grams']:8.0%}"
            )
    print(
        "where the time goes, ms per target forward (trunk = verification forwards, targets = next-token logits, "
        "other = acceptance, cache, Python):"
    )
    print(f"{'mode':8} {'method':18} {'total':>7} {'trunk':>7} {'targets':>7} {'draft':>7} {'other':>7}")
    for mode, per_method in results.items():
        for method, r in per_method.items():
            p = r["profile_ms_per_forward"]
            print(
                f"{mode:8} {method:18} "
                + " ".join(f"{p[k]:7.2f}" for k in ("total", "trunk", "targets", "draft", "other"))
            )


def bench_decode(
    run: str | Path,
    prompts: int = 8,
    max_new_tokens: int | None = None,
    prompt_tokens: int | None = None,
    methods: list[str] | None = None,
    temperatures: tuple[float, ...] = (0.0, 1.0),
    seed: int = 0,
    threads: int | None = None,
    batch_size: int = 1,
) -> dict[str, Any]:
    if prompts < 1 or batch_size < 1 or any(n is not None and n < 1 for n in (max_new_tokens, prompt_tokens)):
        raise FtplmError("--prompts, --max-new-tokens, --prompt-tokens and --batch-size must be positive")
    samplings = {t: Sampling(t) for t in dict.fromkeys(temperatures)}  # bad temperatures fail before any work
    if threads is not None:
        if threads < 1:
            raise FtplmError("--threads must be positive")
        torch.set_num_threads(threads)
    tm = load(run)
    model = tm.model.float().eval()
    available = FTP_METHODS if model.cfg.model_type == "ftp" else GPT_METHODS
    methods = checked_methods(methods, available, model.cfg.model_type)
    prompt_tokens, max_new_tokens = fit_context(model.cfg.block_size, prompt_tokens, max_new_tokens)
    texts = heldout_prompts(run, tm.encode, prompts, prompt_tokens)
    # one drafter per method for the whole benchmark (Token Recycling's matrix carries over between prompts)
    drafters: dict[str, Drafter | None] = {}
    for method in methods:
        if method not in available:  # oracle-K: built below, once plain greedy decoding has given its answers
            continue
        name, tree, _ = available[method]
        drafters[method] = get_drafter(name, model, tree=tree) if name else None

    def one(method: str, rows: list[int], n: int, sampling: Sampling, seed: int) -> dict[str, Any]:
        stats = SpecStats()
        idx = torch.tensor([texts[i] for i in rows])
        t0 = time.perf_counter()
        adaptive = method in available and available[method][2]
        out = generate(model, idx, n, sampling, seed=seed, speculative=drafters[method], adaptive=adaptive, stats=stats)
        seconds = time.perf_counter() - t0
        return {
            "seconds": seconds,
            "new_tokens": stats.new_tokens,
            "target_forwards": stats.target_forwards,
            "draft_time": stats.draft_time,
            "trunk_time": stats.trunk_time,
            "target_time": stats.target_time,
            "rows": rows,
            "tokens": out[:, idx.size(1) :].tolist(),
        }

    batches = [list(range(i, min(i + batch_size, len(texts)))) for i in range(0, len(texts), batch_size)]
    oracles = [m for m in methods if m not in available]
    with torch.inference_mode():
        if oracles:
            answers = {
                tuple(texts[i]): tokens
                for rows in batches
                for i, tokens in zip(rows, one("plain", rows, max_new_tokens, Sampling(0), seed)["tokens"])
            }
            for method in oracles:
                drafters[method] = Oracle(model, int(ORACLE.fullmatch(method).group(1)), answers)  # type: ignore[union-attr]  # oracles are the methods ORACLE matched
        for method in methods:  # warm-up
            one(method, batches[0], min(16, max_new_tokens), Sampling(0), seed)
        records = []
        for temperature, sampling in samplings.items():
            mode = "greedy" if temperature == 0 else f"T={temperature:g}"
            active = [m for m in methods if mode == "greedy" or m not in oracles]  # an oracle knows greedy answers only
            for i, rows in enumerate(batches):
                order = active[i % len(active) :] + active[: i % len(active)]
                for method in order:
                    rec = one(method, rows, max_new_tokens, sampling, seed + i)
                    records.append({"mode": mode, "method": method, "prompt": i, **rec})
    results = summarize(records, texts)
    products = inference_products(model.device)  # figures before and after oneDNN packing differ ~2x
    # the FTP drafter's large products may run in bf16, its greedy drafts among the first ids only (drafts need not
    # be exact)
    draft_products = draft_greedy_vocab = None
    drafts = ""
    if model.cfg.model_type == "ftp":
        decoder = draft_decoder(model)
        draft_products, draft_greedy_vocab = str(decoder.product_dtype).removeprefix("torch."), decoder.greedy_vocab
        drafts = f", FTP drafts with {draft_products} products, greedy ones among the first {draft_greedy_vocab} ids"
    print(
        f"bench decode {run}: {model.cfg.model_type} model, {len(texts)} held-out prompts x {prompt_tokens} tokens, "
        f"{max_new_tokens} new tokens, batch {batch_size}, fp32 ({products} products{drafts}), "
        f"{torch.get_num_threads()} threads"
    )
    print_results(results)
    return {
        "run": str(run),
        "model_type": model.cfg.model_type,
        "prompts": len(texts),
        "prompt_tokens": prompt_tokens,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "dtype": "fp32",
        "products": products,
        "draft_products": draft_products,
        "draft_greedy_vocab": draft_greedy_vocab,
        "threads": torch.get_num_threads(),
        **provenance(),
        "results": results,
    }
