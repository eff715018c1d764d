"""Speculative generation: lossless (greedy token for token, sampling in distribution), bookkeeping, bad input.

Lossless tests use small randomly initialised models in float64 (so that batched vs one-token verification cannot
flip an argmax through rounding) with weights scaled up so that their distributions are peaked and drafts are
actually accepted; the trained tiny fixtures check the public API in float32.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

import ftplm
from ftplm.config import preset
from ftplm.drafters import Draft, Drafter, get_drafter
from ftplm.errors import FtplmError
from ftplm.generate import Sampling, SpecStats, generate, speculative_accept
from ftplm.model import KVCache, build_model

VOCAB, BLOCK = 12, 32


def random_model(model_type: str, vocab: int = VOCAB, block: int = BLOCK, scale: float = 12.0, seed: int = 0, **over):
    torch.manual_seed(seed)
    cfg = dataclasses.replace(preset("tiny", model_type).model, vocab_size=vocab, block_size=block, **over)
    model = build_model(cfg).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(scale)
    return model


MODELS = {
    "ftp": random_model("ftp"),
    "gpt": random_model("gpt"),
    "ftp-masked": random_model("ftp", decoder_inputs="masked"),
}  # the variant whose decoder sees no tokens
PADDED = {kind: random_model(kind, vocab_multiple=16) for kind in ("ftp", "gpt")}
for _padded in PADDED.values():  # padding rows that would win every argmax and most samples, if they were reachable
    with torch.no_grad():
        _padded.lm_head.weight[VOCAB:] = _padded.lm_head.weight[:VOCAB].abs().max() * 4
FLOAT32_FTP = random_model("ftp").float()  # the packed path is float32 only
DRAFTERS_FOR = {"ftp": ("ftp", "ftp-recycling", "ftp-lookup", "recycling", "lookup"), "gpt": ("recycling", "lookup")}
DRAFTERS_FOR["ftp-masked"] = DRAFTERS_FOR["ftp"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("model_type", ["ftp", "gpt", "ftp-masked"])
@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data=st.data())
def test_greedy_lossless(model_type, data):
    """200 random prompts per model, each through every drafter (chain or tree): small alphabets (repeats, for
    lookup), batch 1-3, prompts up to the context limit, a random EOS id that drafts often contain."""
    model = MODELS[model_type]
    batch = data.draw(st.integers(1, 3), label="batch")
    length = data.draw(st.one_of(st.integers(1, 12), st.integers(BLOCK - 6, BLOCK - 1)), label="prompt length")
    alphabet = data.draw(st.integers(2, VOCAB), label="alphabet")
    prompt = data.draw(
        st.lists(
            st.lists(st.integers(0, alphabet - 1), min_size=length, max_size=length), min_size=batch, max_size=batch
        ),
        label="prompt",
    )
    max_new = data.draw(st.integers(0, 12), label="max_new_tokens")
    eos = data.draw(st.one_of(st.none(), st.integers(0, VOCAB - 1)), label="eos")
    tree = data.draw(st.booleans(), label="tree")
    draft_len = data.draw(st.one_of(st.none(), st.integers(1, model.cfg.n_future - 1)), label="draft_len")
    adaptive = data.draw(st.booleans(), label="adaptive")
    idx = torch.tensor(prompt)
    plain = generate(model, idx, max_new, Sampling(0), eos_id=eos).tolist()
    for drafter in DRAFTERS_FOR[model_type]:
        stats = SpecStats()
        fast = generate(
            model,
            idx,
            max_new,
            Sampling(0),
            eos_id=eos,
            speculative=drafter,
            draft_len=draft_len,
            tree=tree,
            stats=stats,
            adaptive=adaptive,
        )
        assert fast.tolist() == plain, drafter
        assert stats.target_forwards <= max(stats.new_tokens, batch)


@pytest.mark.parametrize("model_type", ["ftp", "gpt"])
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(prompt=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=12), temperature=st.sampled_from([0.0, 1.0]))
def test_padded_vocabulary_never_generates_a_padding_id(model_type, prompt, temperature):
    """vocab_multiple = 16 gives 4 padding rows, made to have the largest logits: no method generates them, and every
    drafter still reproduces plain greedy decoding."""
    model = PADDED[model_type]
    idx = torch.tensor([prompt])
    plain = generate(model, idx, 10, Sampling(temperature), seed=0).tolist()
    assert max(plain[0]) < VOCAB
    for drafter in DRAFTERS_FOR[model_type]:
        fast = generate(model, idx, 10, Sampling(temperature), seed=0, speculative=drafter).tolist()
        assert max(fast[0]) < VOCAB
        if temperature == 0:
            assert fast == plain, drafter


def test_masked_inputs_draft_every_token_in_one_decoder_pass(monkeypatch):
    """With masked decoder inputs the drafts do not feed the decoder: a chain of N-1 drafts takes one decoder call
    after the root (the paper's design: one per draft), and the output is still plain decoding's."""
    from ftplm.drafters.ftp import DraftDecoder

    calls = []
    decode = DraftDecoder.decode
    monkeypatch.setattr(
        DraftDecoder, "decode", lambda self, tokens, *a: calls.append(tokens.shape) or decode(self, tokens, *a)
    )
    idx = torch.tensor([[1, 2, 3, 1, 2, 3, 1, 2]])
    for name in ("ftp-masked", "ftp"):
        model, stats = MODELS[name], SpecStats()
        calls.clear()
        out = generate(model, idx, 12, Sampling(0), speculative="ftp", draft_len=3, stats=stats)
        assert out.tolist() == generate(model, idx, 12, Sampling(0)).tolist()
        if name == "ftp":  # a call per draft: the root, then each draft fed back
            assert len(calls) == stats.draft_tokens and all(c == (1, 1) for c in calls)
        else:  # the root, then the other two drafts' positions at once
            assert (1, 2) in calls and len(calls) <= 2 * stats.target_forwards < stats.draft_tokens


def test_drafts_are_accepted_and_trees_are_exercised():
    """The lossless test above is only meaningful if drafts get accepted, also deep inside trees."""
    model = MODELS["ftp"]
    idx = torch.tensor([[1, 2, 3, 1, 2, 3, 1, 2]])
    for drafter, tree in [
        ("ftp", False),
        ("ftp", True),
        ("ftp-recycling", None),
        ("ftp-lookup", False),
        ("recycling", True),
        ("lookup", True),
    ]:
        stats = SpecStats()
        out = generate(model, idx, 20, Sampling(0), speculative=drafter, tree=tree, stats=stats)
        assert out.tolist() == generate(model, idx, 20, Sampling(0)).tolist()
        assert stats.accepted_tokens > 0 and stats.tau > 1.2, (drafter, tree, stats)


@pytest.mark.parametrize("model_type", ["ftp", "gpt"])
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data=st.data())
def test_ragged_batches_equal_row_by_row_generation(model_type, data):
    """Prompts of different lengths in one batch (left-padded at the prefill): each row's tokens equal its own
    plain greedy generation, with and without every drafter."""
    from ftplm.generate import generate_batch

    model = MODELS[model_type]
    lengths = data.draw(
        st.lists(st.one_of(st.integers(1, 10), st.integers(BLOCK - 6, BLOCK - 1)), min_size=2, max_size=4),
        label="prompt lengths",
    )
    alphabet = data.draw(st.integers(2, VOCAB), label="alphabet")
    prompts = [
        data.draw(st.lists(st.integers(0, alphabet - 1), min_size=n, max_size=n), label="prompt") for n in lengths
    ]
    max_new = data.draw(st.integers(0, 10), label="max_new_tokens")
    eos = data.draw(st.one_of(st.none(), st.integers(0, VOCAB - 1)), label="eos")
    expected = []
    for p in prompts:  # each row up to max_new within its own room in the context
        row = generate(model, torch.tensor([p]), min(max_new, BLOCK - len(p)), Sampling(0), eos_id=eos)[
            0, len(p) :
        ].tolist()
        expected.append(row[: row.index(eos) + 1] if eos in row else row)
    for drafter in (None, *DRAFTERS_FOR[model_type]):
        tree = data.draw(st.booleans(), label="tree")
        assert (
            generate_batch(model, prompts, max_new, Sampling(0), eos_id=eos, speculative=drafter, tree=tree) == expected
        )


@pytest.mark.parametrize(
    "drafter, variant", [(None, {}), ("ftp", {}), ("lookup", {}), ("ftp", {"decoder_inputs": "masked"})]
)
def test_ragged_batch_sampling_chi_square(drafter, variant):
    """Two prompts of different lengths interleaved in one batch: each one's continuations follow its own exact
    distribution (the padding of the shorter one is invisible); also with the masked-inputs variant's drafts."""
    from ftplm.generate import generate_batch

    model = random_model("ftp", vocab=6, scale=5.0, seed=3, **variant)
    short, long, runs, n = [3, 1], [1, 2, 1, 2, 1], 600, 2
    sampling = Sampling(temperature=1.0)
    out = generate_batch(model, [short, long] * runs, n, sampling, seed=0, speculative=drafter)
    for k, prompt in enumerate((short, long)):
        exact = exact_sequence_probs(model, prompt, n, sampling)
        counts: dict[tuple[int, ...], int] = {}
        for row in out[k::2]:
            counts[tuple(row)] = counts.get(tuple(row), 0) + 1
        big = sorted(seq for seq, pr in exact.items() if pr * runs >= 5)
        observed = [counts.get(seq, 0) for seq in big] + [runs - sum(counts.get(seq, 0) for seq in big)]
        expected = [exact[seq] * runs for seq in big] + [runs * (1 - sum(exact[seq] for seq in big))]
        assert len(big) >= 4 and chisquare(observed, expected).pvalue > 1e-3, prompt


def test_generate_batch_bad_input():
    from ftplm.generate import generate_batch

    model = MODELS["gpt"]
    for prompts, message in (
        ([], "non-empty list"),
        ([[1], []], "a prompt is empty"),
        ([[1], [2] * BLOCK], "no room"),
        ("12", "non-empty list"),
    ):
        with pytest.raises(FtplmError, match=message):
            generate_batch(model, prompts, 4)  # type: ignore[arg-type]
    with pytest.raises(FtplmError, match="needs an FTP model"):
        generate_batch(model, [[1], [2, 3]], 4, speculative="ftp")
    with pytest.raises(FtplmError, match="adaptive draft length needs"):
        generate_batch(model, [[1], [2, 3]], 4, adaptive=True)


def test_batched_verification_compacts_its_cache_and_drops_finished_rows(monkeypatch):
    """A batch is verified in one forward per round: rows accept different numbers of drafts (holes in the shared
    cache, compacted when it fills up) and finish at different times (they leave the batch)."""
    import ftplm.generate as gen

    compactions = []
    compact = gen._compact
    monkeypatch.setattr(gen, "_compact", lambda *args: compactions.append(args[2][:]) or compact(*args))
    monkeypatch.setattr(gen.DecodeSession, "CAPACITY", 1.25)  # 40 slots: the 23-node trees fill them quickly
    model = MODELS["gpt"]
    idx = torch.tensor([[1, 2, 3, 1, 2, 3, 1, 2], [4, 5, 6, 7, 4, 5, 6, 7], [0, 9, 8, 11, 10, 9, 8, 0]])
    ends = set()
    free = generate(model, idx, 20, Sampling(0)).tolist()
    for eos in (None, *{row[9] for row in free}):  # EOS ids that end a row after its second token, others later
        plain = generate(model, idx, 20, Sampling(0), eos_id=eos).tolist()
        stats = SpecStats()
        fast = generate(model, idx, 20, Sampling(0), eos_id=eos, speculative="recycling", stats=stats)  # trees
        assert fast.tolist() == plain and stats.accepted_tokens > 0
        ends.add(tuple(row[8:].index(eos) if eos in row[8:] else None for row in plain))
    assert any(len(set(e)) == 3 for e in ends)  # rows that end at different times leave the batch one by one
    # 40 slots, 4 + 24 + ... written by the 23-node trees: full before 28 tokens are generated
    short = idx[:, :4]
    assert (
        generate(model, short, 28, Sampling(0), speculative="recycling").tolist()
        == generate(model, short, 28, Sampling(0)).tolist()
    )
    assert compactions


def test_compact_moves_each_rows_accepted_slots_to_the_front():
    from ftplm.generate import _compact

    cache = KVCache(1, 6)
    cache.k = torch.arange(12.0).view(1, 2, 1, 6, 1)  # (layer, row, head, slot, dim): slot values 0-5, 6-11
    cache.v = -cache.k
    cache.length = 6
    valid = torch.tensor([[1, 0, 1, 1, 0, 0], [1, 1, 0, 0, 0, 1]], dtype=torch.bool)
    _compact(cache, valid, [3, 3])
    assert cache.k[0, :, 0, :3, 0].tolist() == [[0, 2, 3], [6, 7, 11]] and torch.equal(cache.v, -cache.k)
    assert valid.tolist() == [[1, 1, 1, 0, 0, 0]] * 2 and cache.length == 3


def test_ftp_batch_drafts_equal_row_by_row_drafts():
    from ftplm.drafters import DraftContext

    model = MODELS["ftp"]
    drafter = get_drafter("ftp", model)
    x = torch.tensor([[2, 7, 1, 8, 2, 8], [3, 1, 4, 1, 5, 9]])
    h = model.state_vectors(x)
    _, start = model.first_decoder_step(h, x)
    ctxs = [
        DraftContext(x[r].tolist(), h[r, -2], depth, 50, Sampling(0), torch.Generator(), start.row(r * 6 + 4))
        for r, depth in ((0, 3), (1, 1))
    ]  # different depths in one batch
    batched = drafter.propose_batch(ctxs)
    one_by_one = [drafter.propose(c) for c in ctxs]
    assert [(d.tokens, d.parents) for d in batched] == [(d.tokens, d.parents) for d in one_by_one]
    assert [len(d) for d in batched] == [3, 1]


def test_custom_tree_template_and_draft_longer_than_budget():
    model = MODELS["ftp"]
    idx = torch.tensor([[5, 6, 7]])
    plain = generate(model, idx, 9, Sampling(0))
    for template in ([(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)], [(3,), (3, 3)], [(0, 0)]):
        assert generate(model, idx, 9, Sampling(0), speculative="ftp", tree=template).tolist() == plain.tolist()
    assert (
        generate(
            model, idx, 9, Sampling(0), speculative="recycling", tree=[(0,), (0, 0), (0, 0, 0)] * 3, draft_len=8
        ).tolist()
        == plain.tolist()
    )


# --------------------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------------------
def test_acceptance_rule_hand_computed():
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.6, 0.2])
    # x=1: p/q = 0.5 -> accept iff u < 0.5; residual max(0, p-q) = [0.3, 0, 0] -> [1, 0, 0]
    assert speculative_accept(p, 1, q, 0.49)[0]
    accepted, residual = speculative_accept(p, 1, q, 0.51)
    assert not accepted and torch.allclose(residual, torch.tensor([1.0, 0.0, 0.0]))
    # x=0: p/q = 2.5 -> always accepted, p unchanged
    accepted, same = speculative_accept(p, 0, q, 0.999)
    assert accepted and same is p
    # deterministic draft (one-hot q): accept with probability p[x]; residual = p without x, renormalised
    assert speculative_accept(p, 1, None, 0.29)[0]
    accepted, residual = speculative_accept(p, 1, None, 0.31)
    assert not accepted and torch.allclose(residual, torch.tensor([0.5 / 0.7, 0.0, 0.2 / 0.7]))
    # over u ~ U[0,1): P(accept x) * 1 + P(reject) * residual = p (for x ~ q): the rule is lossless
    total = torch.zeros(3)
    for x in range(3):
        accept_prob = min(1.0, float(p[x] / q[x]))
        residual = speculative_accept(p, x, q, 1.0 - 1e-9)[1] if accept_prob < 1 else torch.zeros(3)
        total += q[x] * (accept_prob * torch.nn.functional.one_hot(torch.tensor(x), 3) + (1 - accept_prob) * residual)
    assert torch.allclose(total, p)


