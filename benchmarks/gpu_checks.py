"""GPU checks of isofast, run by ``benchmarks/gpu_suite.sh`` section by section.

``python benchmarks/gpu_checks.py --out DIR --sections S1,S2 [--cases C1,C2] [--dry-run] [--warm]``
adds its records to ``DIR/checks.json`` (several processes may write it at once) and prints a
report. Sections, in the suite's order of value:

- ``correctness``: every Triton path (fp32 / tf32 / bf16 GEMM operands, exact and Hutchinson)
  against the torch twin in float64 (values and every gradient) at the paper shape
  ``2-256-256-256-256-784`` (ReLU and sigmoid hidden layers, sigmoid output) and a large shape;
  ``--cases`` picks ``paper-relu``, ``paper-sigmoid``, ``large``, ``official`` (the IRVAE ratio
  through isofast against the official recipe).
- ``cuda``: the ``cuda`` backend (exact, fp32 and fp64) against the float64 twin, its Gram and
  trace reductions, and the extension's batched spectral kernels against float64 on the CPU.
- ``generic``: the generic path (a transposed-conv decoder) on CUDA in fp32 against float64.
- ``cudagraph``: a whole IRVAE training step (encoder, decoder, reconstruction + KL + regulariser,
  Adam) captured in a CUDA graph; one replay against the same step run eagerly.
- ``headline``: the issue's targets: the regulariser forward + backward at batch 100 CUDA-graphed,
  at batch 65536 in fp32 / tf32 / bf16, each against the official recipe run eagerly; the whole
  training step CUDA-graphed at batch 100 against the official eager step.
- ``timing``: the same at batches 1024 and 8192.

After the sections, the compiled Triton kernels of the process (registers, spills, shared memory
as loaded on the device) are added as ``kernels`` records.

``--warm``: run the timing sections' warm-up only (compiles the kernels into Triton's cache while
the GPU is busy with other checks) and record nothing. ``--dry-run``: CPU tensors through
``TRITON_INTERPRET=1`` (set here before Triton is imported), tiny shapes, no CUDA graph, token
timings: the plumbing end to end. ``--summarise STEPS``: write ``DIR/suite.json`` and
``DIR/summary.md`` from ``DIR/checks.json``, the suite's step log ``STEPS`` and the other outputs.
Exit status 1 when a correctness or CUDA-graph check failed (timing targets are reported only).
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

if "--dry-run" in sys.argv or os.environ.get("DRY_RUN") == "1":
    os.environ["TRITON_INTERPRET"] = "1"
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import isofast  # noqa: E402
from isofast import backends  # noqa: E402
from isofast.baselines import official_relaxed_distortion  # noqa: E402
from isofast.mixup import mixup  # noqa: E402
from isofast.mlp import extract_mlp  # noqa: E402
from isofast.ops import mlp_hutchinson, mlp_pullback  # noqa: E402

# --- source layout this script depends on: update here after a layout change -------------------
#: Modules of the Triton kernel package whose compiled kernels are reported (``kernels`` records).
KERNEL_MODULES = ("mlp_stream", "mlp_pullback", "mlp_hutchinson")
#: Folders hashed into ``source_sha256`` (identifies the code where no git history travels).
SOURCE_DIRS = ("isofast", "kernels", "csrc", "benchmarks")

PAPER = [2, 256, 256, 256, 256, 784]
#: Relative tolerances against the float64 twin (values, gradients), per GEMM precision.
TOL = {"fp32": (2e-4, 2e-3), "tf32": (2e-2, 5e-2), "bf16": (5e-2, 0.15)}
#: The issue's targets: regulariser fwd+bwd on the paper decoder, whole training step.
TARGETS: dict[str, tuple[str, float]] = {
    "batch100_graph_us": ("<=", 40.0),
    "batch100_speedup_vs_official": (">=", 25.0),
    "batch65536_bf16_ms": ("<=", 1.0),
    "batch65536_tf32_ms": ("<=", 1.6),
    "batch65536_fp32_speedup_vs_official": (">=", 2.0),
    "train_step_batch100_speedup_vs_official": (">=", 10.0),
}
SECTIONS = ("correctness", "cuda", "generic", "cudagraph", "headline", "timing")
CASES = ("paper-relu", "paper-sigmoid", "large", "official")


def mlp(widths: list[int], act: str, out_act: str | None, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    acts = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "softplus": nn.Softplus, "gelu": nn.GELU}
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        name = out_act if i == len(widths) - 2 else act
        if name is not None:
            layers.append(acts[name]())
    return nn.Sequential(*layers)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def guarded(rec: dict[str, Any], fn: Callable[[], None]) -> dict[str, Any]:
    """Run ``fn`` (which fills ``rec``); a crash is a failed check with its trace, never an exit."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - a crash is a failed check, keep going
        rec.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:500], trace=traceback.format_exc()[-2000:])
    return rec


