"""The measured cases: decoder shapes, batches, and the shared inputs every provider sees.

Every provider of one case gets the same decoder weights, the same mixup-augmented codes
``z_aug (B, m)`` (augmented once, here, so no provider pays for or randomises mixup) and the
same Gaussian probes ``(B, K, m)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

import isofast

#: The IRVAE paper's MNIST decoder: 2-256-256-256-256-784, ReLU hidden, sigmoid output.
PAPER_HIDDEN = (256, 256, 256, 256)
PAPER_OUT = 784

_ACTS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "softplus": nn.Softplus, "identity": nn.Identity}


@dataclass(frozen=True)
class Case:
    """One decoder shape at one batch size.

    ``group`` is ``"paper"`` (the paper's decoder over batches), ``"latent"`` (latent sweep),
    ``"width"`` (hidden/output widths) or ``"activation"`` (smooth activations).
    ``providers`` optionally restricts which competitors run (``None``: all of the mode's).
    """

    name: str
    group: str
    batch: int
    m: int = 2
    hidden: tuple[int, ...] = PAPER_HIDDEN
    out: int = PAPER_OUT
    act: str = "relu"
    out_act: str = "sigmoid"
    providers: tuple[str, ...] | None = field(default=None, compare=False)

    @property
    def widths(self) -> tuple[int, ...]:
        """Layer widths ``(m, hidden..., out)``."""
        return (self.m, *self.hidden, self.out)

    def describe(self) -> str:
        """Short human-readable shape, e.g. ``2-256x4-784 relu/sigmoid``."""
        hid = self.hidden
        body = f"{hid[0]}x{len(hid)}" if len(set(hid)) == 1 else "-".join(map(str, hid))
        return f"{self.m}-{body}-{self.out} {self.act}/{self.out_act}"


@dataclass
class Inputs:
    """What every provider of a case receives: decoder, augmented codes, probes ``(B, K, m)``."""

    decoder: nn.Sequential
    z: Tensor
    probes: Tensor


def make_decoder(case: Case, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 seed: int = 0) -> nn.Sequential:
    """The case's MLP decoder with PyTorch's default initialisation under ``seed``."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        widths = case.widths
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(a, b))
            last = i == len(widths) - 2
            layers.append(_ACTS[case.out_act if last else case.act]())
        return nn.Sequential(*layers).to(device=device, dtype=dtype)
    finally:
        torch.random.set_rng_state(gen_state)


def make_inputs(case: Case, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                n_probes: int = 4, seed: int = 0, eta: float = 0.2) -> Inputs:
    """Decoder, mixup-augmented codes (``eta`` as in IRVAE; augmented once) and ``n_probes``
    Gaussian probes per sample, all deterministic in ``seed``."""
    decoder = make_decoder(case, device, dtype, seed)
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    z = torch.randn(case.batch, case.m, generator=gen, dtype=dtype)
    probes = torch.randn(case.batch, n_probes, case.m, generator=gen, dtype=dtype)
    z_aug = isofast.mixup(z, eta, gen)
    return Inputs(decoder, z_aug.to(device).detach(), probes.to(device))


#: The competitors of the latent sweep and of the width / activation cases (the full list runs
#: on the paper decoder).
CORE = ("official", "forward_ad", "isofast-torch-exact", "isofast-torch-hutch-K1")
SWEEP = (*CORE, "isofast-torch-hutch-K4")


def grid(mode: str, device: torch.device | str) -> list[Case]:
    """The cases of ``mode`` (``"quick"``, ``"medium"`` or ``"full"``) on ``device``.

    quick: paper decoder at batch 100 and 1024, a two-point latent sweep, one width and one smooth
    activation (under 3 minutes on 2 CPU cores). medium: the paper decoder at 100 and 1024, the latent
    sweep m in {2, 4, 8, 16, 64}, widths 64/128/512, wide output 3072, softplus and tanh. full: adds
    batch 8192 everywhere and 65536 for the paper decoder.
    """
    dev = torch.device(device)
    if mode == "quick":
        paper_b, other_b, sweep_m = (100, 1024), 256, (2, 16)
        widths, acts, out_w = (64,), ("tanh",), ()
    elif mode == "medium":
        paper_b, other_b, sweep_m = (100, 1024), 1024, (2, 4, 8, 16, 64)
        widths, acts, out_w = (64, 128, 512), ("softplus", "tanh"), (3072,)
    elif mode == "full":
        paper_b, other_b, sweep_m = (100, 1024, 8192, 65536), 8192, (2, 4, 8, 16, 64)
        widths, acts, out_w = (64, 128, 512), ("softplus", "tanh"), (3072,)
    else:
        raise ValueError(f"mode must be quick, medium or full, got {mode!r}")
    del dev  # every mode runs the same shapes on every device; the runner adapts repetitions
    cases = [Case("paper", "paper", b) for b in paper_b]
    cases += [Case(f"latent-m{m}", "latent", other_b, m=m, providers=SWEEP) for m in sweep_m]
    cases += [Case(f"width-{w}", "width", other_b, hidden=(w,) * 4, providers=CORE) for w in widths]
    cases += [Case(f"out-{d}", "width", other_b, out=d, providers=CORE) for d in out_w]
    cases += [Case(f"act-{a}", "activation", other_b, act=a, providers=CORE) for a in acts]
    return cases


__all__ = ["CORE", "SWEEP", "Case", "Inputs", "grid", "make_decoder", "make_inputs"]
