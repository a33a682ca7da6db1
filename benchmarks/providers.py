"""The competitors: each turns a case's shared inputs into a :class:`Runner`.

A runner's ``forward()`` computes the regulariser (building whatever graph training would) and
``forward_backward()`` also back-propagates into the decoder's parameters and the codes (as in
training, where the codes come from an encoder), then clears the gradients. Both return the loss
as a float only when asked (``value()``), so timing never pays for a host transfer it need not.

Hutchinson providers use one probe per sample (the official recipe's estimator) from the case's
shared probes; exact providers compute the full pullback metric.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import isofast
from isofast import baselines
from benchmarks.cases import Inputs


class Skip(Exception):
    """A provider that cannot run here for a known, benign reason (recorded as ``skipped``)."""


@dataclass
class Runner:
    """Callables of one provider on one case; all block until the device is done."""

    forward: Callable[[], None]
    forward_backward: Callable[[], None]
    value: Callable[[], float]


@dataclass(frozen=True)
class Provider:
    """A competitor: ``name``, its ``estimator`` (``"exact"`` or ``"hutchinson"``), ``n_probes``,
    and ``build(inputs, device)`` returning a :class:`Runner` (raising :class:`Skip` or any error)."""

    name: str
    estimator: str
    build: Callable[[Inputs, torch.device], Runner]
    n_probes: int = 1
    note: str = ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _torch_runner(loss_fn: Callable[[nn.Module, Tensor], Tensor], inputs: Inputs, device: torch.device,
                  step_begin: Callable[[], None] | None = None) -> Runner:
    """Runner around ``loss_fn(decoder, z)`` for a PyTorch recipe."""
    dec = inputs.decoder
    z = inputs.z.detach().clone().requires_grad_(True)
    params = list(dec.parameters())

    def forward() -> None:
        if step_begin is not None:
            step_begin()
        loss_fn(dec, z)
        _sync(device)

    def forward_backward() -> None:
        if step_begin is not None:
            step_begin()
        loss_fn(dec, z).backward()
        _sync(device)
        for p in params:
            p.grad = None
        z.grad = None

    def value() -> float:
        if step_begin is not None:
            step_begin()
        return float(loss_fn(dec, z).detach())

    return Runner(forward, forward_backward, value)


def _baseline(fn: Callable[[nn.Module, Tensor, Tensor], Tensor]) -> Callable[[Inputs, torch.device], Runner]:
    def build(inputs: Inputs, device: torch.device) -> Runner:
        v = inputs.probes[:, 0].contiguous()
        return _torch_runner(lambda d, z: fn(d, z, v), inputs, device)
    return build


def _vmap_exact(inputs: Inputs, device: torch.device) -> Runner:
    return _torch_runner(baselines.vmap_exact_relaxed_distortion, inputs, device)


def _isofast_loss(backend: str, estimator: str, k: int, probes: Tensor) -> Callable[[nn.Module, Tensor], Tensor]:
    p = probes[:, :k].contiguous()

    def loss(dec: nn.Module, z: Tensor) -> Tensor:
        with isofast.backends.use(backend):
            if estimator == "exact":
                return isofast.relaxed_distortion(dec, z, eta=None, estimator="exact")
            return isofast.relaxed_distortion(dec, z, eta=None, estimator="hutchinson", probes=p)
    return loss


def _check_backend(backend: str, device: torch.device) -> None:
    ok, why = isofast.backends.status(backend)
    if not ok:
        raise Skip(f"backend {backend!r} not available: {why}")
    impl = isofast.backends.get(backend)
    assert impl is not None
    ok, why = impl.supports(device)
    if not ok:
        raise Skip(f"backend {backend!r} does not support {device.type}: {why}")


def _isofast(backend: str, estimator: str, k: int = 1, compile_mode: str | None = None) -> Callable[[Inputs, torch.device], Runner]:
    def build(inputs: Inputs, device: torch.device) -> Runner:
        _check_backend(backend, device)
        loss = _isofast_loss(backend, estimator, k, inputs.probes)
        step = None
        if compile_mode is not None:
            if compile_mode == "reduce-overhead" and device.type != "cuda":
                raise Skip("CUDA graphs need a CUDA device")
            loss = torch.compile(loss, mode=compile_mode, fullgraph=False)
            if compile_mode == "reduce-overhead":
                step = torch.compiler.cudagraph_mark_step_begin
        return _torch_runner(loss, inputs, device, step)
    return build


def _official_math_sdpa(inputs: Inputs, device: torch.device) -> Runner:
    """The official recipe with PyTorch's math attention kernel forced (the fused kernels have no
    double backward)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    v = inputs.probes[:, 0].contiguous()

    def loss(d: nn.Module, z: Tensor) -> Tensor:
        with sdpa_kernel(SDPBackend.MATH):
            return baselines.official_relaxed_distortion(d, z, v)
    return _torch_runner(loss, inputs, device)


