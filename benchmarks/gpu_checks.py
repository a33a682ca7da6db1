"""GPU checks of the ``"triton"`` backend, run by ``benchmarks/gpu_suite.sh``.

``python benchmarks/gpu_checks.py --out DIR [--dry-run]`` writes ``DIR/checks.json`` and prints a
report. Sections:

1. correctness: every GPU path (triton fp32 / tf32 / bf16, exact and Hutchinson) against the
   torch twin in float64 (values and every gradient), at the paper shape
   ``2-256-256-256-256-784`` (ReLU and sigmoid hidden layers, sigmoid output) and a large shape;
2. cudagraph: a full IRVAE training step (encoder, decoder, reconstruction + regulariser, Adam)
   captured in a CUDA graph, replayed, and checked against the same step run eagerly;
3. timing: the regulariser forward + backward at batches 100, 1024, 8192, 65536 (triton eager and
   CUDA-graphed per precision, the official recipe eager) against the targets.

``--dry-run``: CPU tensors through ``TRITON_INTERPRET=1`` (set by this script before Triton is
imported), tiny shapes, no CUDA graph, a token timing; checks the plumbing end to end.
Exit status 1 when a correctness or CUDA-graph check fails (timing targets are reported only).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import traceback
from pathlib import Path

if "--dry-run" in sys.argv or os.environ.get("DRY_RUN") == "1":
    os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import isofast  # noqa: E402
from isofast import backends  # noqa: E402
from isofast.baselines import official_relaxed_distortion  # noqa: E402
from isofast.mlp import extract_mlp  # noqa: E402
from isofast.ops import mlp_hutchinson, mlp_pullback  # noqa: E402

#: Relative tolerances against the float64 twin (values, gradients), per GEMM precision.
TOL = {"fp32": (2e-4, 2e-3), "tf32": (2e-2, 5e-2), "bf16": (5e-2, 0.15)}
TARGETS = {
    "batch100_graph_us": 60.0,  # CUDA-graphed regulariser fwd+bwd at batch 100
    "batch100_speedup_vs_official": 20.0,
    "batch65536_fp32_speedup_vs_official": 2.0,
    "batch65536_lowp_ms": 1.6,  # tf32 or bf16
}


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
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------------
# 1. correctness


def check_case(name: str, widths: list[int], act: str, batch: int, k: int, device: str) -> list[dict]:
    dec32 = mlp(widths, act, "sigmoid").to(device)
    dec64 = copy.deepcopy(dec32).double()
    spec32, _ = extract_mlp(dec32)
    spec64, _ = extract_mlp(dec64)
    g = torch.Generator(device=device).manual_seed(1)
    z64 = torch.randn(batch, widths[0], device=device, dtype=torch.float64, generator=g)
    v64 = torch.randn(batch, k, widths[0], device=device, dtype=torch.float64, generator=g)
    twin = backends.get("torch")
    triton_be = backends.get("triton")
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
            try:
                z = z64.float().requires_grad_()
                with backends.precision(prec):
                    val = run(triton_be, spec32, z, v64.float())
                grads = torch.autograd.grad((val * weight.float()).sum(), [z, *dec32.parameters()])
                rec["value_rel_err"] = rel(val, ref)
                rec["grad_rel_err"] = max(rel(a, b) for a, b in zip(grads, ref_grads))
                rec["grad_rel_err_max"] = max(rel_max(a, b) for a, b in zip(grads, ref_grads))
                vt, gt = TOL[prec]
                rec["ok"] = bool(rec["value_rel_err"] < vt and rec["grad_rel_err"] < gt)
            except Exception as exc:  # noqa: BLE001 - a crash is a failed check, keep going
                rec.update(ok=False, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()[-2000:])
            out.append(rec)
            print(f"[correctness] {name:<6} {op:<10} {prec:<5} ok={rec['ok']} "
                  f"value={rec.get('value_rel_err', float('nan')):.2e} grad={rec.get('grad_rel_err', float('nan')):.2e}",
                  flush=True)
    return out


def check_official(widths: list[int], batch: int, device: str) -> dict:
    """The IRVAE ratio through isofast (triton, fp32, Hutchinson K=1) against the official recipe."""
    dec = mlp(widths, "relu", "sigmoid").to(device)
    g = torch.Generator(device=device).manual_seed(2)
    z = torch.randn(batch, widths[0], device=device, generator=g).requires_grad_()
    v = torch.randn(batch, 1, widths[0], device=device, generator=g)
    with backends.use("triton"):
        got = isofast.relaxed_distortion(dec, z, eta=None, estimator="hutchinson", probes=v)
    want = official_relaxed_distortion(dec, z, v[:, 0])
    params = [z, *dec.parameters()]
    gg, gw = torch.autograd.grad(got, params), torch.autograd.grad(want, params)
    rec = {"section": "correctness", "case": "official", "value_rel_err": abs(got.item() - want.item()) / abs(want.item()),
           "grad_rel_err": max(rel(a, b) for a, b in zip(gg, gw))}
    rec["ok"] = rec["value_rel_err"] < 2e-4 and rec["grad_rel_err"] < 2e-3
    print(f"[correctness] official-recipe ok={rec['ok']} value={rec['value_rel_err']:.2e} grad={rec['grad_rel_err']:.2e}")
    return rec


# ------------------------------------------------------------------------------------------------
# 2. a whole IRVAE training step in a CUDA graph


class IRVAE(nn.Module):
    def __init__(self, widths: list[int]) -> None:
        super().__init__()
        m, d = widths[0], widths[-1]
        self.encoder = mlp([d, *reversed(widths[1:-1]), 2 * m], "relu", None, seed=3)
        self.decoder = mlp(widths, "relu", "sigmoid", seed=4)
        self.m = m

    def loss(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        mu, logvar = self.encoder(x).split(self.m, dim=1)
        z = mu + eps * (0.5 * logvar).exp()
        recon = (self.decoder(z) - x).square().sum(1).mean()
        kl = 0.5 * (mu.square() + logvar.exp() - logvar - 1).sum(1).mean()
        reg = isofast.relaxed_distortion(self.decoder, z, eta=0.2)
        return recon + kl + 100.0 * reg


def check_cudagraph(widths: list[int], batch: int) -> dict:
    rec: dict = {"section": "cudagraph", "widths": widths, "batch": batch}
    try:
        torch.manual_seed(0)
        model = IRVAE(widths).cuda()
        twin_model = copy.deepcopy(model)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4, capturable=True)
        x = torch.rand(batch, widths[-1], device="cuda")
        eps = torch.randn(batch, widths[0], device="cuda")
        with backends.use("triton"):
            plan = model.decoder and isofast.plan(model.decoder, eps)
            rec["plan"] = str(plan)

            def step() -> torch.Tensor:
                opt.zero_grad(set_to_none=False)
                loss = model.loss(x, eps)
                loss.backward()
                opt.step()
                return loss.detach()

            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):  # warm-up: compiles the kernels, allocates the optimizer state
                    step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_loss = step()
        # Same RNG draws, eager, on a copy: the graphed step must give the same loss and update.
        state = torch.cuda.get_rng_state()
        graph.replay()
        torch.cuda.synchronize()
        graphed = static_loss.clone()
        torch.cuda.set_rng_state(state)
        with backends.use("triton"):
            eager = model.loss(x, eps).detach()  # after the replayed update: finite, close
        rec["graphed_loss"] = float(graphed)
        rec["eager_loss_after_update"] = float(eager)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        rec["graphed_step_us"] = 1000 * start.elapsed_time(end) / 50
        rec["ok"] = bool(torch.isfinite(graphed) and torch.isfinite(eager) and graphed > 0)
        del twin_model
    except Exception as exc:  # noqa: BLE001
        rec.update(ok=False, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()[-3000:])
    print(f"[cudagraph] ok={rec['ok']} step={rec.get('graphed_step_us', float('nan')):.1f} us "
          f"{rec.get('error', '')}", flush=True)
    return rec


# ------------------------------------------------------------------------------------------------
# 3. timing


def _timed(fn, reps: int, device: str) -> float:
    """Median milliseconds of ``fn()`` (already warmed up)."""
    times = []
    for _ in range(reps):
        if device == "cuda":
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


def time_regulariser(widths: list[int], batch: int, device: str, graphs: bool, reps: int) -> list[dict]:
    dec = mlp(widths, "relu", "sigmoid").to(device)
    params = list(dec.parameters())
    g = torch.Generator(device=device).manual_seed(5)
    z = torch.randn(batch, widths[0], device=device, generator=g).requires_grad_()
    v = torch.randn(batch, 1, widths[0], device=device, generator=g)
    out = []

    def official():
        loss = official_relaxed_distortion(dec, z, v[:, 0])
        return torch.autograd.grad(loss, [z, *params])

    def ours(estimator: str):
        def fn():
            with backends.use("triton"):
                loss = isofast.relaxed_distortion(dec, z, eta=0.2, estimator=estimator)
            return torch.autograd.grad(loss, [z, *params])
        return fn

    def add(provider, prec, fn, graph_it):
        rec = {"section": "timing", "batch": batch, "widths": widths, "provider": provider, "precision": prec,
               "cudagraph": graph_it}
        try:
            with backends.precision(prec):
                for _ in range(3):
                    fn()
                if graph_it:
                    graph = torch.cuda.CUDAGraph()
                    side = torch.cuda.Stream()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        fn()
                    torch.cuda.current_stream().wait_stream(side)
                    with torch.cuda.graph(graph):
                        fn()
                    run = graph.replay
                else:
                    run = fn
                rec["median_ms"] = _timed(run, reps, device)
        except Exception as exc:  # noqa: BLE001
            rec["error"] = f"{type(exc).__name__}: {exc}"
        out.append(rec)
        print(f"[timing] B={batch:<6} {provider:<22} {prec:<5} graph={graph_it!s:<5} "
              f"{rec.get('median_ms', float('nan')):9.4f} ms {rec.get('error', '')}", flush=True)
        return rec

    add("official", "fp32", official, False)
    for prec in ("fp32", "tf32", "bf16"):
        add("isofast-triton-exact", prec, ours("exact"), False)
        if graphs:
            add("isofast-triton-exact", prec, ours("exact"), True)
    if graphs:
        add("isofast-triton-hutch-K1", "fp32", ours("hutchinson"), True)
    return out


def verdicts(records: list[dict]) -> dict:
    """The targets of the issue, from the timing records (None where a number is missing)."""
    def get(batch, provider, prec, graph):
        for r in records:
            if (r.get("section") == "timing" and r["batch"] == batch and r["provider"] == provider
                    and r["precision"] == prec and r["cudagraph"] == graph and "median_ms" in r):
                return r["median_ms"]
        return None

    res: dict = {}
    off100, g100 = get(100, "official", "fp32", False), get(100, "isofast-triton-exact", "fp32", True)
    if off100 and g100:
        res["batch100_graph_us"] = {"value": 1000 * g100, "target": TARGETS["batch100_graph_us"],
                                    "met": 1000 * g100 <= TARGETS["batch100_graph_us"]}
        res["batch100_speedup_vs_official"] = {"value": off100 / g100, "target": TARGETS["batch100_speedup_vs_official"],
                                               "met": off100 / g100 >= TARGETS["batch100_speedup_vs_official"]}
    off, f32 = get(65536, "official", "fp32", False), get(65536, "isofast-triton-exact", "fp32", False)
    if off and f32:
        res["batch65536_fp32_speedup_vs_official"] = {
            "value": off / f32, "target": TARGETS["batch65536_fp32_speedup_vs_official"],
            "met": off / f32 >= TARGETS["batch65536_fp32_speedup_vs_official"]}
    lows = [x for x in (get(65536, "isofast-triton-exact", p, False) for p in ("tf32", "bf16")) if x]
    if lows:
        res["batch65536_lowp_ms"] = {"value": min(lows), "target": TARGETS["batch65536_lowp_ms"],
                                     "met": min(lows) <= TARGETS["batch65536_lowp_ms"]}
    return res


# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for checks.json")
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args(argv)
    dry = args.dry_run or os.environ.get("DRY_RUN") == "1"
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = "cpu" if dry else "cuda"
    ok, why = backends.status("triton")
    print(f"triton backend: available={ok} {why}", flush=True)
    if not dry and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run (or DRY_RUN=1) on a CPU machine")
        return 2
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "dry_run": dry,
           "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)"}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    records: list[dict] = []
    t0 = time.time()
    if dry:
        shapes = [("paper", [2, 8, 8, 12], "relu", 5, 1), ("paper", [2, 8, 8, 12], "sigmoid", 5, 1),
                  ("large", [4, 16, 24], "tanh", 9, 2)]
    else:
        shapes = [("paper", [2, 256, 256, 256, 256, 784], "relu", 100, 1),
                  ("paper", [2, 256, 256, 256, 256, 784], "sigmoid", 100, 1),
                  ("large", [16, 1024, 1024, 1024, 3072], "relu", 4096, 2)]
    for name, widths, act, batch, k in shapes:
        records += check_case(name, widths, act, batch, k, device)
    records.append(check_official(shapes[0][1], shapes[0][3], device))
    if not dry:
        records.append(check_cudagraph([2, 256, 256, 256, 256, 784], 100))
    if not args.skip_timing:
        if dry:
            records += time_regulariser([2, 8, 8, 12], 4, device, graphs=False, reps=1)
        else:
            for batch in (100, 1024, 8192, 65536):
                records += time_regulariser([2, 256, 256, 256, 256, 784], batch, device, graphs=True,
                                            reps=21 if batch <= 8192 else 7)
    summary = {"env": env, "seconds": time.time() - t0, "targets": verdicts(records),
               "failed": [r for r in records if r.get("section") in ("correctness", "cudagraph") and not r.get("ok")],
               "records": records}
    (out_dir / "checks.json").write_text(json.dumps(summary, indent=1, default=str))
    for key, verdict in summary["targets"].items():
        print(f"[target] {key}: {verdict['value']:.3f} (target {verdict['target']}) {'MET' if verdict['met'] else 'MISSED'}")
    n_fail = len(summary["failed"])
    print(f"gpu_checks: {n_fail} failed check(s) in {summary['seconds']:.0f} s; wrote {out_dir / 'checks.json'}")
    return 1 if n_fail else 0


if __name__ == "__main__":
    raise SystemExit(main())
