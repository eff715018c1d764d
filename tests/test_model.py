"""The model's contract: shapes, causality, FTP's loss (masking, gamma weighting), next-token head, KV cache."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from ftplm.config import ModelConfig, preset
from ftplm.errors import FtplmError
from ftplm.kernels import linear_cross_entropy
from ftplm.model import FTP, GPT, build_model

V = 97


def tiny_cfg(model_type: str = "ftp", **over) -> ModelConfig:
    cfg = dataclasses.replace(preset("tiny", model_type).model, vocab_size=V, block_size=32)
    return dataclasses.replace(cfg, **over)


@pytest.fixture(params=["ftp", "gpt"])
def model(request):
    torch.manual_seed(0)
    return build_model(tiny_cfg(request.param)).eval()


def test_state_vectors_of_a_lower_layer(model):
    x = torch.randint(0, V, (2, 12))
    n = model.cfg.n_layer
    assert torch.equal(model.state_vectors(x, layer=n), model.state_vectors(x))
    trunk = model.trunk
    embedded = trunk.wte(x) + trunk.wpe(torch.arange(12))
    assert torch.allclose(model.state_vectors(x, layer=0), trunk.ln_f(embedded), atol=1e-6)
    one = trunk.ln_f(trunk.h[0](embedded))
    assert torch.allclose(model.state_vectors(x, layer=1), one, atol=1e-6)
    assert not torch.allclose(model.state_vectors(x, layer=1), model.state_vectors(x), atol=1e-3)
    for bad in (-1, n + 1):
        with pytest.raises(FtplmError, match="layer must be in"):
            model.state_vectors(x, layer=bad)
    with pytest.raises(FtplmError, match="without a KV cache"):
        model.state_vectors(x, model.new_cache(), layer=1)


def test_shapes(model):
    x = torch.randint(0, V, (3, 20))
    h = model.state_vectors(x)
    assert h.shape == (3, 20, model.cfg.n_embd)
    logits = model(x).logits
    assert logits.shape == (3, 20, V)
    out = model(x, torch.randint(0, V, (3, 20)), with_metrics=True)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    if isinstance(model, FTP):
        assert out.offset_ce.shape == (model.cfg.n_future,)
        assert out.offset_acc.shape == (model.cfg.n_future,)
        pseudo = model.pseudo_sequence(h)
        assert pseudo.shape == (3, 20, model.cfg.n_pseudo, model.cfg.dec_n_embd)


def test_no_future_leakage(model):
    """Changing x_{t+1..} leaves h_t and the next-token distribution at t unchanged."""
    x = torch.randint(0, V, (2, 24))
    t = 10
    y = x.clone()
    y[:, t + 1 :] = torch.randint(0, V, (2, 24 - t - 1))
    with torch.no_grad():
        assert torch.equal(model.state_vectors(x)[:, : t + 1], model.state_vectors(y)[:, : t + 1])
        assert torch.allclose(model(x).logits[:, : t + 1], model(y).logits[:, : t + 1])


def test_ftp_next_token_is_decoder_first_output():
    torch.manual_seed(0)
    m = FTP(tiny_cfg()).eval()
    x = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        h = m.state_vectors(x)
        # decode the full teacher-forced window; the first output must not depend on the later inputs
        inputs, _ = m.teacher_forcing(x, torch.roll(x, -1, 1))
        kv = m.memory_kv(m.pseudo_sequence(h).flatten(0, 1))
        first = m.lm_head(m.decode(inputs.flatten(0, 1), kv))[:, 0].view(2, 16, V)
        assert torch.allclose(m(x).logits, first, atol=1e-5)
        assert torch.allclose(m.next_token_logits(h, x), first, atol=1e-5)


def test_teacher_forcing_windows_and_end_masking():
    m = FTP(tiny_cfg(n_future=3))
    x = torch.tensor([[10, 11, 12, 13, 14]])
    y = torch.tensor([[11, 12, 13, 14, 15]])
    inputs, future = m.teacher_forcing(x, y)
    assert future[0].tolist() == [[11, 12, 13], [12, 13, 14], [13, 14, 15], [14, 15, -1], [15, -1, -1]]
    assert inputs[0, :, 0].tolist() == [10, 11, 12, 13, 14]
    assert inputs[0, 0].tolist() == [10, 11, 12]
    assert (inputs >= 0).all()


VARIANTS = [{"decoder_inputs": "masked"}, {"input_dropout": 0.5}, {"future_bow": 0.5}]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: next(iter(v)))
def test_ftp_variants_keep_the_model_contract(variant):
    """Each variant trains (finite loss, gradients reach the pseudo-sequence projection), its next-token logits are
    the decoder's first output, and the future never leaks into position t."""
    torch.manual_seed(0)
    m = FTP(tiny_cfg(**variant))
    x, y = torch.randint(0, V, (2, 16)), torch.randint(0, V, (2, 16))
    out = m(x, y)
    out.loss.backward()
    assert torch.isfinite(out.loss) and m.to_pseudo.weight.grad.abs().sum() > 0
    m.eval()
    with torch.no_grad():
        h = m.state_vectors(x)
        inputs, _ = m.teacher_forcing(x, torch.roll(x, -1, 1))
        first = m.lm_head(m.decode(inputs.flatten(0, 1), m.memory_kv(m.pseudo_sequence(h).flatten(0, 1))))[:, 0]
        assert torch.allclose(m(x).logits, first.view(2, 16, V), atol=1e-5)
        z = x.clone()
        z[:, 9:] = torch.randint(0, V, (2, 7))
        assert torch.allclose(m(x).logits[:, :9], m(z).logits[:, :9], atol=1e-6)