def skipped(section: str, case: str, why: str) -> dict[str, Any]:
    print(f"[{section}] {case}: skipped: {why}", flush=True)
    return {"section": section, "case": case, "ok": None, "skipped": why}


# ------------------------------------------------------------------------------------------------
# correctness


def check_case(name: str, widths: list[int], act: str, batch: int, k: int, device: str) -> list[dict]:
    dec32 = mlp(widths, act, "sigmoid").to(device)
    dec64 = copy.deepcopy(dec32).double()
    spec32, _ = extract_mlp(dec32)
    spec64, _ = extract_mlp(dec64)
    g = torch.Generator(device=device).manual_seed(1)
    z64 = torch.randn(batch, widths[0], device=device, dtype=torch.float64, generator=g)
    v64 = torch.randn(batch, k, widths[0], device=device, dtype=torch.float64, generator=g)
    twin, triton_be = backends.get("torch"), backends.get("triton")
    out = []
    for op in ("exact", "hutchinson"):
        def run(be, spec, z, v):
            return mlp_pullback(be, spec, z) if op == "exact" else mlp_hutchinson(be, spec, z, v)

        zr = z64.clone().requires_grad_()
        ref = run(twin, spec64, zr, v64)
        weight = torch.randn(ref.shape, device=device, dtype=torch.float64, generator=g)
        ref_grads = torch.autograd.grad((ref * weight).sum(), [zr, *dec64.parameters()])
        for prec in ("fp32", "tf32", "bf16"):
            rec = {"section": "correctness", "case": name, "op": op, "precision": prec, "widths": widths,
                   "act": act, "batch": batch, "K": k if op == "hutchinson" else None}

            def body(rec=rec, prec=prec):
                z = z64.float().requires_grad_()
                with backends.precision(prec):
                    val = run(triton_be, spec32, z, v64.float())
                grads = torch.autograd.grad((val * weight.float()).sum(), [z, *dec32.parameters()])
                rec["value_rel_err"] = rel(val, ref)
                rec["grad_rel_err"] = max(rel(a, b) for a, b in zip(grads, ref_grads))
                vt, gt = TOL[prec]
                rec["ok"] = bool(rec["value_rel_err"] < vt and rec["grad_rel_err"] < gt)

            out.append(guarded(rec, body))
            print(f"[correctness] {name:<13} {op:<10} {prec:<5} ok={rec['ok']} value={rec.get('value_rel_err', float('nan')):.2e} "
                  f"grad={rec.get('grad_rel_err', float('nan')):.2e} {rec.get('error', '')}", flush=True)
    return out


def check_official(widths: list[int], batch: int, device: str) -> dict:
    """The IRVAE ratio through isofast (triton, fp32, Hutchinson K=1) against the official recipe."""
    rec: dict[str, Any] = {"section": "correctness", "case": "official", "widths": widths, "batch": batch}

    def body():
        dec = mlp(widths, "relu", "sigmoid").to(device)
        g = torch.Generator(device=device).manual_seed(2)
        z = torch.randn(batch, widths[0], device=device, generator=g).requires_grad_()
        v = torch.randn(batch, 1, widths[0], device=device, generator=g)
        with backends.use("triton"):
            got = isofast.relaxed_distortion(dec, z, eta=None, estimator="hutchinson", probes=v)
        want = official_relaxed_distortion(dec, z, v[:, 0])
        params = [z, *dec.parameters()]
        gg, gw = torch.autograd.grad(got, params), torch.autograd.grad(want, params)
        rec["value_rel_err"] = abs(got.item() - want.item()) / abs(want.item())
        rec["grad_rel_err"] = max(rel(a, b) for a, b in zip(gg, gw))
        rec["ok"] = rec["value_rel_err"] < 2e-4 and rec["grad_rel_err"] < 2e-3

    guarded(rec, body)
    print(f"[correctness] official-recipe ok={rec['ok']} value={rec.get('value_rel_err', float('nan')):.2e} "
          f"grad={rec.get('grad_rel_err', float('nan')):.2e} {rec.get('error', '')}", flush=True)
    return rec


