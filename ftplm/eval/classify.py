"""Suite `classify`: do frozen state vectors carry the topic of a text?

Held-out labelled documents (never trained on): wiki-vital's 11 topics (the main task; "Uncategorized" dropped) and
bbc-news's 5 classes (the easy one). Each document, truncated to the model's context, gives two frozen vectors from
one trunk pass: the mean of its per-token state vectors and the last token's. A standardised logistic regression
(scikit-learn) is scored by 5-fold stratified cross-validation: accuracy mean ± std over folds. A TF-IDF + logistic
regression reference sees the same (truncated) texts on the same folds; the majority class gives chance level.
Classes with fewer documents than folds are dropped (reported).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from ftplm.errors import FtplmError
from ftplm.eval.base import EvalContext, heldout_documents, provenance, suite
from ftplm.eval.smoothness import pick_documents, state_layer, token_states

CORPORA = {"wiki-vital": "main: 11 topics", "bbc-news": "easy: 5 classes"}
DROP_LABELS = {"Uncategorized", "", None}
FOLDS = 5


def cross_validate(features: Any, labels: np.ndarray, seed: int, kind: str = "dense") -> tuple[list[float], np.ndarray]:
    """Per-fold accuracies and out-of-fold correctness of logistic regression under 5-fold stratified CV.

    kind = "dense" (standardised vectors) or "tfidf" (features are texts). The folds depend only on labels and seed,
    so every representation of the same documents is scored on the same folds.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = StratifiedKFold(FOLDS, shuffle=True, random_state=seed)
    correct = np.zeros(len(labels), dtype=bool)
    accs = []
    for train, test in folds.split(np.zeros(len(labels)), labels):
        first = TfidfVectorizer(sublinear_tf=True, min_df=2) if kind == "tfidf" else StandardScaler()
        clf = make_pipeline(first, LogisticRegression(max_iter=2000))
        take = (lambda ix: [features[i] for i in ix]) if kind == "tfidf" else (lambda ix: features[ix])
        clf.fit(take(train), labels[train])
        correct[test] = clf.predict(take(test)) == labels[test]
        accs.append(float(correct[test].mean()))
    return accs, correct


def labelled_docs(ctx: EvalContext, corpus: str, n_max: int) -> tuple[list[tuple[str, str]], str, list[str]]:
    """(text, label) of held-out documents, classes with fewer than FOLDS documents dropped (returned too)."""
    docs, source = heldout_documents(ctx.data_dir, corpus)
    docs = [d for d in pick_documents(docs, len(docs), ctx.seed) if d.label not in DROP_LABELS and d.text.strip()][
        :n_max
    ]
    counts = Counter(d.label for d in docs)
    dropped = sorted(label for label, c in counts.items() if label is not None and c < FOLDS)
    return [(d.text, d.label) for d in docs if d.label is not None and counts[d.label] >= FOLDS], source, dropped


@suite("classify")
def classify(ctx: EvalContext) -> dict[str, Any]:
    """5-fold CV topic accuracy of mean/last-pooled frozen vectors vs TF-IDF, on wiki-vital and bbc-news."""
    tm = ctx.model
    n_max = ctx.size("classify_docs", 1000, 150)
    layer = state_layer(ctx)
    metrics: dict[str, Any] = {}
    items: dict[str, list[float]] = {}
    info: dict[str, Any] = {}
    for corpus, role in CORPORA.items():
        pairs, source, dropped = labelled_docs(ctx, corpus, n_max)
        labels = np.array([label for _, label in pairs])
        if len(set(labels)) < 2:
            raise FtplmError(
                f"classify needs held-out {corpus} documents of at least 2 classes with {FOLDS}+ documents each, found {len(pairs)} docs in {source}"
            )
        ids = [tm.encode(text)[: tm.config.block_size] or [tm.eos_id or 0] for text, _ in pairs]
        pooled = token_states(tm, ids, batch_size=64, reduce=lambda h: (h.mean(0), h[-1]), layer=layer)
        features = {"mean": np.stack([m for m, _ in pooled]), "last": np.stack([x for _, x in pooled])}
        texts = [tm.decode(x) for x in ids]  # the reference sees exactly the tokens the model saw
        for name, feats, kind in (
            ("mean", features["mean"], "dense"),
            ("last", features["last"], "dense"),
            ("tfidf", texts, "tfidf"),
        ):
            accs, correct = cross_validate(feats, labels, ctx.seed, kind)
            metrics[f"{corpus}/{name}"] = {
                "value": float(np.mean(accs)),
                "std": float(np.std(accs)),
                "folds": accs,
                "n": len(labels),
            }
            items[f"{corpus}/{name}"] = correct.astype(float).tolist()
        counts = Counter(labels.tolist())
        metrics[f"{corpus}/majority"] = {"value": max(counts.values()) / len(labels), "n": len(labels)}
        info[corpus] = {
            "role": role,
            "docs": source,
            "n": len(labels),
            "classes": dict(sorted(counts.items())),
            "dropped_classes": dropped,
        }
    return {
        "suite": "classify",
        **provenance(ctx.run),
        "model_type": tm.config.model_type,
        "n": sum(v["n"] for v in info.values()),
        "folds": FOLDS,
        "layer": layer,
        "corpora": info,
        "classifier": "StandardScaler + LogisticRegression(max_iter=2000); TF-IDF(sublinear, min_df=2) + LogisticRegression",
        "metrics": metrics,
        "headline": ["wiki-vital/mean", "wiki-vital/last", "wiki-vital/tfidf", "bbc-news/mean"],
        "_items": items,
    }