def test_masked_inputs_and_input_dropout():
    """masked: every decoder input is MASK, so the logits at t depend on h_t alone (not on x_t); input_dropout
    replaces inputs with MASK at rate p in training only; future_bow adds its loss to the same model's."""
    from ftplm.model import MASK

    x, y = torch.tensor([[10, 11, 12, 13, 14]]), torch.tensor([[11, 12, 13, 14, 15]])
    masked = FTP(tiny_cfg(decoder_inputs="masked", n_future=3))
    assert (masked.teacher_forcing(x, y)[0] == MASK).all()
    h = masked.state_vectors(x)
    with torch.no_grad():
        assert torch.equal(masked.next_token_logits(h, x), masked.next_token_logits(h, torch.zeros_like(x)))
    torch.manual_seed(1)
    dropped = FTP(tiny_cfg(input_dropout=0.5))
    x, y = torch.randint(0, V, (4, 32)), torch.randint(0, V, (4, 32))
    rate = (dropped.teacher_forcing(x, y)[0] == MASK).float().mean().item()
    assert 0.4 < rate < 0.6
    assert not (dropped.eval().teacher_forcing(x, y)[0] == MASK).any()  # evaluation sees the tokens
    assert FTP(tiny_cfg()).dec_mask is None  # the paper's design has no mask embedding
    torch.manual_seed(2)
    plain = FTP(tiny_cfg()).eval()
    bow = FTP(tiny_cfg(future_bow=1.0)).eval()
    bow.load_state_dict(plain.state_dict())
    with torch.no_grad():
        assert bow(x, y).loss > plain(x, y).loss + 1.0  # + the bag-of-future CE (~ln V at init)
        assert bow(x, y).next_token_ce == plain(x, y).next_token_ce


@pytest.mark.parametrize("bad", [{"decoder_inputs": "none"}, {"input_dropout": 1.5}, {"future_bow": -1.0}])
def test_variant_fields_are_validated(bad):
    with pytest.raises(FtplmError, match=next(iter(bad))):
        tiny_cfg(**bad).validate()


def test_masked_targets_do_not_change_the_loss():
    """Targets past the end are ignored: the loss equals a hand computation over valid targets only."""
    torch.manual_seed(0)
    m = FTP(tiny_cfg(n_future=4, gamma=0.5)).eval()
    x = torch.randint(0, V, (2, 12))
    y = torch.randint(0, V, (2, 12))
    out = m(x, y)
    inputs, future = m.teacher_forcing(x, y)
    h = m.state_vectors(x)
    kv = m.memory_kv(m.pseudo_sequence(h).flatten(0, 1))
    logits = m.lm_head(m.decode(inputs.flatten(0, 1), kv))  # (B*T, N, V)
    ce_k = []
    for k in range(4):
        t = future.flatten(0, 1)[:, k]
        ce_k.append(F.cross_entropy(logits[:, k][t >= 0], t[t >= 0]))
    w = torch.tensor([0.5**k for k in range(4)])
    expected = (w * torch.stack(ce_k)).sum() / w.sum()
    assert torch.allclose(out.loss, expected, atol=1e-5)
    assert torch.allclose(out.offset_ce, torch.stack(ce_k), atol=1e-5)
    # the last position has only one valid target; a sequence of length 1 has exactly one valid target overall
    short = m(x[:, :1], y[:, :1])
    assert torch.allclose(short.loss, short.offset_ce[0], atol=1e-6)  # offsets 2..N carry no weight