@torch.no_grad()
def exact_sequence_probs(model, prompt: list[int], n: int, sampling: Sampling) -> dict[tuple[int, ...], float]:
    """P(first n new tokens = s) for every s, by enumeration with the full (cache-free) forward."""
    probs = {(): 1.0}
    for _ in range(n):
        seqs = list(probs)
        x = torch.tensor([prompt + list(s) for s in seqs])
        nxt = sampling.probs(model(x).logits[:, -1]).double()
        probs = {s + (t,): probs[s] * float(nxt[i, t]) for i, s in enumerate(seqs) for t in range(nxt.size(1))}
    return probs


@pytest.mark.parametrize(
    "drafter, tree, draft_len, n, adaptive",
    [
        ("ftp", False, None, 3, False),
        ("ftp", True, None, 3, False),
        ("recycling", True, None, 3, False),
        ("lookup", False, None, 3, False),
        ("ftp-recycling", None, 1, 4, False),  # one FTP token, then recycled ones: both kinds of node in one draft
        ("ftp-lookup", False, None, 3, False),  # sampled FTP drafts and copied ones, chosen from row to row
        ("recycling", True, None, 3, True),  # the draft depth changes from row to row with the acceptances so far
    ],
)
def test_sampling_lossless_chi_square(drafter, tree, draft_len, n, adaptive):
    model = random_model("ftp", vocab=6, scale=5.0, seed=3)
    prompt, runs = [1, 2, 1, 2, 1], 1000
    sampling = Sampling(temperature=1.0)
    exact = exact_sequence_probs(model, prompt, n, sampling)
    stats = SpecStats()
    out = generate(
        model,
        torch.tensor([prompt] * runs),
        n,
        sampling,
        seed=0,
        speculative=drafter,
        tree=tree,
        draft_len=draft_len,
        stats=stats,
        adaptive=adaptive,
    )
    assert stats.accepted_tokens > 0  # the acceptance rule was exercised, not only the bonus token
    counts: dict[tuple[int, ...], int] = {}
    for row in out[:, len(prompt) :].tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    # cells expected >= 5 times on their own; the rest pooled
    big = sorted(s for s, pr in exact.items() if pr * runs >= 5)
    observed = [counts.get(s, 0) for s in big] + [runs - sum(counts.get(s, 0) for s in big)]
    expected = [exact[s] * runs for s in big] + [runs * (1 - sum(exact[s] for s in big))]
    assert len(big) >= 5
    assert chisquare(observed, expected).pvalue > 1e-3