def correctness(cases: list[str], dry: bool, device: str) -> list[dict]:
    if dry:
        shapes = {"paper-relu": ([2, 8, 8, 12], "relu", 5, 1), "paper-sigmoid": ([2, 8, 8, 12], "sigmoid", 5, 1),
                  "large": ([4, 16, 24], "tanh", 9, 2)}
    else:
        shapes = {"paper-relu": (PAPER, "relu", 100, 1), "paper-sigmoid": (PAPER, "sigmoid", 100, 1),
                  "large": ([16, 1024, 1024, 1024, 3072], "relu", 4096, 2)}
    ok, why = backends.status("triton")
    out: list[dict] = []
    for case in cases:
        if not ok:
            out.append(skipped("correctness", case, f"triton backend unavailable: {why}"))
        elif case == "official":
            out.append(check_official(shapes["paper-relu"][0], shapes["paper-relu"][2], device))
        else:
            widths, act, batch, k = shapes[case]
            out += check_case(case, widths, act, batch, k, device)
    return out


def check_cuda_backend(dry: bool) -> list[dict]:
    """The extension's CUDA kernels against float64 references."""
    ok, why = backends.status("cuda")
    if not ok:
        return [skipped("cuda", "cuda-backend", f"cuda backend unavailable: {why}")]
    from isofast import _ext, spectral

    out: list[dict] = []
    widths = [2, 16, 16, 10] if dry else PAPER
    batch = 7 if dry else 100
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 2e-3)):
        rec: dict[str, Any] = {"section": "cuda", "case": f"exact-{str(dtype)[6:]}", "widths": widths, "batch": batch}

        def body(rec=rec, dtype=dtype, tol=tol):
            dec = mlp(widths, "tanh", "sigmoid").cuda().to(dtype)
            dec64 = copy.deepcopy(dec).double()
            z = torch.randn(batch, widths[0], device="cuda", dtype=torch.float64)
            outs = []
            for name, d, zz in (("torch", dec64, z), ("cuda", dec, z.to(dtype))):
                zz = zz.clone().requires_grad_()
                with backends.use(name):
                    h = isofast.pullback_metric(d, zz)
                outs.append([h, *torch.autograd.grad(h.square().sum(), [zz, *d.parameters()])])
            rec["value_rel_err"] = rel(outs[1][0], outs[0][0])
            rec["grad_rel_err"] = max(rel(a, b) for a, b in zip(outs[1][1:], outs[0][1:]))
            rec["ok"] = rec["value_rel_err"] < tol and rec["grad_rel_err"] < 10 * tol

        out.append(guarded(rec, body))
    rec = {"section": "cuda", "case": "reductions+spectral"}

    def body_reductions():
        x = torch.randn(50, 3, 4000, dtype=torch.float64, device="cuda")
        be = backends.get("cuda")
        errs = [rel(be.tangent_gram(x.float()), x @ x.transpose(1, 2)), rel(be.tangent_sqnorm(x.float()), x.square().sum(-1))]
        a = torch.randn(2000, 6, 6, dtype=torch.float64)
        h = a @ a.transpose(1, 2) + 0.1 * torch.eye(6, dtype=torch.float64)
        ext = _ext.get()
        errs.append(rel(ext.cuda_eigvalsh(h.cuda()), torch.linalg.eigvalsh(h)))
        errs.append(rel(ext.cuda_condition_numbers(h.cuda()), ext.condition_numbers(h)))  # the CPU kernel, fp64
        errs.append(rel(spectral.eigvalsh(h.float().cuda()), torch.linalg.eigvalsh(h)))  # the public op, fp32
        rec.update(rel_errs={"gram_fp32": errs[0], "sqnorm_fp32": errs[1], "eigvalsh_fp64": errs[2],
                             "condition_fp64": errs[3], "eigvalsh_fp32": errs[4]})
        rec["ok"] = max(errs[:2]) < 1e-5 and max(errs[2:4]) < 1e-9 and errs[4] < 1e-4

    out.append(guarded(rec, body_reductions))
    for r in out:
        print(f"[cuda] {r['case']:<20} ok={r['ok']} {r.get('value_rel_err', '')} {r.get('rel_errs', '')} "
              f"{r.get('error', '')}", flush=True)
    return out