def _generic(estimator: str) -> Callable[[Inputs, torch.device], Runner]:
    """The generic path whatever isofast would plan (the decoder behind a plain callable):
    exact is this isofast's (primal once, batched tangents); Hutchinson K=1 is isofast 0.1's
    (forward-mode AD over repeated codes plus a VJP with create_graph, ``baselines``)."""
    def build(inputs: Inputs, device: torch.device) -> Runner:
        v = inputs.probes[:, :1].contiguous()

        def loss(d: nn.Module, z: Tensor) -> Tensor:
            if estimator == "exact":
                return isofast.relaxed_distortion(lambda x: d(x), z, eta=None, estimator="exact")
            return baselines.repeated_codes_hutchinson(d, z, v)
        return _torch_runner(loss, inputs, device)
    return build


def _stream_exact(inputs: Inputs, device: torch.device) -> Runner:
    """``estimator="exact"`` where isofast plans the fused Sequential (stream) path."""
    p = isofast.plan(inputs.decoder, inputs.z, eta=None, estimator="exact")
    if p.path != "fused_sequential":
        raise Skip(f"not planned onto the stream path: {p.reasons['path']}")
    return _torch_runner(lambda d, z: isofast.relaxed_distortion(d, z, eta=None, estimator="exact"), inputs, device)


def _forward_estimator(k: int) -> Callable[[Inputs, torch.device], Runner]:
    """isofast's first-order estimator (``estimator="forward"``, K probes of its default draw), where
    this isofast has it."""
    def build(inputs: Inputs, device: torch.device) -> Runner:
        if "forward" not in isofast._checks.ESTIMATORS:
            raise Skip("this isofast has no estimator='forward'")
        gen = torch.Generator(device=device).manual_seed(0)
        return _torch_runner(lambda d, z: isofast.relaxed_distortion(d, z, eta=None, estimator="forward", n_probes=k,
                                                                     generator=gen), inputs, device)
    return build


def _hutchinson(inputs: Inputs, device: torch.device) -> Runner:
    """isofast's ``estimator="hutchinson"`` on the official recipe's probe (first order off the fused
    path: same value and gradient), where this isofast plans it first order."""
    v = inputs.probes[:, :1].contiguous()
    p = isofast.plan(inputs.decoder, inputs.z, eta=None, estimator="hutchinson", probes=v)
    if p.path == "fused_mlp":
        raise Skip("the fused MLP path runs its own Hutchinson kernels (the isofast-<backend>-hutch providers)")
    return _torch_runner(lambda d, z: isofast.relaxed_distortion(d, z, eta=None, estimator="hutchinson", probes=v),
                         inputs, device)


def _auto(inputs: Inputs, device: torch.device) -> Runner:
    """What ``isofast.relaxed_distortion(decoder, z)`` runs by default (fresh probes per call)."""
    gen = torch.Generator(device=device).manual_seed(0)
    return _torch_runner(lambda d, z: isofast.relaxed_distortion(d, z, eta=None, generator=gen), inputs, device)


def _official_compiled(inputs: Inputs, device: torch.device) -> Runner:
    """The official recipe under ``torch.compile`` (expected to fail: double backward)."""
    v = inputs.probes[:, 0].contiguous()
    fn = torch.compile(lambda d, z: baselines.official_relaxed_distortion(d, z, v))
    return _torch_runner(fn, inputs, device)


def _jax(inputs: Inputs, device: torch.device) -> Runner:
    """``jax.jit`` of jvp + vjp (and of its gradient) on the same weights, codes and probes."""
    if importlib.util.find_spec("jax") is None:
        raise Skip("jax is not installed (optional baseline)")
    import jax
    import jax.numpy as jnp

    platform = "gpu" if device.type == "cuda" else "cpu"
    try:
        jdev = jax.devices(platform)[0]
    except RuntimeError as exc:
        raise Skip(f"jax has no {platform} device: {exc}") from exc
    acts = {nn.ReLU: jax.nn.relu, nn.Sigmoid: jax.nn.sigmoid, nn.Tanh: jnp.tanh,
            nn.Softplus: jax.nn.softplus, nn.Identity: lambda a: a}
    layers = list(inputs.decoder)
    params, fns = [], []
    for lin, act in zip(layers[0::2], layers[1::2]):
        w = jax.device_put(lin.weight.detach().cpu().numpy(), jdev)
        b = jax.device_put(lin.bias.detach().cpu().numpy(), jdev)
        params.append((w, b))
        fns.append(acts[type(act)])
    z = jax.device_put(inputs.z.detach().cpu().numpy(), jdev)
    v = jax.device_put(inputs.probes[:, 0].detach().cpu().numpy(), jdev)

    def loss(ps, z):  # type: ignore[no-untyped-def]
        def f(x):  # type: ignore[no-untyped-def]
            for (w, b), s in zip(ps, fns):
                x = s(x @ w.T + b)
            return x
        _, jv = jax.jvp(f, (z,), (v,))
        _, pull = jax.vjp(f, z)
        (jtjv,) = pull(jv)
        return jnp.mean(jnp.sum(jtjv**2, 1)) / jnp.mean(jnp.sum(jv**2, 1)) ** 2

    fwd = jax.jit(loss)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return Runner(lambda: fwd(params, z).block_until_ready(),
                  lambda: jax.block_until_ready(grad(params, z)),
                  lambda: float(fwd(params, z)))