def test_sampling_seeded_reproducible():
    model = MODELS["ftp"]
    idx = torch.tensor([[1, 2, 3]])
    a = generate(model, idx, 12, Sampling(0.8, top_k=5), seed=4, speculative="ftp")
    b = generate(model, idx, 12, Sampling(0.8, top_k=5), seed=4, speculative="ftp")
    assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------------
# bookkeeping with a mock model whose acceptance is known
# --------------------------------------------------------------------------------------------------------
class CountingModel(torch.nn.Module):
    """Next token is always (x + 1) % V; counts trunk calls. Satisfies what speculative_generate needs."""

    def __init__(self, vocab: int = 10, block: int = 200) -> None:
        super().__init__()
        self.cfg = dataclasses.replace(preset("tiny", "gpt").model, vocab_size=vocab, block_size=block)
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.calls = 0

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def new_cache(self) -> KVCache:
        return KVCache(1, self.cfg.block_size)

    def state_vectors(self, idx, cache=None, positions=None, attn_mask=None):
        self.calls += 1
        cache.advance(idx.size(1))
        assert cache.length <= self.cfg.block_size
        return idx.double().unsqueeze(-1)

    def next_token_logits(self, h, idx):
        return torch.nn.functional.one_hot((idx + 1) % self.cfg.vocab_size, self.cfg.vocab_size).double() * 10


class KnownDrafter(Drafter):
    """Drafts `k` tokens of which exactly the first `good` are right."""

    def __init__(self, model, k: int, good: int) -> None:
        super().__init__(model, k)
        self.good = good

    def propose(self, ctx) -> Draft:
        draft, token = Draft(), ctx.tokens[-1]
        for i in range(min(self.draft_len, ctx.max_depth)):
            token = (token + 1) % 10 if i < self.good else (token + 5) % 10
            draft.add(token, i - 1)
        return draft