def check_generic(dry: bool) -> list[dict]:
    """The generic path (any decoder) on CUDA in fp32 against float64 on the CPU."""
    rec: dict[str, Any] = {"section": "generic", "case": "convtranspose"}

    def body():
        torch.manual_seed(0)
        dec = nn.Sequential(nn.Linear(2, 32), nn.Unflatten(1, (8, 2, 2)), nn.ConvTranspose2d(8, 4, 4, 2, 1),
                            nn.Softplus(), nn.ConvTranspose2d(4, 1, 4, 2, 1), nn.Sigmoid())
        dec64 = copy.deepcopy(dec).double()
        z = torch.randn(7 if dry else 256, 2, dtype=torch.float64)
        z64 = z.clone().requires_grad_()
        ref = isofast.relaxed_distortion(dec64, z64, eta=None, estimator="exact")
        ref_g = torch.autograd.grad(ref, [z64, *dec64.parameters()])
        dec = dec.cuda()
        z32 = z.float().cuda().requires_grad_()
        got = isofast.relaxed_distortion(dec, z32, eta=None, estimator="exact")
        got_g = torch.autograd.grad(got, [z32, *dec.parameters()])
        rec["plan"] = str(isofast.plan(dec, z32))
        rec["value_rel_err"] = rel(got, ref)
        rec["grad_rel_err"] = max(rel(a, b) for a, b in zip(got_g, ref_g))
        rec["ok"] = rec["value_rel_err"] < 2e-4 and rec["grad_rel_err"] < 2e-3

    if not torch.cuda.is_available():
        return [skipped("generic", "convtranspose", "no CUDA device")]
    guarded(rec, body)
    print(f"[generic] convtranspose ok={rec['ok']} value={rec.get('value_rel_err', float('nan')):.2e} "
          f"grad={rec.get('grad_rel_err', float('nan')):.2e} {rec.get('error', '')}", flush=True)
    return [rec]


# ------------------------------------------------------------------------------------------------
# a whole IRVAE training step


class IRVAE(nn.Module):
    def __init__(self, widths: list[int]) -> None:
        super().__init__()
        m, d = widths[0], widths[-1]
        self.encoder = mlp([d, *reversed(widths[1:-1]), 2 * m], "relu", None, seed=3)
        self.decoder = mlp(widths, "relu", "sigmoid", seed=4)
        self.m = m

    def loss(self, x: torch.Tensor, eps: torch.Tensor, eta: float | None, official: bool = False) -> torch.Tensor:
        mu, logvar = self.encoder(x).split(self.m, dim=1)
        z = mu + eps * (0.5 * logvar).exp()
        recon = (self.decoder(z) - x).square().sum(1).mean()
        kl = 0.5 * (mu.square() + logvar.exp() - logvar - 1).sum(1).mean()
        if official:  # the authors' recipe: mixup codes, one Gaussian probe, jvp/vjp with create_graph
            z_aug = mixup(z, eta)
            reg = official_relaxed_distortion(self.decoder, z_aug, torch.randn_like(z_aug))
        else:
            reg = isofast.relaxed_distortion(self.decoder, z, eta=eta)
        return recon + kl + 100.0 * reg


def _training_step(model: IRVAE, opt: torch.optim.Optimizer, x, eps, eta, official=False) -> Callable[[], torch.Tensor]:
    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=False)
        loss = model.loss(x, eps, eta, official)
        loss.backward()
        opt.step()
        return loss.detach()
    return step


def _capture(fn: Callable[[], Any], warmup: int = 3) -> tuple[torch.cuda.CUDAGraph, Any]:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):  # compiles the kernels, allocates the optimizer state
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def check_cudagraph(batch: int) -> dict:
    """One replay of the graphed step (no mixup: deterministic) against the same step run eagerly
    on a copy: the loss and every parameter's update must agree."""
    rec: dict[str, Any] = {"section": "cudagraph", "case": "irvae-train-step", "widths": PAPER, "batch": batch}

    def body():
        torch.manual_seed(0)
        model = IRVAE(PAPER).cuda()
        x = torch.rand(batch, PAPER[-1], device="cuda")
        eps = torch.randn(batch, PAPER[0], device="cuda")
        opt = torch.optim.Adam(model.parameters(), lr=1e-4, capturable=True)
        with backends.use("triton"):
            rec["plan"] = str(isofast.plan(model.decoder, eps))
            graph, static_loss = _capture(_training_step(model, opt, x, eps, None))
            # Capturing runs nothing: model and optimizer now hold the state after the warm-up steps.
            twin = copy.deepcopy(model)
            twin_opt = torch.optim.Adam(twin.parameters(), lr=1e-4, capturable=True)
            twin_opt.load_state_dict(opt.state_dict())
            before = [q.detach().clone() for q in model.parameters()]
            graph.replay()
            eager = _training_step(twin, twin_opt, x, eps, None)()
        torch.cuda.synchronize()
        rec["graphed_loss"], rec["eager_loss"] = float(static_loss), float(eager)
        rec["loss_rel_err"] = abs(rec["graphed_loss"] - rec["eager_loss"]) / abs(rec["eager_loss"])
        # Adam's updates (not the parameters, which barely move) of the graphed and the eager step
        rec["update_rel_err"] = max(rel(a - b0, c - b0) for a, c, b0 in zip(model.parameters(), twin.parameters(), before))
        rec["ok"] = bool(torch.isfinite(static_loss)) and rec["loss_rel_err"] < 1e-4 and rec["update_rel_err"] < 1e-2

    if not torch.cuda.is_available():
        return skipped("cudagraph", "irvae-train-step", "no CUDA device (dry run)")
    guarded(rec, body)
    print(f"[cudagraph] ok={rec['ok']} loss_rel_err={rec.get('loss_rel_err', float('nan')):.2e} "
          f"update_rel_err={rec.get('update_rel_err', float('nan')):.2e} {rec.get('error', '')}", flush=True)
    return rec


