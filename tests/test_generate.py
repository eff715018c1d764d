"""Plain generation and sampling: greedy, top-k / top-p filtering, seeds, EOS and the context limit."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import ftplm
from ftplm.config import preset
from ftplm.errors import FtplmError
from ftplm.generate import Sampling, generate
from ftplm.model import build_model


@pytest.fixture(params=["ftp", "gpt"])
def model(request):
    torch.manual_seed(1)
    cfg = dataclasses.replace(preset("tiny", request.param).model, vocab_size=50, block_size=24)
    return build_model(cfg).eval()


def test_greedy_is_argmax_of_full_forward(model):
    idx = torch.randint(0, 50, (2, 5))
    out = generate(model, idx, 8, Sampling(temperature=0))
    assert out.shape == (2, 13)
    seq = idx
    for _ in range(8):  # no cache: recompute everything each step
        nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)


def test_top_k_one_equals_greedy_and_seed_reproducible(model):
    idx = torch.randint(0, 50, (1, 4))
    greedy = generate(model, idx, 10, Sampling(temperature=0))
    assert torch.equal(generate(model, idx, 10, Sampling(temperature=1.0, top_k=1), seed=3), greedy)
    a = generate(model, idx, 10, Sampling(temperature=1.0), seed=7)
    b = generate(model, idx, 10, Sampling(temperature=1.0), seed=7)
    assert torch.equal(a, b)


def test_sampling_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = Sampling(temperature=1.0, top_k=2).probs(logits)
    assert torch.allclose(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    p = Sampling(temperature=1.0, top_p=0.7).probs(logits)  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: keep two
    assert torch.allclose(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    p = Sampling(temperature=1.0, top_p=0.5).probs(logits)
    assert torch.allclose(p, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    hot = Sampling(temperature=2.0).probs(logits)
    assert hot[0, 3] > 0.05 and torch.allclose(hot.sum(), torch.tensor(1.0))
    assert torch.equal(Sampling(temperature=0).probs(logits), torch.tensor([[1.0, 0, 0, 0]]))


@pytest.mark.parametrize("n", [1, 3])
def test_draws_follow_the_distribution(n):
    """Sampling.draw (one draw = the first of two multinomial draws with replacement, for speed) samples each row
    of probs independently, never a zero-probability token, with the right frequencies (chi-square)."""
    from scipy.stats import chisquare

    probs = torch.tensor([[0.5, 0.0, 0.3, 0.15, 0.05], [0.0, 0.0, 0.0, 1.0, 0.0]])
    generator = torch.Generator().manual_seed(0)
    draws = torch.cat([Sampling.draw(probs, generator, n) for _ in range(4000)], dim=1)  # (2, 4000 n)
    assert draws.shape == (2, 4000 * n) and Sampling.draw(probs[0], generator, n).shape == (n,)
    assert bool((draws[1] == 3).all()) and not bool((draws[0] == 1).any())
    observed = torch.bincount(draws[0], minlength=5)[[0, 2, 3, 4]].tolist()
    expected = [p * draws.size(1) for p in (0.5, 0.3, 0.15, 0.05)]
    assert chisquare(observed, expected).pvalue > 1e-3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
    ],
)
def test_invalid_sampling_values(kwargs, message):
    with pytest.raises(FtplmError, match=message):
        Sampling(**kwargs)


def test_stops_at_context_and_rejects_overlong_prompts(model):
    out = generate(model, torch.zeros(1, 20, dtype=torch.long), 50, Sampling(temperature=0))
    assert out.shape == (1, 24)  # block_size
    with pytest.raises(FtplmError, match="context"):
        generate(model, torch.zeros(1, 24, dtype=torch.long), 5, Sampling(temperature=0))


def test_eos_stops_each_row(model):
    idx = torch.randint(0, 50, (3, 3))
    free = generate(model, idx, 10, Sampling(temperature=0))
    eos = int(free[0, 5])  # the token row 0 produces third: call it EOS
    out = generate(model, idx, 10, Sampling(temperature=0), eos_id=eos)
    n = out.size(1) - 3  # generation ends early once every row has produced EOS
    assert eos in out[0, 3:].tolist()
    for row in range(3):
        free_row = free[row, 3:].tolist()
        until = min(n, free_row.index(eos) + 1 if eos in free_row else len(free_row))
        assert out[row, 3 : 3 + until].tolist() == free_row[:until]
        assert all(t == eos for t in out[row, 3 + until :].tolist())


def test_text_api_generate(tiny_ftp_run):
    m = ftplm.load(tiny_ftp_run)
    text = m.generate("The", max_new_tokens=12, temperature=0)
    assert isinstance(text, str)
    assert m.generate("The", max_new_tokens=12, temperature=0) == text
    ids = m.generate_ids("The", max_new_tokens=12, temperature=0, stop_at_eos=False)
    assert len(ids) == 12
    with pytest.raises(FtplmError, match="empty"):
        m.generate("", max_new_tokens=3)
    long_prompt = " word" * 200
    with pytest.raises(FtplmError, match="context"):
        m.generate(long_prompt, max_new_tokens=3)