@pytest.mark.parametrize("k, good, n", [(4, 4, 41), (4, 2, 30), (3, 0, 12), (6, 3, 7)])
def test_tau_and_forward_bookkeeping(k, good, n):
    model = CountingModel()
    stats = SpecStats()
    out = generate(model, torch.tensor([[3]]), n, Sampling(0), speculative=KnownDrafter(model, k, good), stats=stats)
    assert out[0].tolist() == [(3 + i) % 10 for i in range(n + 1)]  # lossless: the mock's greedy sequence
    per_round = good + 1  # accepted drafts + the bonus token
    expected_forwards = 1 + -(-(n - 1) // per_round)  # prefill gives the first token
    assert stats.target_forwards == model.calls == expected_forwards
    assert stats.new_tokens == n
    assert stats.tau == pytest.approx(n / expected_forwards)
    assert stats.accepted_tokens == n - expected_forwards
    assert stats.draft_time >= 0 and stats.verify_time > 0
    assert stats.total_time == pytest.approx(stats.draft_time + stats.verify_time)


class SlowModel(CountingModel):
    """CountingModel whose trunk, targets and drafts take known times: the profile must put them in their place."""

    TRUNK, TARGETS, DRAFT = 0.004, 0.002, 0.001

    def state_vectors(self, idx, cache=None, positions=None, attn_mask=None):
        time.sleep(self.TRUNK)
        return super().state_vectors(idx, cache, positions, attn_mask)

    def next_token_logits(self, h, idx):
        time.sleep(self.TARGETS)
        return super().next_token_logits(h, idx)


class SlowDrafter(KnownDrafter):
    def propose(self, ctx) -> Draft:
        time.sleep(SlowModel.DRAFT)
        return super().propose(ctx)


@pytest.mark.parametrize("speculative", [False, True])
def test_profile_splits_the_time(speculative):
    model = SlowModel()
    stats = SpecStats()
    drafter = SlowDrafter(model, 3, 2) if speculative else None
    generate(model, torch.tensor([[3]]), 12, Sampling(0), speculative=drafter, stats=stats)
    rounds = stats.target_forwards
    assert stats.trunk_time >= SlowModel.TRUNK * rounds and stats.target_time >= SlowModel.TARGETS * rounds
    assert stats.trunk_time < stats.verify_time and stats.target_time < stats.trunk_time  # sleeps are lower bounds
    assert stats.draft_time >= (SlowModel.DRAFT * (rounds - 1) if speculative else 0.0)
    assert 0 <= stats.overhead_time < stats.total_time / 2
    parts = stats.draft_time + stats.trunk_time + stats.target_time + stats.overhead_time
    assert parts == pytest.approx(stats.total_time)


def test_adaptive_depth_follows_acceptance():
    from ftplm.drafters import AdaptiveDepth

    def chain(n: int) -> Draft:
        draft = Draft()
        for i in range(n):
            draft.add(i, i - 1)
        return draft

    control = AdaptiveDepth(max_depth=4, node_cost=0.1)
    # no evidence, r = 1/2 everywhere: depth L gives 2 - 2**-L tokens for 1 + 0.1 L forwards, best at L = 2 (1.458)
    assert control.depth() == 2
    for _ in range(30):  # every draft token accepted: draft as deep as allowed
        control.update(chain(control.depth()), control.depth())
    assert control.depth() == 4
    shallow = AdaptiveDepth(max_depth=4, node_cost=0.1)
    for _ in range(30):  # depths 1-2 always accepted, 3-4 never drafted: assumed as good as depth 2, so tried
        shallow.update(chain(2), 2)
    assert shallow.rates()[2] == pytest.approx(shallow.rates()[1]) and shallow.rates()[1] > 0.9
    assert shallow.depth() == 4
    for _ in range(100):  # nothing accepted: stop drafting (depth 0 = a plain step)...
        control.update(chain(control.depth()), 0)
    assert control.depth() == 0
    for _ in range(60):  # ...but undrafted depths drift back to the prior and get tried again
        control.update(chain(0), 0)
    assert control.depth() > 0
    # a tree's width counts: 6 nodes at depth 1 cost 1.6 forwards for at most 2 tokens -> not worth it at r = 1/2
    wide = Draft()
    for t in range(6):
        wide.add(t, -1)
    control = AdaptiveDepth(max_depth=1, node_cost=0.1)
    control.update(wide, 0)
    control.reached[0] = control.accepted[0] = 0.0
    assert control.depth() == 0
    # a fixed cost per drafting round (a multi-token verification, a drafter to start) favours longer drafts once
    # drafting pays at all: at r ~ 0.85 the best depth moves from 5 (0.2 per node) to 7 (0.3 + 0.12 per node)
    per_node, with_fixed = AdaptiveDepth(max_depth=7, node_cost=0.2), AdaptiveDepth(7, node_cost=0.12, fixed_cost=0.3)
    for control in (per_node, with_fixed):
        control.reached, control.accepted = [100.0] * 7, [85.0] * 7
        assert control.rates()[-1] == pytest.approx(0.85, abs=0.01)
    assert per_node.depth() == 5 and with_fixed.depth() == 7
    # ... and keeps weak drafts out: at r = 1/2 (no evidence) a draft gives < 2 tokens, too few for a round that
    # costs more than twice a plain step
    assert AdaptiveDepth(max_depth=4, node_cost=0.1, fixed_cost=1.0).depth() == 0
    assert AdaptiveDepth(max_depth=4, node_cost=0.1, fixed_cost=0.0).depth() == 2


def test_adaptive_draft_length_skips_hopeless_drafts():
    model = CountingModel()
    fixed, adaptive = SpecStats(), SpecStats()
    out = generate(model, torch.tensor([[3]]), 60, Sampling(0), speculative=KnownDrafter(model, 4, 0), stats=fixed)
    again = generate(
        model,
        torch.tensor([[3]]),
        60,
        Sampling(0),
        speculative=KnownDrafter(model, 4, 0),
        stats=adaptive,
        adaptive=True,
    )
    assert torch.equal(out, again)
    assert fixed.draft_tokens >= 4 * (fixed.target_forwards - 4)  # 4 a round (less near the end), none accepted
    assert adaptive.draft_tokens < fixed.draft_tokens / 2 and adaptive.accepted_tokens == 0


def test_plain_generation_has_tau_one():
    stats = SpecStats()
    generate(MODELS["gpt"], torch.tensor([[1, 2]]), 10, Sampling(0), stats=stats)
    assert stats.new_tokens == 10 and stats.tau == 1.0


# --------------------------------------------------------------------------------------------------------
# bad input and the public API
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "model_type, kwargs, message",
    [
        ("ftp", {"speculative": "ftp", "draft_len": 0}, "draft_len must be a positive integer"),
        ("ftp", {"speculative": "lookup", "draft_len": -2}, "draft_len must be a positive integer"),
        ("ftp", {"speculative": "medusa"}, "unknown speculative drafter 'medusa'"),
        ("gpt", {"speculative": "ftp"}, "needs an FTP model"),
        ("gpt", {"speculative": "ftp-recycling"}, "'ftp-recycling' needs an FTP model"),
        ("ftp", {"speculative": "ftp-recycling", "draft_len": 9}, "at most n_future-1"),
        ("ftp", {"speculative": "ftp", "draft_len": 9}, "at most n_future-1"),
        ("ftp", {"speculative": "ftp", "tree": [()]}, "tree paths"),
        ("ftp", {"speculative": "lookup", "tree": [(0,)]}, "lookup"),
        ("gpt", {"adaptive": True}, "adaptive draft length needs a speculative drafter"),
    ],
)
def test_bad_input(model_type, kwargs, message):
    with pytest.raises(FtplmError, match=message) as e:
        generate(MODELS[model_type], torch.tensor([[1, 2]]), 5, Sampling(0), **kwargs)
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)