# ------------------------------------------------------------------------------------------------
# timing


def _timed(fn: Callable[[], Any], reps: int, cuda: bool) -> float:
    """Median milliseconds of ``fn()`` (already warmed up)."""
    times = []
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
    times.sort()
    return times[len(times) // 2]


Emit = Callable[[list[dict]], None]


class Timer:
    """Times callables into ``section`` records, each passed to ``emit`` as soon as measured;
    ``reps=0`` (``--warm``) only warms up (compiles) the isofast providers."""

    def __init__(self, section: str, reps: int, cuda: bool, emit: Emit) -> None:
        self.section, self.reps, self.cuda, self.emit = section, reps, cuda, emit

    def add(self, what: str, batch: int, provider: str, prec: str, fn: Callable[[], Any], graph_it: bool,
            reps: int | None = None) -> None:
        if not self.reps and provider == "official":
            return  # nothing of Triton's to compile
        rec: dict[str, Any] = {"section": self.section, "what": what, "batch": batch, "provider": provider,
                               "precision": prec, "cudagraph": graph_it}
        try:
            with backends.precision(prec):
                if graph_it and self.cuda:
                    graph, _ = _capture(fn)
                    run: Callable[[], Any] = graph.replay
                else:
                    for _ in range(3):
                        fn()
                    run = fn
                if self.reps:
                    rec["median_ms"] = _timed(run, reps or self.reps, self.cuda)
        except Exception as exc:  # noqa: BLE001
            rec["error"] = f"{type(exc).__name__}: {exc}"[:500]
        if self.reps:
            self.emit([rec])
            print(f"[{self.section}] {what:<11} B={batch:<6} {provider:<24} {prec:<5} graph={graph_it!s:<5} "
                  f"{rec.get('median_ms', float('nan')):9.4f} ms {rec.get('error', '')}", flush=True)
        if self.cuda:
            torch.cuda.empty_cache()


def time_regulariser(timer: Timer, widths: list[int], batch: int, device: str, precs: tuple[str, ...],
                     graphs: bool) -> None:
    dec = mlp(widths, "relu", "sigmoid").to(device)
    params = list(dec.parameters())
    g = torch.Generator(device=device).manual_seed(5)
    z = torch.randn(batch, widths[0], device=device, generator=g).requires_grad_()
    v = torch.randn(batch, widths[0], device=device, generator=g)

    def official():
        return torch.autograd.grad(official_relaxed_distortion(dec, z, v), [z, *params])

    def ours(estimator: str):
        def fn():
            with backends.use("triton"):
                loss = isofast.relaxed_distortion(dec, z, eta=0.2, estimator=estimator)
            return torch.autograd.grad(loss, [z, *params])
        return fn

    timer.add("regulariser", batch, "official", "fp32", official, False)
    for prec in precs:
        timer.add("regulariser", batch, "isofast-triton-exact", prec, ours("exact"), graphs)
    if graphs:
        timer.add("regulariser", batch, "isofast-triton-hutch-K1", "fp32", ours("hutchinson"), True)


def time_training_step(timer: Timer, batch: int) -> None:
    """The whole IRVAE step: isofast CUDA-graphed against the official recipe run eagerly."""
    for provider, official, graph_it in (("official", True, False), ("isofast-triton", False, True)):
        torch.manual_seed(0)
        model = IRVAE(PAPER).cuda()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4, capturable=graph_it)
        x = torch.rand(batch, PAPER[-1], device="cuda")
        eps = torch.randn(batch, PAPER[0], device="cuda")
        with backends.use("triton"):
            timer.add("train-step", batch, provider, "fp32", _training_step(model, opt, x, eps, 0.2, official), graph_it)


