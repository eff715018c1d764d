"""Suite `smoothness`: how slowly do the top-layer state vectors change along the text?

Over held-out documents (val split, never trained on), each truncated to the model's context: cosine similarity of
the top-layer vectors at positions t and t + k for every t >= 8 (the first 8 positions are excluded), k = 1..32.
`adjacent_cosine` is k = 1, averaged over all (t, t+1) pairs; the curve gives k = 1..32. For GPT the top-layer
vector is the final hidden state before the LM head; for FTP it is the encoder's state vector h_t.

Raw cosines of transformer states are inflated by a shared mean direction (anisotropy), so the same numbers are
also reported after subtracting the mean state vector of the evaluated positions (`*_centered`). 95% CIs come from
a bootstrap over documents.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ftplm.data import Document, TokenData
from ftplm.errors import FtplmError
from ftplm.eval.base import EvalContext, heldout_documents, provenance, suite
from ftplm.eval.stats import bootstrap_ci

SKIP = 8  # positions excluded at the start of every document
MAX_OFFSET = 32


def offset_cosines(h: np.ndarray, max_offset: int = MAX_OFFSET, skip: int = SKIP) -> tuple[np.ndarray, np.ndarray]:
    """Sums and counts of cos(h_t, h_{t+k}) over t >= skip, for k = 1..max_offset. h: (T, C) -> two (max_offset,)."""
    hn = h / np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-12)
    sums, counts = np.zeros(max_offset), np.zeros(max_offset)
    for k in range(1, max_offset + 1):
        if len(hn) - k > skip:
            c = (hn[skip : len(hn) - k] * hn[skip + k :]).sum(1)
            sums[k - 1], counts[k - 1] = c.sum(), len(c)
    return sums, counts


@torch.no_grad()
def token_states(
    model,
    texts_ids: list[list[int]],
    batch_size: int = 16,
    reduce: Callable[[np.ndarray], Any] | None = None,
    layer: int | None = None,
) -> list[Any]:
    """Per-token top-layer vectors (T, C) of each token sequence (or those after `layer` trunk blocks), or reduce()
    of them, in right-padded batches (the trunk is causal, so the padding after a sequence cannot change its vectors)."""
    out: list[Any] = [None] * len(texts_ids)
    order = sorted(range(len(texts_ids)), key=lambda i: len(texts_ids[i]))
    model.model.eval()
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(texts_ids[i]) for i in rows)
        idx = torch.zeros(len(rows), width, dtype=torch.long, device=model.device)
        for r, i in enumerate(rows):
            idx[r, : len(texts_ids[i])] = torch.tensor(texts_ids[i])
        h = model.model.state_vectors(idx, layer=layer).float().cpu().numpy()
        for r, i in enumerate(rows):
            out[i] = h[r, : len(texts_ids[i])] if reduce is None else reduce(h[r, : len(texts_ids[i])])
    return out


def state_layer(ctx: EvalContext) -> int:
    """Which trunk layer's vectors a suite reads: `--set layer=L` (0 = embeddings), default the top (n_layer)."""
    top = ctx.model.config.n_layer
    value = ctx.options.get("layer", top)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
        raise FtplmError(f"--set layer must be an integer in 0..{top} (trunk blocks applied), got {value!r}")
    return value


def pick_documents(docs: list[Document], n: int, seed: int) -> list[Document]:
    """A seeded, order-independent choice of n documents: the same ones for every model."""
    return sorted(docs, key=lambda d: hashlib.sha256(f"{seed}:{d.doc_id}".encode()).digest())[:n]


def heldout_text(ctx: EvalContext, split: str = "val") -> tuple[list[Document], str]:
    """Held-out documents of the run's data (any corpus in it), else held-out wiki-vital articles."""
    if ctx.data_dir is not None and (ctx.data_dir / "heldout.jsonl").is_file():
        docs = TokenData(ctx.data_dir).heldout(split)
        if docs:
            return docs, f"{ctx.data_dir}/heldout.jsonl ({split})"
    return heldout_documents(ctx.data_dir, "wiki-vital", (split,))


@suite("smoothness")
def smoothness(ctx: EvalContext) -> dict[str, Any]:
    """Adjacent cosine of top-layer vectors (positions >= 8) and the offset 1..32 curve, raw and mean-centred."""
    n_docs = ctx.size("smoothness_docs", 200, 40)
    docs, source = heldout_text(ctx, ctx.options.get("smoothness_split", "val"))
    block = ctx.model.config.block_size
    encoded = [ctx.model.encode(d.text)[:block] for d in pick_documents(docs, len(docs), ctx.seed)]
    ids = [x for x in encoded if len(x) > SKIP + 1][:n_docs]
    if len(ids) < 2:
        raise FtplmError(
            f"smoothness needs at least 2 held-out documents longer than {SKIP + 1} tokens, found {len(ids)} in {source}"
        )
    layer = state_layer(ctx)
    states = token_states(ctx.model, ids, layer=layer)
    mean_vec = np.concatenate([h[SKIP:] for h in states]).mean(0)
    raw = [offset_cosines(h) for h in states]
    centred = [offset_cosines(h - mean_vec) for h in states]
    metrics: dict[str, Any] = {}
    items: dict[str, list[float]] = {}
    weights: dict[str, list[int]] = {}  # the metric is token-weighted: a document counts by its pairs
    for suffix, per_doc in (("", raw), ("_centered", centred)):
        sums = np.stack([s for s, _ in per_doc])  # (docs, K)
        counts = np.stack([c for _, c in per_doc])
        curve = sums.sum(0) / np.maximum(counts.sum(0), 1)
        doc_adj = sums[:, 0] / np.maximum(counts[:, 0], 1)
        metrics[f"adjacent_cosine{suffix}"] = {
            "value": float(curve[0]),
            "ci95": list(bootstrap_ci(doc_adj, ctx.seed, weights=counts[:, 0])),
            "n": int(counts[:, 0].sum()),
            "docs": len(states),
        }
        metrics[f"offset_curve{suffix}"] = {
            "value": curve.tolist(),
            "offsets": list(range(1, MAX_OFFSET + 1)),
            "n": counts.sum(0).astype(int).tolist(),
        }
        items[f"adjacent_cosine{suffix}"] = doc_adj.tolist()
        weights[f"adjacent_cosine{suffix}"] = counts[:, 0].astype(int).tolist()
    return {
        "suite": "smoothness",
        **provenance(ctx.run),
        "model_type": ctx.model.config.model_type,
        "n": len(states),
        "docs": source,
        "skip_positions": SKIP,
        "layer": layer,
        "metrics": metrics,
        "headline": ["adjacent_cosine", "adjacent_cosine_centered"],
        "_items": items,
        "_item_weights": weights,
    }
