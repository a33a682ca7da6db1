"""Which estimator should ``estimator="auto"`` take on the generic path? Variance per unit time.

For an MLP (behind a lambda, so on the generic path), the ``DeConvNet28``-style conv decoder (as a
module on the generic path, and as an ``nn.Sequential`` on the stream path: ``deconv-seq``) and
the residual GroupNorm/attention decoder (image-shaped latent), at latent sizes ``m``, with fixed
weights and codes, every estimator is run ``draws`` times with fresh probes (``forward-K*``: the
default orthonormal frames; ``forward-gauss-K*``: independent Gaussian probes); the draws alternate
between estimators (one fwd+bwd of the regulariser each, timed). Per estimator:

- ``ms``: median fwd+bwd time;
- ``rel_var_loss = var(L) / L_ref^2`` and ``rel_var_grad = E ||g - mean g||^2 / ||g_ref||^2`` with
  the reference the exact loss and gradient (or the forward estimator's mean where exact is not run);
- ``loss_cost = rel_var_loss * ms`` and ``grad_cost = rel_var_grad * ms``: the variance left after
  one millisecond's worth of averaging (lower is better; exact has 0).

Also the official recipe (one probe) and isofast 0.1's repeated-codes generic path (K = 2) as time
references. ``python -m benchmarks.estimator_choice --out benchmarks/results`` writes
``estimator_choice.json`` and ``estimator_choice.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import isofast
from isofast import baselines
from benchmarks.cases import deconv28
from tests.helpers import DeConvNet28, ResAttnDecoder

ATTN_LATENTS = {4: (1, 2, 2), 16: (4, 2, 2), 64: (4, 4, 4), 256: (4, 8, 8)}


def decoders(m: int) -> dict[str, tuple[Callable[[Tensor], Tensor], nn.Module, tuple[int, ...]]]:
    """name -> (callable, module holding the parameters, latent shape)."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(m, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 784), nn.Sigmoid())
    out = {"mlp": (lambda z: mlp(z), mlp, (m,)), "deconv": (DeConvNet28(m, nh=2), None, (m,)),
           "deconv-seq": (deconv28(m, nh=2), None, (m,))}
    if m in ATTN_LATENTS:
        out["attn"] = (ResAttnDecoder(ATTN_LATENTS[m], width=16, groups=4), None, ATTN_LATENTS[m])
    return {k: (f, f if mod is None else mod, shape) for k, (f, mod, shape) in out.items()}


def _estimators(m: int) -> list[tuple[str, str, int | None]]:
    rows: list[tuple[str, str, int | None]] = [("exact", "exact", None)] if m <= 64 else []
    rows += [(f"forward-K{k}", "forward", k) for k in (2, 4, 8, 16)]
    rows += [(f"forward-gauss-K{k}", "forward-gauss", k) for k in (2, 4)]
    rows += [(f"hutchinson-K{k}", "hutchinson", k) for k in (1, 2)]
    return rows + [("official-K1", "official", 1), ("repeat-K2", "repeat", 2)]


def _run(kind: str, dec: Callable[[Tensor], Tensor], params: list[Tensor], z: Tensor, probes: Tensor | None,
         gen: torch.Generator) -> tuple[float, Tensor, float]:
    t0 = time.perf_counter()
    if kind == "official":
        # The official recipe's double backward needs the math attention kernel.
        with sdpa_kernel(SDPBackend.MATH):
            loss = baselines.official_relaxed_distortion(dec, z, probes[:, 0])  # type: ignore[index]
    elif kind == "repeat":
        loss = baselines.repeated_codes_hutchinson(dec, z, probes)  # type: ignore[arg-type]
    elif kind == "forward":  # the default draw: orthonormal frames where K <= m
        loss = isofast.relaxed_distortion(dec, z, eta=None, estimator="forward", n_probes=probes.shape[1],  # type: ignore[union-attr]
                                          generator=gen)
    else:
        estimator = "forward" if kind == "forward-gauss" else kind
        loss = isofast.relaxed_distortion(dec, z, eta=None, estimator=estimator, probes=probes)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    dt = time.perf_counter() - t0
    flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])
    return float(loss.detach()), flat.double(), dt


def _mcn(dec: Callable[[Tensor], Tensor], z: Tensor) -> float:
    with torch.no_grad():
        return float(isofast.metrics.mean_condition_number(isofast.pullback_metric(dec, z)))


def regularise(dec: Callable[[Tensor], Tensor], holder: nn.Module, shape: tuple[int, ...], target_mcn: float,
               gen: torch.Generator, batch: int = 32, max_steps: int = 400, lr: float = 3e-3) -> dict[str, Any]:
    """Train the decoder on the regulariser alone (Adam, mixup ``eta = 0.2``, 8 orthonormal probe
    directions or the exact metric) until the mean condition number of ``H`` on a fixed batch of
    codes is at most ``target_mcn``: the regime a regularised decoder spends its training in (the
    IRVAE reaches MCN 1.3-1.5 on MNIST, README). Returns the MCN before and after and the steps."""
    z_eval = torch.randn(8, *shape, generator=gen)
    opt = torch.optim.Adam(holder.parameters(), lr=lr)
    start = mcn = _mcn(dec, z_eval)
    step = 0
    while mcn > target_mcn and step < max_steps:
        for _ in range(10):
            z = torch.randn(batch, *shape, generator=gen)
            loss = isofast.relaxed_distortion(dec, z, eta=0.2, n_probes=min(8, z[0].numel()), estimator="forward",
                                              generator=gen)
            opt.zero_grad()
            loss.backward()
            opt.step()
        step += 10
        mcn = _mcn(dec, z_eval)
    return {"mcn_start": start, "mcn": mcn, "steps": step}