def headline(dry: bool, device: str, reps: int, emit: Emit) -> None:
    timer = Timer("headline", reps, device == "cuda", emit)
    if dry:
        time_regulariser(timer, [2, 8, 8, 12], 4, device, ("fp32",), graphs=False)
        return
    time_regulariser(timer, PAPER, 100, device, ("fp32",), graphs=True)
    time_training_step(timer, 100)
    time_regulariser(timer, PAPER, 65536, device, ("fp32", "tf32", "bf16"), graphs=False)


def timing(dry: bool, device: str, reps: int, emit: Emit) -> None:
    timer = Timer("timing", reps, device == "cuda", emit)
    for batch in ((8,) if dry else (1024, 8192)):
        time_regulariser(timer, [2, 8, 8, 12] if dry else PAPER, batch, device, ("fp32", "tf32", "bf16"),
                         graphs=not dry)


def verdicts(records: list[dict]) -> dict[str, dict]:
    """The issue's targets from the timing records (absent where a number is missing)."""
    def get(what, batch, provider, prec, graph):
        for r in records:
            if (r.get("section") in ("headline", "timing") and r.get("what") == what and r["batch"] == batch
                    and r["provider"] == provider and r["precision"] == prec and r["cudagraph"] == graph
                    and r.get("median_ms")):
                return r["median_ms"]
        return None

    values: dict[str, float] = {}
    off100, g100 = get("regulariser", 100, "official", "fp32", False), get("regulariser", 100, "isofast-triton-exact", "fp32", True)
    if g100:
        values["batch100_graph_us"] = 1000 * g100
    if off100 and g100:
        values["batch100_speedup_vs_official"] = off100 / g100
    off, f32 = get("regulariser", 65536, "official", "fp32", False), get("regulariser", 65536, "isofast-triton-exact", "fp32", False)
    if off and f32:
        values["batch65536_fp32_speedup_vs_official"] = off / f32
    for prec in ("bf16", "tf32"):
        if (t := get("regulariser", 65536, "isofast-triton-exact", prec, False)) is not None:
            values[f"batch65536_{prec}_ms"] = t
    step_off, step_ours = get("train-step", 100, "official", "fp32", False), get("train-step", 100, "isofast-triton", "fp32", True)
    if step_off and step_ours:
        values["train_step_batch100_speedup_vs_official"] = step_off / step_ours
    out = {}
    for key, (op, target) in TARGETS.items():
        if key in values:
            v = values[key]
            out[key] = {"value": v, "target": f"{op} {target}", "met": v <= target if op == "<=" else v >= target}
    return out


# ------------------------------------------------------------------------------------------------
# compiled kernels, as loaded on the device


