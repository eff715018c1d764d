"""Embeddings: batched, padded embed() equals embedding each text alone; pooling; the `ftplm embed` command."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ftplm
from ftplm.cli import main
from ftplm.errors import FtplmError


@pytest.fixture(scope="module", params=["ftp", "gpt"])
def tm(request, tiny_ftp_run, tiny_gpt_run):
    return ftplm.load(tiny_ftp_run if request.param == "ftp" else tiny_gpt_run)


def _alone(tm, text: str, pooling: str) -> np.ndarray:
    h = tm.state_vectors(text)
    v = h.mean(0) if pooling == "mean" else h[-1]
    return v / np.linalg.norm(v)


TEXTS = ["Rome", "The cat sat on the mat.", "A much longer text about the history of the Roman empire. " * 8, "x y"]


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_batched_equals_one_by_one(tm, pooling):
    e = tm.embed(TEXTS, pooling, batch_size=3)  # lengths differ: padding inside every batch
    assert e.shape == (len(TEXTS), tm.config.n_embd) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    for i, text in enumerate(TEXTS):
        np.testing.assert_allclose(e[i], _alone(tm, text, pooling), atol=1e-5)
    assert not np.allclose(e[0], e[1])  # different texts, different vectors


def test_state_vectors_per_token(tm):
    h = tm.state_vectors("The cat sat on the mat.")
    assert h.shape == (len(tm.encode("The cat sat on the mat.")), tm.config.n_embd)
    long = tm.state_vectors("word " * 500)
    assert long.shape[0] == tm.config.block_size  # truncated to the context


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(st.text(min_size=1, max_size=80).filter(str.strip), min_size=1, max_size=6), bs=st.integers(1, 4))
def test_embed_order_and_batch_size_invariant(tm, texts, bs):
    """Vectors do not depend on batch size, the order of the inputs, or which texts share a batch."""
    e = tm.embed(texts, "mean", batch_size=bs)
    rev = tm.embed(texts[::-1], "mean", batch_size=5)[::-1]
    np.testing.assert_allclose(e, rev, atol=1e-5)


def test_embed_bad_input(tm):
    with pytest.raises(FtplmError, match="pooling"):
        tm.embed(["a"], "max")
    with pytest.raises(FtplmError, match="empty"):
        tm.embed(["a", ""])
    assert tm.embed([]).shape == (0, tm.config.n_embd)
    np.testing.assert_allclose(tm.embed("Rome"), tm.embed(["Rome"]))


def test_cli_embed(tiny_ftp_run, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS) + "\n")
    out = tmp_path / "vec.npy"
    assert main(["embed", str(tiny_ftp_run), "--input", str(src), "--out", str(out), "--pooling", "last"]) == 0
    np.testing.assert_allclose(np.load(out), ftplm.load(tiny_ftp_run).embed(TEXTS, "last"), atol=1e-6)
    txt = tmp_path / "in.txt"
    txt.write_text("one line\n\nanother line\n")
    assert main(["embed", str(tiny_ftp_run), "--input", str(txt), "--out", str(out)]) == 0
    assert np.load(out).shape[0] == 2
    before = out.read_bytes()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": 1}\n')
    capsys.readouterr()
    assert main(["embed", str(tiny_ftp_run), "--input", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ftplm embed: error:") and "\n" not in err
    assert out.read_bytes() == before  # a failed command leaves the earlier output intact
    assert main(["embed", str(tiny_ftp_run), "--input", str(src), "--out", str(tmp_path / "x.txt")]) == 2


# ------------------------------------------------------------------------------------------------------
# suite `retrieval`
# ------------------------------------------------------------------------------------------------------
def test_query_target_split():
    from ftplm.eval.retrieval import query_target

    text = "Rome is the capital city of Italy. It is also the capital of the Lazio region, and has many old churches."
    assert query_target(text) == (
        "Rome is the capital city of Italy.",
        "It is also the capital of the Lazio region, and has many old churches.",
    )
    assert query_target("One sentence only, with no second part at all here.") is None
    assert query_target("Too short. " + "Rest of the text goes on for long enough to count here, yes.") is None


def test_retrieval_ranks_and_summary():
    from ftplm.eval.retrieval import retrieval_scores, summarise

    rng = np.random.default_rng(0)
    v = rng.normal(size=(20, 8))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    ranks = retrieval_scores(v, v)  # identical vectors: every target is its query's nearest
    assert (ranks == 1).all()
    s, per_query = summarise(ranks, seed=0)
    assert s["recall@1"]["value"] == 1.0 and s["mrr"]["value"] == 1.0 and s["recall@1"]["n"] == 20
    assert per_query["recall@10"] == [1.0] * 20
    swapped = retrieval_scores(v, v[::-1])  # every own target is some other vector
    assert swapped.mean() > 1 and summarise(swapped, 0)[0]["recall@10"]["value"] <= 1
    e = np.eye(3)
    assert retrieval_scores(e, e[[1, 0, 2]]).tolist() == [2, 2, 1]  # targets 0 and 1 swapped


def test_retrieval_suite(tiny_ftp_run, tiny_data):
    import ftplm.eval.retrieval
    from ftplm.eval import SUITES, EvalContext

    ctx = EvalContext(
        run=tiny_ftp_run, model=ftplm.load(tiny_ftp_run), data_dir=tiny_data, options={"retrieval_docs": 40}
    )
    r = SUITES["retrieval"](ctx)
    assert r["n"] == 40 and r["model_type"] == "ftp" and "heldout" in r["docs"]
    for name in ("recall@1", "recall@10", "mrr", "recall@1_last", "judge_recall@1", "judge_recall@10"):
        m = r["metrics"][name]
        assert 0 <= m["ci95"][0] <= m["value"] <= m["ci95"][1] <= 1 and m["n"] == 40
    assert r["metrics"]["recall@10"]["value"] >= r["metrics"]["recall@1"]["value"]
    assert r["metrics"]["judge_recall@10"]["value"] > 0.8  # the judge finds articles: the pairs are sound
    assert len(r["_items"]["recall@1"]) == 40  # per-query values: paired differences under --against
    assert json.loads(json.dumps(r)) == r