def measure(m_values: tuple[int, ...], batch: int, draws: int, seed: int = 0,
            names: tuple[str, ...] = (), target_mcn: float | None = None) -> list[dict[str, Any]]:
    """Records of every estimator on every decoder; with ``target_mcn`` each decoder is first
    :func:`regularise`-d to that mean condition number (``None``: at initialisation)."""
    records: list[dict[str, Any]] = []
    for m in m_values:
        for name, (dec, holder, shape) in decoders(m).items():
            if names and name not in names:
                continue
            params = [p for p in holder.parameters()]
            gen = torch.Generator().manual_seed(seed + m)
            state = {"regime": "init"}
            if target_mcn is not None:
                state = {"regime": f"MCN <= {target_mcn:g}", **regularise(dec, holder, shape, target_mcn, gen)}
                print(f"m={m} {name}: regularised, MCN {state['mcn_start']:.3g} -> {state['mcn']:.3g} "
                      f"in {state['steps']} steps", flush=True)
            z = torch.randn(batch, *shape, generator=gen)
            ests = _estimators(m)
            samples: dict[str, list[tuple[float, Tensor, float]]] = {e[0]: [] for e in ests}
            errors: dict[str, str] = {}
            for d in range(draws):
                for label, kind, k in ests[d % len(ests):] + ests[:d % len(ests)]:  # rotate the order
                    probes = None if k is None else torch.randn(batch, k, *shape, generator=gen)
                    if kind == "exact" and d > 2:
                        continue  # deterministic: three timings suffice
                    try:
                        samples[label].append(_run(kind, dec, params, z, probes, gen))
                    except (RuntimeError, NotImplementedError) as exc:
                        errors[label] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            if "exact" in samples:
                ref_loss, ref_grad = samples["exact"][0][0], samples["exact"][0][1]
            else:
                ref_loss = statistics.fmean(s[0] for s in samples["forward-K16"])
                ref_grad = torch.stack([s[1] for s in samples["forward-K16"]]).mean(0)
            for label, kind, k in ests:
                got = samples[label]
                if not got:
                    records.append({**state, "decoder": name, "m": m, "latent_shape": list(shape), "batch": batch,
                                    "estimator": label, "n_probes": k, "error": errors[label]})
                    continue
                losses = torch.tensor([s[0] for s in got], dtype=torch.float64)
                grads = torch.stack([s[1] for s in got])
                ms = statistics.median(s[2] for s in got) * 1e3
                var_l = 0.0 if kind == "exact" else float(losses.var() / ref_loss**2)
                var_g = 0.0 if kind == "exact" else float((grads - grads.mean(0)).square().sum(1).mean() / ref_grad.square().sum())
                records.append({**state, "decoder": name, "m": m, "latent_shape": list(shape), "batch": batch, "estimator": label,
                                "n_probes": k, "ms": ms, "loss_mean": float(losses.mean()), "loss_ref": ref_loss,
                                "rel_var_loss": var_l, "rel_var_grad": var_g,
                                "loss_cost": var_l * ms, "grad_cost": var_g * ms, "error": None})
            print(f"m={m} {name}: " + ", ".join(f"{r['estimator']} {r.get('ms', float('nan')):.1f}ms "
                                                  f"gc={r.get('grad_cost', float('nan')):.3g}"
                                                  for r in records if r["m"] == m and r["decoder"] == name), flush=True)
    return records


def table(records: list[dict[str, Any]]) -> str:
    lines = ["| decoder | m | MCN | estimator | fwd+bwd ms | rel var loss | rel var grad | loss var x ms | grad var x ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        mcn = f"{r['mcn']:.3g}" if "mcn" in r else "init"
        if r["error"] is not None:
            lines.append(f"| {r['decoder']} | {r['m']} | {mcn} | {r['estimator']} | fails: {r['error']} | | | | |")
            continue
        lines.append(f"| {r['decoder']} | {r['m']} | {mcn} | {r['estimator']} | {r['ms']:.1f} | {r['rel_var_loss']:.3g} | "
                     f"{r['rel_var_grad']:.3g} | {r['loss_cost']:.3g} | {r['grad_cost']:.3g} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", default="2,4,16,64,256")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--draws", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--decoders", default="", help="comma-separated decoder names (default: all)")
    ap.add_argument("--target-mcn", type=float, default=None,
                    help="first regularise every decoder to this mean condition number (default: measure at init)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    records = measure(tuple(int(x) for x in args.m.split(",")), args.batch, args.draws,
                      names=tuple(n for n in args.decoders.split(",") if n), target_mcn=args.target_mcn)
    regime = ("at initialisation" if args.target_mcn is None else
              f"after regularising each decoder to MCN <= {args.target_mcn:g} (benchmarks/estimator_choice.py::regularise)")
    header = (f"CPU, {torch.get_num_threads()} thread(s), torch {torch.__version__}, batch {args.batch}, "
              f"{args.draws} draws per estimator alternating in one process; fp32; decoders {regime}")
    print(header)
    print(table(records))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = "estimator_choice" if args.target_mcn is None else f"estimator_choice_mcn{args.target_mcn:g}"
        (args.out / f"{stem}.json").write_text(json.dumps({"setup": header, "records": records}, indent=1))
        (args.out / f"{stem}.md").write_text(f"# Estimator choice on the generic path\n\n{header}\n\n{table(records)}\n")


if __name__ == "__main__":
    main()