def loaded_kernels() -> list[dict]:
    """Registers, spills (Triton's count: local memory / 4 bytes) and shared memory of every Triton
    kernel this process compiled and launched."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return []
    from isofast.backends.triton_backend import _kernels

    out = []
    try:
        pkg = _kernels()
        for mod_name in KERNEL_MODULES:
            mod = getattr(pkg, mod_name)
            for attr in dir(mod):
                fn = getattr(mod, attr)
                for caches in getattr(fn, "device_caches", {}).values():
                    for key, kernel in caches[0].items():
                        meta = kernel.metadata
                        out.append({"section": "kernels", "kernel": attr, "function": getattr(meta, "name", attr),
                                    "registers": getattr(kernel, "n_regs", None), "spills": getattr(kernel, "n_spills", None),
                                    "shared_bytes": getattr(meta, "shared", None), "num_warps": getattr(meta, "num_warps", None),
                                    "num_stages": getattr(meta, "num_stages", None),
                                    "specialisation": hashlib.sha1(str(key).encode()).hexdigest()[:12]})
    except Exception as exc:  # noqa: BLE001 - Triton's cache layout is internal: report, don't fail
        out.append({"section": "kernels", "error": f"{type(exc).__name__}: {exc}"[:300]})
    return out


# ------------------------------------------------------------------------------------------------
# output


def read_checks(path: Path) -> dict | None:
    """``checks.json``, or ``None`` when absent or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def merge_records(path: Path, records: list[dict], env: dict) -> dict:
    """Add ``records`` to ``path`` (the suite runs sections in parallel): under an exclusive lock
    on the folder, written to a temporary file and renamed, so a killed process leaves the file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = read_checks(path) or {"env": env, "records": []}
        data["records"] += records
        data["failed"] = [r for r in data["records"] if r.get("section") in ("correctness", "cuda", "generic", "cudagraph")
                          and r.get("ok") is False]
        data["targets"] = verdicts(data["records"])
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        os.replace(tmp, path)
    finally:
        os.close(lock)
    return data


def environment(dry: bool) -> dict[str, Any]:
    """Versions, device, driver and the code's identity (git commit, or a hash of the sources)."""
    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                           "dry_run": dry, "isofast": isofast.__version__}
    for mod in ("triton", "numpy"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = None
    env["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        env["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired):
        env["nvidia_smi"] = None
    env["commit"] = os.environ.get("ISOFAST_COMMIT")
    try:
        git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=30)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=30)
        if git.returncode == 0:
            env["commit"] = git.stdout.strip() + (" (with local changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        pass  # no git where the suite runs: ISOFAST_COMMIT, and source_sha256 identifies the code
    env["source_sha256"] = source_sha256()
    return env


def source_sha256() -> str:
    """A hash of the sources (``SOURCE_DIRS``): names the code a run used where no git travels;
    ``--source-hash`` prints it for a checkout, to find the commit of a result."""
    digest = hashlib.sha256()
    for path in sorted(p for d in SOURCE_DIRS for p in (ROOT / d).rglob("*")
                       if p.suffix in (".py", ".cu", ".cpp", ".h", ".sh")):
        digest.update(path.relative_to(ROOT).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def _err(rec: dict, key: str) -> str:
    return f"{rec[key]:.2e}" if isinstance(rec.get(key), float) else "-"


def summarise(out_dir: Path, steps_file: Path) -> int:
    """``suite.json`` and ``summary.md`` from ``checks.json``, the step log and the other outputs."""
    checks = read_checks(out_dir / "checks.json") or {"env": None, "records": []}
    env = checks.get("env") or environment(os.environ.get("DRY_RUN") == "1")
    steps = []
    if steps_file.exists():
        for line in steps_file.read_text().splitlines():
            name, rc, seconds, *note = line.split("\t")
            steps.append({"step": name, "exit": int(rc), "seconds": int(seconds), "note": note[0] if note else ""})
    records = checks["records"]
    targets = verdicts(records)
    failed = [r for r in records if r.get("section") in ("correctness", "cuda", "generic", "cudagraph") and r.get("ok") is False]
    kernels_md = out_dir / "compile_stats.md"
    compile_table = kernels_md.read_text() if kernels_md.exists() else ""
    kernels_md.unlink(missing_ok=True)  # folded into summary.md: the outputs stay within 8 files
    grid = out_dir / "bench" / "results.json"
    grid_meta = json.loads(grid.read_text())["meta"] if grid.exists() else None
    summary = {"env": env, "steps": steps, "targets": targets, "failed": failed,
               "n_checks": sum(1 for r in records if r.get("ok") is not None),
               "n_skipped": sum(1 for r in records if r.get("ok") is None and "skipped" in r),
               "grid": None if grid_meta is None else {k: grid_meta.get(k) for k in ("mode", "elapsed_s", "partial", "skipped_cases")}}
    (out_dir / "suite.json").write_text(json.dumps(summary, indent=1, default=str))

    lines = ["# isofast GPU suite", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in env.items()]
    lines += ["", "## Steps", "", "| step | exit | seconds | note |", "|---|---:|---:|---|"]
    lines += [f"| {s['step']} | {s['exit']} | {s['seconds']} | {s['note']} |" for s in steps]
    lines += ["", "## Targets", "", "| target | measured | wanted | met |", "|---|---:|---|---|"]
    lines += [f"| {k} | {v['value']:.3f} | {v['target']} | {'yes' if v['met'] else 'NO'} |" for k, v in targets.items()]
    missing = [k for k in TARGETS if k not in targets]
    if missing:
        lines += ["", f"Not measured: {', '.join(missing)}."]
    lines += ["", "## Checks", "", "| section | case | op | precision | ok | value err | grad err | note |",
              "|---|---|---|---|---|---:|---:|---|"]
    for r in records:
        if r.get("section") in ("correctness", "cuda", "generic", "cudagraph"):
            note = r.get("skipped") or r.get("error") or (json.dumps(r["rel_errs"]) if "rel_errs" in r else "")
            grad = "grad_rel_err" if "grad_rel_err" in r else "update_rel_err"
            lines.append(f"| {r['section']} | {r.get('case')} | {r.get('op', '-')} | {r.get('precision', '-')} | "
                         f"{r.get('ok')} | {_err(r, 'value_rel_err')} | {_err(r, grad)} | {str(note)[:120]} |")
    lines += ["", "## Timings (median ms)", "", "| section | what | batch | provider | precision | graph | ms | note |",
              "|---|---|---:|---|---|---|---:|---|"]
    for r in records:
        if r.get("section") in ("headline", "timing"):
            ms = f"{r['median_ms']:.4f}" if r.get("median_ms") else "-"
            lines.append(f"| {r['section']} | {r['what']} | {r['batch']} | {r['provider']} | {r['precision']} | "
                         f"{r['cudagraph']} | {ms} | {r.get('error', '')[:80]} |")
    loaded = [r for r in records if r.get("section") == "kernels" and "registers" in r]
    if loaded:
        lines += ["", "## Triton kernels as loaded on the device", "",
                  "| kernel | registers | spills | shared B | warps | stages |", "|---|---:|---:|---:|---:|---:|"]
        seen = set()
        for r in loaded:
            row = (r["kernel"], r["registers"], r["spills"], r["shared_bytes"], r["num_warps"], r["num_stages"])
            if row not in seen:
                seen.add(row)
                lines.append("| " + " | ".join(str(c) for c in row) + " |")
    if grid_meta is not None:
        lines += ["", f"Grid: mode {grid_meta.get('mode')}, {grid_meta.get('elapsed_s')} s, "
                      f"cases not run: {', '.join(grid_meta.get('skipped_cases') or []) or 'none'} (bench/table.md)."]
    if compile_table:
        lines += ["", "## Compile-check resource usage (CUDA sources)", "", compile_table]
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")
    print(f"summary: {len(failed)} failed check(s); targets "
          + (", ".join(f"{k}={v['value']:.3g} ({'met' if v['met'] else 'MISSED'})" for k, v in targets.items()) or "none measured"))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="folder of checks.json (required but with --source-hash)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--cases", default=",".join(CASES), help=f"correctness cases, of {', '.join(CASES)}")
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    parser.add_argument("--warm", action="store_true", help="timing sections: warm-up only, record nothing")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 21 on a GPU, 1 dry)")
    parser.add_argument("--summarise", type=Path, default=None, metavar="STEPS",
                        help="write suite.json and summary.md from the outputs and the suite's step log")
    parser.add_argument("--source-hash", action="store_true", help="print this checkout's source_sha256 and exit")
    args = parser.parse_args(argv)
    if args.source_hash:
        print(source_sha256())
        return 0
    if args.out is None:
        parser.error("--out is required")
    if args.summarise is not None:
        return summarise(args.out, args.summarise)
    dry = args.dry_run or os.environ.get("DRY_RUN") == "1"
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS)) + sorted(set(args.cases.split(",")) - set(CASES))
    if unknown:
        parser.error(f"unknown sections or cases: {', '.join(unknown)}")
    if not dry and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run (or DRY_RUN=1) on a CPU machine", flush=True)
        return 2
    device = "cpu" if dry else "cuda"
    reps = 0 if args.warm else (args.reps or (1 if dry else 21))
    ok, why = backends.status("triton")
    print(f"gpu_checks {','.join(sections)}: triton backend available={ok} {why}", flush=True)
    t0 = time.time()
    env = environment(dry)
    records: list[dict] = []

    def emit(recs: list[dict]) -> None:
        """Records go to checks.json as soon as they exist: a step killed by its time box keeps them."""
        if recs and not args.warm:
            merge_records(args.out / "checks.json", recs, env)
            records.extend(recs)

    for section in sections:
        if section == "correctness":
            for case in args.cases.split(","):
                emit(correctness([case], dry, device))
        elif section == "cuda":
            emit(check_cuda_backend(dry))
        elif section == "generic":
            emit(check_generic(dry))
        elif section == "cudagraph":
            emit([check_cudagraph(100)])
        elif section == "headline":
            headline(dry, device, reps, emit)
        elif section == "timing":
            timing(dry, device, reps, emit)
    if args.warm:
        print(f"gpu_checks: warmed {','.join(sections)} in {time.time() - t0:.0f} s", flush=True)
        return 0
    emit(loaded_kernels())
    n_fail = sum(1 for r in records if r.get("section") in ("correctness", "cuda", "generic", "cudagraph") and r.get("ok") is False)
    print(f"gpu_checks {','.join(sections)}: {n_fail} failed check(s) in {time.time() - t0:.0f} s; "
          f"{len(records)} records added to {args.out / 'checks.json'}", flush=True)
    return 1 if n_fail else 0


if __name__ == "__main__":
    raise SystemExit(main())