def all_providers() -> dict[str, Provider]:
    """Every competitor by name (whether it can run here is decided when it is built)."""
    ps = [
        Provider("official", "hutchinson", _baseline(baselines.official_relaxed_distortion),
                 note="IRVAE code: autograd.functional jvp + vjp, create_graph=True"),
        Provider("torch.func", "hutchinson", _baseline(baselines.func_relaxed_distortion)),
        Provider("forward_ad", "hutchinson", _baseline(baselines.forward_ad_relaxed_distortion)),
        Provider("vmap-exact", "exact", _vmap_exact),
        Provider("official+compile", "hutchinson", _official_compiled, note="torch.compile of the official recipe"),
        Provider("official-math-sdpa", "hutchinson", _official_math_sdpa,
                 note="official recipe under sdpa_kernel(SDPBackend.MATH)"),
        Provider("generic-exact", "exact", _generic("exact"), note="the generic path, exact (decoder behind a plain callable)"),
        Provider("generic-hutch-K1", "hutchinson", _generic("hutchinson"),
                 note="isofast 0.1's generic path: forward AD over repeated codes + VJP with create_graph"),
        Provider("isofast-seq-exact", "exact", _stream_exact, note="fused_sequential path: m tangent streams as rows"),
        *[Provider(f"isofast-forward-K{k}", "forward", _forward_estimator(k), n_probes=k,
                   note=f"estimator='forward' (first-order), K={k}") for k in (2, 4)],
        Provider("isofast-hutch-K1", "hutchinson", _hutchinson, n_probes=1,
                 note="estimator='hutchinson' (first order), the official recipe's probe"),
        Provider("isofast-auto", "auto", _auto, note="relaxed_distortion with estimator='auto'"),
        Provider("jax", "hutchinson", _jax, note="jax.jit of jvp + vjp"),
    ]
    for backend in isofast.backends.REGISTRY:
        ps.append(Provider(f"isofast-{backend}-exact", "exact", _isofast(backend, "exact")))
        for k in (1, 4):
            ps.append(Provider(f"isofast-{backend}-hutch-K{k}", "hutchinson", _isofast(backend, "hutchinson", k), n_probes=k))
    ps.append(Provider("isofast-torch-exact+compile", "exact", _isofast("torch", "exact", compile_mode="default"),
                       note="torch.compile of isofast.relaxed_distortion (torch twin)"))
    ps.append(Provider("isofast-torch-exact+cudagraphs", "exact", _isofast("torch", "exact", compile_mode="reduce-overhead"),
                       note="torch.compile(mode='reduce-overhead'): CUDA graphs"))
    return {p.name: p for p in ps}


def default_names(device: torch.device, compile_: bool = True) -> list[str]:
    """The providers a paper-decoder case runs on ``device``: the baselines, the isofast torch twin
    (eager, compiled, CUDA-graphed on a GPU), every other isofast backend that is available and
    supports the device, and JAX (skipped with a note when not installed)."""
    names = ["official", "torch.func", "forward_ad", "vmap-exact", "isofast-torch-exact", "isofast-torch-hutch-K1"]
    for backend, ok in isofast.backends.available().items():
        if backend == "torch" or not ok:
            continue
        impl = isofast.backends.get(backend)
        if impl is not None and impl.supports(device)[0]:
            names += [f"isofast-{backend}-exact", f"isofast-{backend}-hutch-K1"]
    if compile_:
        names += ["isofast-torch-exact+compile", "official+compile"]
        if device.type == "cuda":
            names.append("isofast-torch-exact+cudagraphs")
    names.append("jax")
    return names


def available_backend_names(device: torch.device) -> list[str]:
    """Non-torch isofast backends that can run on ``device`` in this process."""
    out = []
    for backend, ok in isofast.backends.available().items():
        impl = isofast.backends.get(backend) if ok else None
        if backend != "torch" and impl is not None and impl.supports(device)[0]:
            out.append(backend)
    return out