def test_gamma_weighting():
    """gamma=1 weights offsets equally; a smaller gamma moves the loss towards CE_1."""
    torch.manual_seed(0)
    base = FTP(tiny_cfg(gamma=1.0)).eval()
    x = torch.randint(0, V, (2, 16))
    y = torch.randint(0, V, (2, 16))
    out = base(x, y)
    assert torch.allclose(out.loss, out.offset_ce.mean(), atol=1e-5)
    base.offset_weights = torch.tensor([0.9**k for k in range(base.cfg.n_future)])
    out9 = base(x, y)
    w = base.offset_weights
    assert torch.allclose(out9.loss, (w * out9.offset_ce).sum() / w.sum(), atol=1e-5)


def test_linear_cross_entropy_matches_autograd():
    torch.manual_seed(0)
    h = torch.randn(300, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (300,))
    t[::7] = -1
    coef = torch.rand(300, dtype=torch.float64) * (t >= 0)
    loss, ce = linear_cross_entropy(h, w, t, coef)
    loss.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy(h @ w.T, t, ignore_index=-1, reduction="none")
    (ref * coef).sum().backward()
    assert torch.allclose(loss, (ref * coef).sum())
    assert torch.allclose(ce, ref)
    assert torch.allclose(gh, h.grad) and torch.allclose(gw, w.grad)


def test_linear_cross_entropy_scores_several_targets_under_one_softmax():
    """(rows, K) targets: each scored under its row's one softmax, i.e. the rows repeated K times with one target
    each (the bag-of-future loss), duplicates and ignored (-1) targets included."""
    torch.manual_seed(0)
    h = torch.randn(70, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, 8, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 13, (70, 4))
    t[:, 3] = t[:, 2]  # the same token twice in a row's bag
    t[::5, 1] = -1
    coef = torch.rand(70, 4, dtype=torch.float64) * (t >= 0)
    loss, ce = linear_cross_entropy(h, w, t, coef, classes=12)
    loss.backward()
    grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref_loss, ref_ce = linear_cross_entropy(h.repeat_interleave(4, 0), w, t.flatten(), coef.flatten(), classes=12)
    ref_loss.backward()
    assert ce.shape == t.shape and torch.allclose(ce.flatten(), ref_ce) and torch.allclose(loss, ref_loss)
    assert torch.allclose(grads[0], h.grad) and torch.allclose(grads[1], w.grad)


@pytest.mark.parametrize("model_type", ["ftp", "gpt"])
def test_padded_vocabulary_computes_the_unpadded_model(model_type):
    """vocab_multiple pads the embedding / LM-head rows (97 -> 128) and changes nothing else: with the same real rows
    the logits, loss and gradients are the unpadded model's, and the padding rows get no gradient."""
    plain = build_model(tiny_cfg(model_type))
    padded = build_model(tiny_cfg(model_type, vocab_multiple=64))
    assert padded.lm_head.weight.shape[0] == padded.cfg.padded_vocab_size == 128
    with torch.no_grad():
        for p, q in zip(padded.parameters(), plain.parameters()):
            if p.shape != q.shape:  # a vocabulary matrix: real rows copied, padding rows large (would dominate)
                p.fill_(5.0)
            p[: q.size(0)].copy_(q)
    x, y = torch.randint(0, V, (2, 24)), torch.randint(0, V, (2, 24))
    assert padded.eval()(x).logits.shape[-1] == V
    assert torch.allclose(padded(x).logits, plain.eval()(x).logits, atol=1e-5)
    out_p, out = padded.train()(x, y, with_metrics=True), plain.train()(x, y, with_metrics=True)
    assert torch.allclose(out_p.loss, out.loss, atol=1e-5)
    if model_type == "ftp":
        assert torch.equal(out_p.offset_acc, out.offset_acc)
    out_p.loss.backward()
    out.loss.backward()
    grad = padded.lm_head.weight.grad
    assert torch.allclose(grad[:V], plain.lm_head.weight.grad, atol=1e-5)
    assert not grad[V:].any()


