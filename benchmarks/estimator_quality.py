"""How noisy is Hutchinson? Relative spread of the loss and its gradient against the exact metric.

For fixed decoder weights and fixed (augmented) codes, draw the probes ``n_draws`` times and
compare the one-batch Hutchinson loss ``L_K`` (``K`` probes per sample) and its parameter gradient
``g_K`` with the exact loss ``L`` and gradient ``g``:

- ``rel_std_loss = std(L_K) / |L|``, ``rel_bias_loss = (mean(L_K) - L) / |L|`` (the ratio of
  batch means is biased but consistent);
- ``rel_std_grad = sqrt(mean ||g_K - mean g_K||^2) / ||g||``, ``rel_rmse_grad`` the same about
  ``g``, and the mean cosine between ``g_K`` and ``g``.

Together with the latent-sweep timings this says where ``estimator="auto"`` should stop taking
the exact metric (``isofast.planning.EXACT_MAX_LATENT``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import isofast
from benchmarks.cases import Case, make_inputs


def _loss_and_grad(decoder: torch.nn.Module, z: torch.Tensor, probes: torch.Tensor | None,
                   clock: Callable[[], float] = time.perf_counter) -> tuple[float, torch.Tensor, float]:
    params = list(decoder.parameters())
    t0 = clock()
    with isofast.backends.use("torch"):
        if probes is None:
            loss = isofast.relaxed_distortion(decoder, z, eta=None, estimator="exact")
        else:
            loss = isofast.relaxed_distortion(decoder, z, eta=None, estimator="hutchinson", probes=probes)
    grads = torch.autograd.grad(loss, params)
    dt = clock() - t0
    return float(loss.detach()), torch.cat([g.reshape(-1) for g in grads]).double(), dt


def estimator_quality(
    m_values: tuple[int, ...] = (2, 8, 16),
    ks: tuple[int, ...] = (1, 4, 16),
    n_draws: int = 100,
    batch: int = 100,
    device: torch.device | str = "cpu",
    seed: int = 0,
    clock: Callable[[], float] = time.perf_counter,
) -> list[dict[str, Any]]:
    """One record per ``(m, K)`` (and one exact record per ``m``) on the paper decoder's widths
    with latent width ``m``, at ``batch`` codes, over ``n_draws`` probe draws."""
    records: list[dict[str, Any]] = []
    dev = torch.device(device)
    for m in m_values:
        case = Case(f"quality-m{m}", "quality", batch, m=m)
        inputs = make_inputs(case, dev, n_probes=1, seed=seed)
        dec, z = inputs.decoder, inputs.z
        loss_ex, g_ex, t_ex = _loss_and_grad(dec, z, None, clock)
        t_ex = min(t_ex, _loss_and_grad(dec, z, None, clock)[2])
        g_norm = float(g_ex.norm())
        base = {"case": case.name, "group": "quality", "batch": batch, "m": m, "widths": list(case.widths),
                "activation": case.act, "out_activation": case.out_act, "phase": "fwd_bwd", "status": "ok",
                "error": None, "loss_exact": loss_ex, "exact_ms": t_ex * 1e3}
        records.append({**base, "provider": "isofast-torch-exact", "estimator": "exact", "n_probes": None,
                        "median_ms": t_ex * 1e3, "n_draws": 1, "loss_mean": loss_ex, "rel_bias_loss": 0.0,
                        "rel_std_loss": 0.0, "rel_std_grad": 0.0, "rel_rmse_grad": 0.0, "mean_cos_grad": 1.0})
        gen = torch.Generator(device="cpu").manual_seed(seed + 100 + m)
        for k in ks:
            losses, grads, times = [], [], []
            for _ in range(n_draws):
                probes = torch.randn(batch, k, m, generator=gen).to(dev, z.dtype)
                loss, g, dt = _loss_and_grad(dec, z, probes, clock)
                losses.append(loss)
                grads.append(g)
                times.append(dt)
            gs = torch.stack(grads)
            g_mean = gs.mean(0)
            cos = torch.nn.functional.cosine_similarity(gs, g_ex.unsqueeze(0), dim=1)
            records.append({
                **base, "provider": f"isofast-torch-hutch-K{k}", "estimator": "hutchinson", "n_probes": k,
                "median_ms": statistics.median(times) * 1e3, "n_draws": n_draws,
                "loss_mean": statistics.fmean(losses),
                "rel_bias_loss": (statistics.fmean(losses) - loss_ex) / abs(loss_ex),
                "rel_std_loss": statistics.stdev(losses) / abs(loss_ex),
                "rel_std_grad": float((gs - g_mean).square().sum(1).mean().sqrt()) / g_norm,
                "rel_rmse_grad": float((gs - g_ex).square().sum(1).mean().sqrt()) / g_norm,
                "mean_cos_grad": float(cos.mean()),
            })
    return records