def test_lookup_copies_with_overlap_through_a_loop():
    lookup = get_drafter("lookup", MODELS["gpt"], 6)
    # the last 3-gram (2, 1, 2) last occurred 2 tokens back: the loop "1 2" is copied on, not cut at the present
    assert lookup.continuations([5, 1, 2, 1, 2, 1, 2], 6) == [[1, 2, 1, 2, 1, 2]]
    # a match with enough tokens after it is copied as it stands
    assert lookup.continuations([4, 5, 6, 7, 8, 9, 4, 5], 3) == [[6, 7, 8]]
    # trees: distinct continuations of up to 3 occurrences, most recent first
    tree = get_drafter("lookup", MODELS["gpt"], 2, tree=True)
    assert tree.continuations([1, 7, 1, 8, 1, 9, 0, 1], 2) == [[9, 0], [8, 1], [7, 1]]


def test_ftp_lookup_drafts_from_whichever_source_has_paid_better():
    from ftplm.drafters import DraftContext
    from ftplm.drafters.ftp_lookup import MAX_AGE, PRIOR

    model = MODELS["ftp"]
    hybrid = get_drafter("ftp-lookup", model)
    ftp, lookup = get_drafter("ftp", model), get_drafter("lookup", model)
    h = torch.zeros(model.cfg.n_embd, dtype=torch.float64)
    looping = DraftContext([1, 2, 3, 1, 2, 3, 1, 2], h, 10, 20, Sampling(0), torch.Generator())
    copy = [3, 1, 2, 3, 1, 2, 3]
    fresh = dataclasses.replace(looping, tokens=[1, 2, 3, 4, 5, 6, 7, 8])  # no n-gram seen before: lookup has nothing
    assert hybrid.propose(fresh).tokens == ftp.propose(fresh).tokens and not hybrid.shadow
    hybrid.chosen.clear()  # that round was never verified
    assert hybrid.propose(looping).tokens == lookup.propose(looping).tokens == copy  # a tie goes to lookup
    hybrid.observe([2] + copy, torch.zeros(8, VOCAB), [0])  # all 7 copied tokens rejected
    assert hybrid.propose(looping).tokens == ftp.propose(looping).tokens  # FTP drafts; lookup's copy is kept aside
    assert hybrid.shadow == [(8, [2, 3, 1, 2], [copy], 7, 2)]  # at, the tokens before, copies, nodes, round
    hybrid.observe([2, 0, 0, 0], torch.zeros(4, VOCAB), [0, 1])  # FTP: 1 of 3 accepted
    values = dict(hybrid.value)
    on = dataclasses.replace(looping, tokens=looping.tokens + copy[:3])  # the text so far agrees with the copy
    hybrid.propose(on)
    assert hybrid.value[hybrid.lookup] == values[hybrid.lookup] and len(hybrid.shadow) == 2  # not known yet
    hybrid.observe([2, 0, 0, 0], torch.zeros(4, VOCAB), [0, 1])
    looped = dataclasses.replace(looping, tokens=looping.tokens + copy + [1])  # it went on exactly as copied
    assert hybrid.propose(looped).tokens == lookup.propose(looped).tokens  # so lookup has the better score again
    assert hybrid.value[hybrid.lookup] > hybrid.value[hybrid.ftp]
    assert [at for at, *_ in hybrid.shadow] == [11]  # the copy made at 11 is still running ahead of the text
    # a copy kept aside in one row is never scored against another row's text: it waits for its own row
    hybrid.shadow = [(8, [9, 9, 9, 9], [copy], 7, hybrid.round)]
    values = dict(hybrid.value)
    assert hybrid.propose(looped).tokens == lookup.propose(looped).tokens
    assert hybrid.value == values and len(hybrid.shadow) == 1
    hybrid.round += MAX_AGE  # ... until its row has long ended
    hybrid.propose(looped)
    assert hybrid.value == values and not hybrid.shadow
    hybrid.chosen.clear()
    # a batch: each row drafts from its own choice, and each row's verification scores the source it used
    hybrid = get_drafter("ftp-lookup", model)
    start = model.first_decoder_step(torch.zeros(1, 1, model.cfg.n_embd, dtype=torch.float64), torch.tensor([[2]]))[1]
    rows = [dataclasses.replace(c, decoder_start=start) for c in (fresh, looping, fresh)]
    drafts = hybrid.propose_batch(rows)
    assert [d.tokens for d in drafts] == [ftp.propose(rows[0]).tokens, copy, ftp.propose(rows[2]).tokens]
    assert [(source, n) for source, n in hybrid.chosen] == [(hybrid.ftp, 3), (hybrid.lookup, 7), (hybrid.ftp, 3)]
    hybrid.observe([8, 0, 0, 0], torch.zeros(4, VOCAB), [0, 1, 2, 3])  # row 0: FTP, all 3 accepted
    hybrid.observe([2] + copy, torch.zeros(8, VOCAB), [0])  # row 1: lookup, nothing accepted
    assert hybrid.value[hybrid.ftp] > PRIOR > hybrid.value[hybrid.lookup] and len(hybrid.chosen) == 1
    # row 2 was never verified (as if the generation had failed): the next generation starts afresh, its rows
    # scored against their own choices
    idx, pending = torch.tensor([[1, 2, 3, 1, 2, 3, 1, 2]]), []
    observe = hybrid.observe
    hybrid.observe = lambda *args: pending.append(len(hybrid.chosen)) or observe(*args)  # type: ignore[method-assign]
    out = generate(model, idx, 8, Sampling(0), speculative=hybrid)
    assert out.tolist() == generate(model, idx, 8, Sampling(0)).tolist()
    assert pending[0] == 0 and set(pending[1:]) == {1} and not hybrid.chosen  # the prefill found no stale choice


def test_get_drafter_registry():
    import typing

    from ftplm.cli import Drafters

    get_drafter("ftp", MODELS["ftp"])  # imports every drafter module
    registry = set(__import__("ftplm.drafters", fromlist=["DRAFTERS"]).DRAFTERS)
    assert set(typing.get_args(Drafters)) == registry >= {"ftp", "ftp-recycling", "ftp-lookup", "recycling", "lookup"}
    assert get_drafter("lookup", MODELS["gpt"], 3).draft_len == 3


def test_api_speculative_matches_plain_fp32(tiny_ftp_run, tiny_gpt_run):
    for run, drafters in (
        (tiny_ftp_run, ("ftp", "ftp-recycling", "ftp-lookup", "recycling", "lookup")),
        (tiny_gpt_run, ("recycling", "lookup")),
    ):
        m = ftplm.load(run)
        for prompt, drafter, tree in itertools.product(["The", "In 1990 the city of"], drafters, (False, True)):
            plain = m.generate_ids(prompt, max_new_tokens=24, temperature=0)
            assert m.generate_ids(prompt, max_new_tokens=24, temperature=0, speculative=drafter, tree=tree) == plain
        assert isinstance(m.generate("The", max_new_tokens=8, temperature=1.0, seed=1, speculative=drafters[0]), str)
        # auto: ftp-lookup for FTP; lookup for greedy GPT, and plain sampling for GPT (the same draws as without)
        assert m.generate_ids("The", max_new_tokens=24, temperature=0, speculative="auto") == m.generate_ids(
            "The", max_new_tokens=24, temperature=0
        )
        if run == tiny_gpt_run:
            assert m.generate_ids("The", 12, temperature=1.0, seed=3, speculative="auto", adaptive=True) == (
                m.generate_ids("The", 12, temperature=1.0, seed=3)
            )
    with pytest.raises(FtplmError, match="needs an FTP model"):
        ftplm.load(tiny_gpt_run).generate("The", speculative="ftp")
    # several prompts of different lengths at once: each as if generated alone
    m = ftplm.load(tiny_ftp_run)
    prompts = ["The", "In 1990 the city of", "A"]
    alone = [m.generate(p, 16, temperature=0) for p in prompts]
    assert m.generate_batch(prompts, 16, temperature=0) == alone
    assert m.generate_batch(prompts, 16, temperature=0, speculative="auto") == alone