def test_linear_cross_entropy_ignores_padding_classes():
    torch.manual_seed(0)
    h = torch.randn(40, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, 8, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 11, (40,))
    loss, ce, argmax = linear_cross_entropy(h, w, t, torch.ones(40, dtype=torch.float64), True, classes=11)
    loss.backward()
    ref = F.cross_entropy(h @ w[:11].T, t, reduction="none")
    assert torch.allclose(ce, ref) and (argmax < 11).all()
    assert not w.grad[11:].any()


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch's own
def test_linear_cross_entropy_compiles_into_one_graph():
    """On CUDA training runs under torch.compile by default: the chunked loss (several chunks, padding classes)
    compiles without a graph break and gives eager's loss and gradients (checked here on the CPU backend)."""
    torch.manual_seed(0)
    h = torch.randn(600, 32, requires_grad=True)
    w = torch.randn(100, 32, requires_grad=True)
    t, coef = torch.randint(0, 97, (600,)), torch.full((600,), 1 / 600)
    compiled = torch.compile(lambda h, w: linear_cross_entropy(h, w, t, coef, classes=97)[0], fullgraph=True)
    loss = compiled(h, w)
    loss.backward()
    grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    eager = linear_cross_entropy(h, w, t, coef, classes=97)[0]
    eager.backward()
    assert torch.allclose(loss, eager, atol=1e-6)
    assert torch.allclose(grads[0], h.grad, atol=1e-6) and torch.allclose(grads[1], w.grad, atol=1e-6)


def test_kv_cache_matches_full_forward(model):
    x = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        full = model.state_vectors(x)
        cache = model.new_cache()
        parts = [model.state_vectors(x[:, :7], cache)]
        for t in range(7, 20):
            parts.append(model.state_vectors(x[:, t : t + 1], cache))
        assert torch.allclose(full, torch.cat(parts, 1), atol=1e-5)
        # rolling back and re-feeding gives the same again
        cache.length = 12
        again = model.state_vectors(x[:, 12:15], cache)
        assert torch.allclose(again, full[:, 12:15], atol=1e-5)
    # several tokens after cached ones (the causal mask becomes additive in the attention's dtype): also under
    # CPU bf16 autocast, where the queries are bf16
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = model.state_vectors(x)
        cache = model.new_cache()
        model.state_vectors(x[:, :7], cache)
        assert torch.allclose(model.state_vectors(x[:, 7:12], cache), full[:, 7:12], atol=0.05)


