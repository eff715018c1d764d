"""`ftplm bench train`: training throughput of GPT and FTP on the same trunk, measured side by side.

Both models are built from one preset (FTP adds its projection and decoder), fed the same random token batches,
and stepped alternately (GPT step, FTP step, ...) after warm-up, so that machine noise hits both alike. The ratio
FTP ÷ GPT is the price of predicting N tokens per position instead of one.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from ftplm.config import preset as get_preset
from ftplm.config import with_overrides
from ftplm.model import build_model
from ftplm.train import autocast, make_optimizer, pick_device, resolve_dtype


def _timed_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                device: torch.device, dtype: str, grad_clip: float) -> float:
    """One full optimizer step (forward, backward, clip, AdamW) as the trainer does it; returns seconds."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with autocast(device, dtype):
        loss = model(x, y).loss
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench_train(
    preset: str = "small",
    steps: int = 8,
    warmup: int = 2,
    batch_size: int | None = None,
    device: str = "auto",
    dtype: str | None = None,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Tokens/s of GPT and FTP (same trunk, same batches, interleaved steps) and FTP ÷ GPT."""
    dev = pick_device(device)
    torch.manual_seed(seed)
    figures: dict[str, Any] = {"preset": preset, "device": str(dev), "steps": steps, "warmup": warmup, "models": {}}
    setups = {}
    for model_type in ("gpt", "ftp"):
        chosen = get_preset(preset, model_type)  # type: ignore[arg-type]
        cfg = with_overrides(chosen.model, overrides or {}).validate()
        tcfg = chosen.train
        model = build_model(cfg).to(dev).train()
        setups[model_type] = (model, make_optimizer(model, tcfg, dev), cfg, tcfg)
    _, _, cfg, tcfg = setups["ftp"]
    B, T = batch_size or tcfg.batch_size, cfg.block_size
    run_dtype = resolve_dtype(dtype or tcfg.dtype, dev)
    figures.update(batch_size=B, block_size=T, dtype=run_dtype, n_future=cfg.n_future, n_pseudo=cfg.n_pseudo,
                   dec_n_layer=cfg.dec_n_layer, dec_n_embd=cfg.dec_n_embd)
    generator = torch.Generator().manual_seed(seed)
    times: dict[str, list[float]] = {"gpt": [], "ftp": []}
    for i in range(warmup + steps):
        data = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=generator)
        x, y = data[:, :-1].to(dev), data[:, 1:].to(dev)
        order = ("gpt", "ftp") if i % 2 == 0 else ("ftp", "gpt")  # alternate who goes first
        for model_type in order:
            model, optimizer, _, tc = setups[model_type]
            seconds = _timed_step(model, optimizer, x, y, dev, run_dtype, tc.grad_clip)
            if i >= warmup:
                times[model_type].append(seconds)
    for model_type, (model, _, _, _) in setups.items():
        median = statistics.median(times[model_type])
        figures["models"][model_type] = {
            "params": model.num_params(),
            "step_s_median": median,
            "step_s_all": times[model_type],
            "tokens_per_s": B * T / median,
        }
    figures["ftp_over_gpt"] = figures["models"]["ftp"]["tokens_per_s"] / figures["models"]["gpt"]["tokens_per_s"]
    _print(figures)
    return figures


def _print(f: dict[str, Any]) -> None:
    print(f"bench train: preset {f['preset']}, {f['device']}, {f['dtype']}, batch {f['batch_size']}x{f['block_size']}, "
          f"{f['steps']} timed steps each after {f['warmup']} warm-up (interleaved)")
    print(f"{'model':<6}{'params':>12}{'step (s)':>11}{'tokens/s':>11}")
    for name, m in f["models"].items():
        print(f"{name:<6}{m['params']:>12,}{m['step_s_median']:>11.3f}{m['tokens_per_s']:>11,.0f}")
    print(f"FTP / GPT throughput: {f['ftp_over_gpt']:.2f} (N={f['n_future']}, P={f['n_pseudo']}, "
          f"decoder {f['dec_n_layer']}x{f['dec_n_embd']})")