def test_cli_generate_speculative(tiny_ftp_run, tiny_gpt_run):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ftplm", "generate", *args], capture_output=True, text=True)

    plain = run(str(tiny_ftp_run), "--prompt", "The", "--temperature", "0", "--max-new-tokens", "16")
    fast = run(
        str(tiny_ftp_run),
        "--prompt",
        "The",
        "--temperature",
        "0",
        "--max-new-tokens",
        "16",
        "--speculative",
        "ftp",
        "--tree",
    )
    assert plain.returncode == fast.returncode == 0 and fast.stdout == plain.stdout
    auto = run(
        str(tiny_ftp_run), "--prompt", "The", "--temperature", "0", "--max-new-tokens", "16", "--speculative", "auto"
    )
    assert auto.returncode == 0 and auto.stdout == plain.stdout
    fast = run(
        str(tiny_ftp_run),
        "--prompt",
        "The",
        "--temperature",
        "0",
        "--max-new-tokens",
        "16",
        "--speculative",
        "ftp",
        "--adaptive",
    )
    assert fast.returncode == 0 and fast.stdout == plain.stdout
    for args, message in [
        (("--speculative", "ftp", "--draft-len", "0"), "draft_len"),
        (("--speculative", "medusa"), "invalid choice"),
        (("--adaptive",), "adaptive draft length needs a speculative drafter"),
    ]:
        bad = run(str(tiny_ftp_run), "--prompt", "The", *args)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr
    bad = run(str(tiny_gpt_run), "--prompt", "The", "--speculative", "ftp")
    assert bad.returncode == 2 and "needs an FTP model" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_bench_summary_speedup_and_tau():
    from ftplm.bench.decode import summarize

    def rec(method, prompt, seconds, tokens, forwards, out):
        return {
            "mode": "greedy",
            "method": method,
            "prompt": prompt,
            "seconds": seconds,
            "new_tokens": tokens,
            "target_forwards": forwards,
            "draft_time": seconds / 4,
            "tokens": out,
        }

    records = [
        rec("plain", 0, 2.0, 10, 10, [1]),
        rec("ftp", 0, 0.5, 10, 4, [1]),
        rec("plain", 1, 4.0, 10, 10, [2]),
        rec("ftp", 1, 1.5, 10, 2, [3]),
    ]
    r = summarize(records)["greedy"]
    assert r["plain"]["speedup"] == 1.0 and r["plain"]["tau"] == 1.0
    assert r["ftp"]["speedup"] == pytest.approx(6.0 / 2.0) and r["ftp"]["tau"] == pytest.approx(20 / 6)
    assert r["ftp"]["tokens_per_s"] == pytest.approx(10.0) and r["ftp"]["draft_share"] == pytest.approx(0.25)
    assert r["ftp"]["lossless"] == 0.5  # prompt 1 differs from plain


def test_repeated_share_counts_ngrams_seen_before():
    from ftplm.bench.decode import repeated_share

    # prompt 1 2 3 4; new 1 2 3 4 5 1 2 3: the 4-grams ending at new tokens are (2,3,4,1) (3,4,1,2) (4,1,2,3)
    # (1,2,3,4: seen in the prompt) (2,3,4,5) (3,4,5,1) (4,5,1,2) (5,1,2,3): only the 4th repeats
    assert repeated_share([1, 2, 3, 4], [1, 2, 3, 4, 5, 1, 2, 3]) == pytest.approx(1 / 8)
    assert repeated_share([7, 7, 7], [7, 7, 7]) == pytest.approx(2 / 3)  # (7,7,7,7) first ends at the first new token
    assert repeated_share([7, 7], [7, 7, 7]) == pytest.approx(1 / 3)  # ... here at the second
    assert repeated_share([1, 2, 3, 4], []) == 0.0
    assert repeated_share([1], [2, 3]) == 0.0  # no 4-gram yet