def test_context_limit_is_an_error(model):
    from ftplm.errors import FtplmError

    with pytest.raises(FtplmError, match="context length"):
        model.state_vectors(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("model_type", ["ftp", "gpt"])
def test_overfits_one_batch(model_type):
    torch.manual_seed(0)
    m = build_model(tiny_cfg(model_type))
    x = torch.randint(0, V, (4, 32))
    y = torch.roll(x, -1, 1)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss = m(x, y).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 4.0
    assert loss.item() < 0.3, f"{model_type} did not overfit one batch: {first:.2f} -> {loss.item():.2f}"


def test_tied_weights_and_param_count():
    g = GPT(tiny_cfg("gpt"))
    assert g.lm_head.weight is g.trunk.wte.weight
    f = FTP(tiny_cfg("ftp"))
    assert f.lm_head.weight is f.dec_wte.weight
    assert f.num_params() > g.num_params()


def test_same_seed_same_starting_trunk():
    """At one seed FTP and GPT start from identical trunks (a fair comparison); FTP's decoder draws from its own
    generator, its residual projections scaled by its own depth; another seed gives another trunk."""

    def built(model_type: str, seed: int, **over):
        torch.manual_seed(seed)
        return build_model(tiny_cfg(model_type, **over))

    ftp, gpt = built("ftp", 3, dec_n_layer=2), built("gpt", 3)
    f, g = ftp.trunk.state_dict(), gpt.trunk.state_dict()
    assert f.keys() == g.keys() and all(torch.equal(f[k], g[k]) for k in f)
    assert not torch.equal(built("gpt", 4).trunk.wte.weight, g["wte.weight"])
    n_layer = ftp.cfg.n_layer
    wide = built("ftp", 5, n_embd=256, dec_n_embd=256, n_head=4)  # enough entries for a std to 2%
    assert wide.trunk.h[0].attn.c_proj.weight.std().item() == pytest.approx(0.02 / (2 * n_layer) ** 0.5, rel=0.02)
    assert wide.dec_h[0].attn.c_proj.weight.std().item() == pytest.approx(0.02 / (2 * 1) ** 0.5, rel=0.02)
    assert not torch.equal(ftp.dec_h[0].mlp.c_fc.weight[:4, :4], ftp.trunk.h[0].mlp.c_fc.weight[:4, :4])


def test_pseudo_positions_norms_and_biases_are_not_decayed():
    from ftplm.config import TrainConfig
    from ftplm.train import make_optimizer

    model = FTP(tiny_cfg("ftp", bias=True))
    decay, no_decay = make_optimizer(model, TrainConfig(), torch.device("cpu")).param_groups
    assert decay["weight_decay"] > 0 and no_decay["weight_decay"] == 0
    in_group = lambda group, p: any(p is q for q in group["params"])  # noqa: E731 - a one-line local helper
    assert in_group(no_decay, model.pseudo_pos) and in_group(no_decay, model.dec_ln_f.weight)
    assert in_group(no_decay, model.trunk.h[0].attn.c_attn.bias)
    assert in_group(decay, model.to_pseudo.weight) and in_group(decay, model.trunk.wpe.weight)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_pseudo_norm_normalises_each_pseudo_vector_and_keeps_the_weights():
    """pseudo_norm adds no parameters (old checkpoints load unchanged) and gives unit-scale pseudo-vectors."""
    torch.manual_seed(0)
    plain = FTP(tiny_cfg())
    normed = FTP(tiny_cfg(pseudo_norm=True))
    normed.load_state_dict(plain.state_dict())  # same parameter set
    h = torch.randn(3, 5, plain.cfg.n_embd) * 7
    pseudo = normed.pseudo_sequence(h) - normed.pseudo_pos
    assert torch.allclose(pseudo.mean(-1), torch.zeros(3, 5, normed.cfg.n_pseudo), atol=1e-5)
    assert torch.allclose(pseudo.var(-1, unbiased=False), torch.ones(3, 5, normed.cfg.n_pseudo), atol=1e-3)
    assert not torch.allclose(plain.pseudo_sequence(h), normed.pseudo_sequence(h))
    x = torch.randint(0, V, (2, 16))
    assert torch.isfinite(normed(x, x).loss)


def test_pseudo_norm_must_be_a_bool():
    with pytest.raises(FtplmError, match="pseudo_norm"):
        tiny_cfg(pseudo_norm="yes").validate()


# --------------------------------------------------------------------------------------------------------
# Linear: the packed oneDNN inference path computes the same product, and only where it may
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows", [1, 2, 4, 32, 33, 300])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
def test_linear_packed_path_matches_f_linear(rows, bias, threads):
    from ftplm.kernels import _PACKED, ONEDNN_LINEAR, Linear

    assert ONEDNN_LINEAR  # the pinned CPU torch has oneDNN: the fast path is not silently off
    torch.manual_seed(rows)
    layer = Linear(256, 640, bias=bias).eval()  # 164k weights: packed
    x = torch.randn(1, rows, 256)
    ref = F.linear(x, layer.weight, layer.bias)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            out = layer(x)
    finally:
        torch.set_num_threads(before)
    assert layer in _PACKED
    assert out.shape == ref.shape == (1, rows, 640) and out.dtype == x.dtype and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_linear_repacks_after_the_weight_changes_and_stays_copyable():
    import copy
    import io
    import pickle

    from ftplm.kernels import _PACKED, Linear

    torch.manual_seed(0)
    layer = Linear(256, 640, bias=False).eval()
    x = torch.randn(3, 256)
    with torch.no_grad():
        layer(x)
        packed = _PACKED[layer][1]
        layer.weight.add_(1.0)  # an optimizer step in between
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight), rtol=1e-5, atol=1e-4)
        assert _PACKED[layer][1] is not packed
        layer.load_state_dict({"weight": torch.randn(640, 256)})
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight), rtol=1e-5, atol=1e-4)
    copy.deepcopy(layer)  # the opaque packed tensor lives off the module
    pickle.dumps(layer)
    torch.save(layer.state_dict(), io.BytesIO())


def test_linear_keeps_f_linear_for_training_grad_autocast_and_small_weights():
    from ftplm.kernels import _PACKED, Linear

    torch.manual_seed(0)
    big, small = Linear(256, 640), Linear(256, 256)
    x = torch.randn(2, 256, requires_grad=True)
    big(x).sum().backward()  # training mode: autograd flows as usual
    assert big.weight.grad is not None and x.grad is not None
    big.eval()
    big(x).sum().backward()  # eval with autograd on (attributions): still F.linear, still differentiable
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert big(x).dtype == torch.bfloat16  # autocast keeps its semantics
    with torch.no_grad():
        small.eval()(torch.randn(2, 256))
    assert big not in _PACKED and small not in _PACKED