def test_bench_decode_runs_on_tiny(tiny_ftp_run, tmp_path):
    from ftplm.cli import main

    out = tmp_path / "bench.json"
    assert (
        main(
            [
                "bench",
                "decode",
                str(tiny_ftp_run),
                "--prompts",
                "2",
                "--max-new-tokens",
                "8",
                "--prompt-tokens",
                "8",
                "--threads",
                "1",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    import json

    result = json.loads(out.read_text())
    assert result["products"] == "oneDNN packed"  # the CPU path the published figures were measured on
    assert result["draft_products"] in ("bfloat16", "float32")  # bf16 where the CPU has it
    assert result["draft_greedy_vocab"] == 512  # the tiny run's 512 ids: below GREEDY_MIN_VOCAB, all of them
    for mode in ("greedy", "T=1"):
        assert set(result["results"][mode]) == {
            "plain",
            "ftp",
            "ftp-adaptive",
            "ftp-tree",
            "ftp-recycling",
            "ftp-lookup",
            "recycling",
            "recycling-adaptive",
            "lookup",
        }
    assert all(r["lossless"] == 1.0 for r in result["results"]["greedy"].values())
    assert all(0.0 <= r["repeated_4grams"] <= 1.0 for mode in result["results"].values() for r in mode.values())
    for r in result["results"]["greedy"].values():
        p = r["profile_ms_per_forward"]
        assert p["total"] == pytest.approx(1e3 * r["seconds"] / r["target_forwards"])
        assert p["trunk"] > 0 and p["targets"] > 0 and p["other"] >= 0
        assert p["trunk"] + p["targets"] + p["draft"] + p["other"] == pytest.approx(p["total"])
    assert result["results"]["greedy"]["plain"]["profile_ms_per_forward"]["draft"] == 0
    assert main(["bench", "decode", str(tiny_ftp_run), "--method", "medusa"]) == 2
    assert main(["bench", "decode", str(tiny_ftp_run), "--temperature", "-1"]) == 2
    assert (
        main(
            [
                "bench",
                "decode",
                str(tiny_ftp_run),
                "--prompts",
                "1",
                "--max-new-tokens",
                "4",
                "--prompt-tokens",
                "8",
                "--method",
                "ftp",
                "--temperature",
                "0.5",
                "--temperature",
                "0",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert list(result["results"]) == ["T=0.5", "greedy"] and set(result["results"]["T=0.5"]) == {"plain", "ftp"}
    # batches: 3 prompts in batches of 2 and 1, every method on the same batches
    assert (
        main(
            [
                "bench",
                "decode",
                str(tiny_ftp_run),
                "--prompts",
                "3",
                "--batch-size",
                "2",
                "--max-new-tokens",
                "6",
                "--prompt-tokens",
                "8",
                "--method",
                "ftp",
                "--method",
                "ftp-lookup",
                "--temperature",
                "0",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["batch_size"] == 2
    for r in result["results"]["greedy"].values():
        assert r["prompts"] == 3 and r["new_tokens"] == 18 and r["lossless"] == 1.0
    assert main(["bench", "decode", str(tiny_ftp_run), "--batch-size", "0"]) == 2
    # oracle-K, the ceiling: plain greedy decoding's own next K tokens, every one accepted, at greedy only
    for batch_size in ("1", "2"):
        assert (
            main(
                [
                    "bench",
                    "decode",
                    str(tiny_ftp_run),
                    "--prompts",
                    "2",
                    "--batch-size",
                    batch_size,
                    "--max-new-tokens",
                    "8",
                    "--prompt-tokens",
                    "8",
                    "--method",
                    "ftp",
                    "--method",
                    "oracle-3",
                    "--method",
                    "oracle-9",
                    "--json",
                    str(out),
                ]
            )
            == 0
        )
        result = json.loads(out.read_text())
        greedy = result["results"]["greedy"]
        assert set(result["results"]["T=1"]) == {"plain", "ftp"}
        assert greedy["oracle-3"]["lossless"] == greedy["oracle-9"]["lossless"] == 1.0
        assert greedy["oracle-3"]["tau"] == pytest.approx(8 / (1 + math.ceil(7 / 4)))  # prefill, then 4 per round
        assert greedy["oracle-9"]["tau"] == pytest.approx(8 / 2)  # prefill, then the other 7 in one round
        assert greedy["ftp"]["tau"] <= greedy["oracle-3"]["tau"]  # the tiny model's N = 4: its chain drafts 3
    assert main(["bench", "decode", str(tiny_ftp_run), "--method", "oracle-0"]) == 2


# --------------------------------------------------------------------------------------------------------
# the multi-threaded CPU path
# --------------------------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data=st.data())
def test_lossless_on_the_multithreaded_cpu_path(data, monkeypatch):
    """Two torch threads, and every Linear (even these tiny ones) on the packed oneDNN path: plain decoding
    multiplies one row at a time, verification many; rounding differences must never change the output."""
    from ftplm.kernels import _PACKED, Linear

    monkeypatch.setattr(Linear, "MIN_PACKED", 0)
    model = FLOAT32_FTP
    length = data.draw(st.integers(1, BLOCK - 1), label="prompt length")
    alphabet = data.draw(st.integers(2, VOCAB), label="alphabet")
    prompt = data.draw(st.lists(st.integers(0, alphabet - 1), min_size=length, max_size=length), label="prompt")
    tree = data.draw(st.booleans(), label="tree")
    idx = torch.tensor([prompt])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        plain = generate(model, idx, 12, Sampling(0)).tolist()
        assert model.lm_head in _PACKED
        for drafter in ("ftp", "recycling", "lookup"):
            assert generate(model, idx, 12, Sampling(0), speculative=drafter, tree=tree).tolist() == plain, drafter
    finally:
        torch.set_num_threads(threads)


def test_ftp_recycling_hangs_the_recycled_tree_off_the_last_ftp_token():
    from ftplm.drafters import DraftContext
    from ftplm.drafters.ftp_recycling import EXTENSION_TREE

    model = MODELS["ftp"]
    hybrid = get_drafter("ftp-recycling", model)
    ftp = get_drafter("ftp", model)
    assert hybrid.draft_len == (model.cfg.n_future - 1) + max(len(p) for p in EXTENSION_TREE)
    x = torch.tensor([[3, 1, 4, 1, 5]])
    cache = model.new_cache()
    h = model.state_vectors(x[:, :-1], cache)
    ctx = DraftContext(
        x[0].tolist(), h[0, -1], max_depth=20, max_nodes=50, sampling=Sampling(0), generator=torch.Generator()
    )
    chain = ftp.propose(ctx)
    for token in range(VOCAB):  # a known adjacency matrix: token t -> (t+1, t+2, ...) mod V
        hybrid.recycling.matrix[token] = [(token + r + 1) % VOCAB for r in range(hybrid.recycling.k)]
    draft = hybrid.propose(ctx)
    n = len(chain)
    assert n == model.cfg.n_future - 1 and draft.tokens[:n] == chain.tokens and draft.parents[:n] == chain.parents
    assert len(draft) == n + len(EXTENSION_TREE)
    last = chain.tokens[-1]
    assert draft.parents[n] == n - 1 and draft.tokens[n] == (last + 1) % VOCAB  # (0,): best after the last FTP token
    assert draft.parents[n + 1] == n - 1 and draft.tokens[n + 1] == (last + 2) % VOCAB  # (1,)
    assert max(draft.depths()) == n + 3
    small = hybrid.propose(dataclasses.replace(ctx, max_depth=n + 1, max_nodes=n + 1))
    assert small.tokens == draft.tokens[: n + 1]  # budgets cut the recycled part first


# --------------------------------------------------------------------------------------------------------
# the drafter continues from the verification's first decoder step (no second pseudo-sequence / cross K/V)
# --------------------------------------------------------------------------------------------------------
def test_first_decoder_step_equals_next_token_logits_and_rows_continue_exactly():
    model = MODELS["ftp"]
    x = torch.tensor([[3, 1, 4, 1, 5, 9]])
    h = model.state_vectors(x)
    logits, start = model.first_decoder_step(h, x)
    torch.testing.assert_close(logits, model.next_token_logits(h, x), rtol=0, atol=0)
    assert start.cache.length == 1 and start.memory_kv[0][0].size(0) == x.size(1)
    for i in (0, 3, 5):  # continuing row i with one more token == decoding [x_i, next] from scratch
        row = start.row(i)
        nxt = torch.tensor([[7]])
        resumed = model.decode(nxt, row.memory_kv, row.cache)[:, -1]
        scratch = model.decode(torch.tensor([[int(x[0, i]), 7]]), model.memory_kv(model.pseudo_sequence(h[:, i])))[
            :, -1
        ]
        torch.testing.assert_close(resumed, scratch, rtol=1e-10, atol=1e-10)
        assert row.cache.length == 2 and start.cache.length == 1  # the row is a copy: the start is untouched


@pytest.mark.parametrize("min_packed", [None, 0])
@torch.inference_mode()  # as drafting runs
def test_draft_decoder_equals_the_model_decoder(min_packed, monkeypatch):
    """The drafter's lean one-token steps compute FTP.decode's logits: exactly (up to rounding) in the model's own
    dtype, and to bf16 precision where its large products run packed in bfloat16 (drafts need not be exact, only
    good). min_packed=0 puts every product of the float32 model on that packed path."""
    from ftplm.drafters.ftp import DraftDecoder
    from ftplm.kernels import ONEDNN_LINEAR, Linear

    if min_packed is not None:
        monkeypatch.setattr(Linear, "MIN_PACKED", min_packed)
    for model in (MODELS["ftp"], FLOAT32_FTP):  # float64: F.linear; float32 on CPU: packed, bf16 where supported
        decoder = DraftDecoder(model)
        products = [decoder.head] + [
            p
            for b in decoder.dec_h
            for p in (b.attn.c_attn, b.attn.c_proj, b.cross.q, b.cross.c_proj, b.mlp.c_fc, b.mlp.c_proj)
        ]
        packed = [p.packed for p in products]
        assert any(packed) == (model is FLOAT32_FTP and min_packed == 0 and ONEDNN_LINEAR) == all(packed)
        x = torch.tensor([[2, 7, 1, 8], [3, 1, 4, 1]])  # two rows, one token per step, N = 4 positions
        h = model.state_vectors(torch.tensor([[5, 9], [2, 6]]))[:, -1]
        memory = model.memory_kv(model.pseudo_sequence(h))
        expected = model.lm_head(model.decode(x, memory))  # (2, 4, V), the whole sequence at once
        dtype = decoder.product_dtype if any(packed) else expected.dtype
        tolerance = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 0.05}[dtype]
        state = decoder.start(memory)
        for i in range(x.size(1)):
            logits = decoder.step(state, x[:, i])
            assert logits.dtype == expected.dtype  # bf16 products are cast back
            scale = expected.abs().max().item()
            torch.testing.assert_close(logits, expected[:, i], rtol=tolerance, atol=tolerance * scale)
        with pytest.raises(FtplmError, match="n_future"):
            decoder.step(state, x[:, 0])


@torch.inference_mode()
def test_greedy_drafts_choose_among_the_first_ids_and_stay_lossless(monkeypatch):
    """With a vocabulary of GREEDY_MIN_VOCAB ids or more, a greedy draft step computes only the first quarter of the
    logits (the same values as the whole head's), so greedy drafts are among those ids, while sampled drafts keep
    the whole vocabulary; either way the output is plain decoding's."""
    from ftplm.drafters import DraftContext
    from ftplm.drafters.ftp import DraftDecoder, FTPDrafter, draft_decoder

    monkeypatch.setattr(DraftDecoder, "GREEDY_MIN_VOCAB", 8)
    model = random_model("ftp", vocab=16, seed=5)  # 16 ids: greedy drafts among the first 4
    decoder = DraftDecoder(model)
    assert decoder.greedy_vocab == 4 and DraftDecoder(random_model("ftp", vocab=7)).greedy_vocab == 7
    h = model.state_vectors(torch.tensor([[5, 9], [2, 6]]))[:, -1]
    memory = model.memory_kv(model.pseudo_sequence(h))
    whole, first = decoder.start(memory), decoder.start(memory)
    for token in (3, 11):
        full = decoder.step(whole, torch.tensor([token, token]))
        greedy = decoder.step(first, torch.tensor([token, token]), greedy=True)
        assert full.shape == (2, 16) and greedy.shape == (2, 4)
        torch.testing.assert_close(greedy, full[:, :4], rtol=1e-10, atol=1e-10)

    drafter = FTPDrafter(model)
    tokens = [2, 15, 8, 4]  # here the whole head's greedy chain is [4, 4, 4]: outside the first 4 ids
    h_prev = model.state_vectors(torch.tensor([tokens[:-1]]))[0, -1]
    for temperature, seed in ((0.0, 0), (1.0, 0), (1.0, 1)):
        sampling = Sampling(temperature=temperature)
        ctx = DraftContext(tokens, h_prev, 3, 10, sampling, torch.Generator().manual_seed(seed))
        draft = drafter.propose(ctx)
        assert len(draft) == 3
        if sampling.greedy:
            assert all(t < 4 for t in draft.tokens)
        else:
            assert all(q.shape == (16,) for q in draft.q)  # the whole distribution the token was drawn from

    assert draft_decoder(model).greedy_vocab == 4  # the copy generation drafts with
    for prompt in ([1], [14, 9, 12, 3], list(range(16)) + [2, 3, 5, 7]):
        idx = torch.tensor([prompt])
        plain = generate(model, idx, 8, Sampling(temperature=0.0))
        assert torch.equal(generate(model, idx, 8, Sampling(temperature=0.0), speculative="ftp"), plain)


def test_draft_decoder_is_built_once_per_model_and_rebuilt_when_weights_change():
    from ftplm.drafters.ftp import draft_decoder

    model = random_model("ftp", seed=3)
    with torch.inference_mode():
        before = draft_decoder(model)
        assert draft_decoder(model) is before
    with torch.no_grad():
        model.dec_h[0].mlp.c_fc.weight.mul_(2.0)  # an in-place update, as an optimizer step makes
    with torch.inference_mode():
        after = draft_decoder(model)
    assert after is not before
    assert torch.equal(after.dec_h[0].mlp.c_fc.weight, model.dec_h[0].mlp.c_fc.weight)


def test_ftp_tree_samples_its_children_under_sampling():
    """Greedy: top-k children, one-hot q (None). Sampling: each child a draw from its parent's q, recorded with it
    (siblings share it), so the verifier can apply the multi-draft rule."""
    from ftplm.drafters import DraftContext
    from ftplm.drafters.ftp import DEFAULT_TREE, FTPDrafter

    model = random_model("ftp", vocab=6, scale=1.0, seed=3)  # flat distributions: draws differ from the top-k
    drafter = FTPDrafter(model, tree=True)
    x = torch.tensor([[2, 5, 1, 4]])
    h = model.state_vectors(x)
    ctx = DraftContext(x[0].tolist(), h[0, -2], 3, 50, Sampling(0), torch.Generator().manual_seed(0))
    greedy = drafter.propose(ctx)
    assert len(greedy) == len(DEFAULT_TREE) and all(q is None for q in greedy.q)
    drafts = [drafter.propose(dataclasses.replace(ctx, sampling=Sampling(1.0))) for _ in range(20)]
    for draft in drafts:
        assert (draft.parents, len(draft)) == (greedy.parents, len(DEFAULT_TREE)) and all(
            q is not None for q in draft.q
        )
        for i, j in itertools.combinations(range(len(draft)), 2):
            if draft.parents[i] == draft.parents[j]:
                assert torch.equal(draft.q[i], draft.q[j])
        assert all(float(draft.q[i][t]) > 0 for i, t in enumerate(draft.tokens))
    assert len({tuple(d.tokens) for d in drafts}) > 1  # drawn, not ranked


@pytest.mark.parametrize("tree", [False, True])
def test_ftp_drafter_drafts_the_same_with_and_without_the_decoder_start(tree):
    from ftplm.drafters import DraftContext
    from ftplm.drafters.ftp import FTPDrafter

    model = MODELS["ftp"]
    drafter = FTPDrafter(model, tree=tree)
    x = torch.tensor([[2, 7, 1, 8, 2, 8]])
    h = model.state_vectors(x)
    _, start = model.first_decoder_step(h, x)
    for i in range(1, x.size(1)):  # root = x[i], drafting from the state vector before it
        ctx = DraftContext(x[0, : i + 1].tolist(), h[0, i - 1], 10, 50, Sampling(0), torch.Generator())
        fresh = drafter.propose(ctx)
        reused = drafter.propose(dataclasses.replace(ctx, decoder_start=start.row(i - 1)))
        assert (reused.tokens, reused.parents) == (fresh.tokens, fresh.parents) and len(fresh) > 0
