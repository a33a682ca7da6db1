"""Elementwise activations the fused MLP path understands, with first and second derivatives.

The multi-stream recursion (docs/maths.md section 4) gates tangent streams with ``s'(a)`` and its
backward needs ``s''(a)``. Each activation is described once here; every backend (the torch
twin, the C++ and Triton kernels) reads the same :class:`Activation` record, whose ``kind``
string and ``params`` tuple are what kernels switch on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_C = 0.044715

#: Activation kinds, in the order kernels number them.
KINDS = (
    "identity",
    "relu",
    "leaky_relu",
    "elu",
    "silu",
    "softplus",
    "tanh",
    "sigmoid",
    "gelu",
    "gelu_tanh",
)


@dataclass(frozen=True)
class Activation:
    """One elementwise activation ``s`` and its parameters.

    ``params``: ``leaky_relu`` -> ``(negative_slope,)``; ``elu`` -> ``(alpha,)``;
    ``softplus`` -> ``(beta, threshold)``; every other kind -> ``()``.
    """

    kind: str
    params: tuple[float, ...] = ()

    @property
    def code(self) -> int:
        """Integer id of the kind, as kernels switch on it."""
        return KINDS.index(self.kind)

    @property
    def kernel_params(self) -> tuple[float, float]:
        """``(coef, threshold)`` as the compiled kernels take them: ``params`` padded with zeros
        (``coef`` = negative slope, alpha or beta; ``threshold`` = softplus threshold)."""
        padded = tuple(float(x) for x in self.params) + (0.0, 0.0)
        return padded[0], padded[1]

    @property
    def has_second_derivative(self) -> bool:
        """Whether ``s''`` is not identically zero (ReLU-like kinds need only a mask)."""
        return self.kind not in ("identity", "relu", "leaky_relu")

    def __call__(self, a: Tensor) -> Tensor:
        return self.derivatives(a, order=0)[0]

    def slope(self, a: Tensor) -> Tensor:
        """``s'(a)`` of a piecewise-linear kind (``relu``, ``leaky_relu``), in ``a``'s memory
        format. ReLU's comparison is written straight into a float buffer: a boolean mask cast to
        float takes several times as long on the CPU."""
        if self.kind == "relu":
            return torch.gt(a, 0, out=torch.empty_like(a))
        if self.kind == "leaky_relu":
            return torch.where(a > 0, a.new_ones(()), a.new_full((), self.params[0]))
        raise ValueError(f"slope() is for relu and leaky_relu, not {self.kind!r}")

    def apply_(self, a: Tensor) -> Tensor:
        """``a = s(a)`` in place, for ``relu`` and ``leaky_relu``."""
        if self.kind == "relu":
            return torch.relu_(a)
        if self.kind == "leaky_relu":
            return torch.nn.functional.leaky_relu_(a, self.params[0])
        raise ValueError(f"apply_() is for relu and leaky_relu, not {self.kind!r}")

    def derivatives(self, a: Tensor, order: int = 2) -> tuple[Tensor, ...]:
        """``(s(a), s'(a), s''(a))`` truncated to ``order + 1`` entries, elementwise on ``a``."""
        k, p = self.kind, self.params
        zero = torch.zeros((), dtype=a.dtype, device=a.device)
        one = torch.ones((), dtype=a.dtype, device=a.device)
        if k == "identity":
            out = (a, one.expand_as(a), zero.expand_as(a))
        elif k == "relu":
            out = (torch.relu(a), (a > 0).to(a.dtype), zero.expand_as(a))
        elif k == "leaky_relu":
            slope = p[0]
            d1 = torch.where(a > 0, one, torch.full_like(one, slope))
            out = (torch.where(a > 0, a, a * slope), d1.expand_as(a), zero.expand_as(a))
        elif k == "elu":
            alpha = p[0]
            e = alpha * torch.expm1(torch.clamp(a, max=0.0))
            pos = a > 0
            out = (torch.where(pos, a, e), torch.where(pos, one, e + alpha), torch.where(pos, zero, e + alpha))
        elif k == "silu":
            sg = torch.sigmoid(a)
            d1 = sg * (1 + a * (1 - sg))
            out = (a * sg, d1, sg * (1 - sg) * (2 + a * (1 - 2 * sg)))
        elif k == "softplus":
            beta, threshold = p
            linear = a * beta > threshold
            sg = torch.sigmoid(a * beta)
            val = torch.where(linear, a, torch.nn.functional.softplus(a, beta=beta, threshold=threshold))
            out = (val, torch.where(linear, one, sg), torch.where(linear, zero, beta * sg * (1 - sg)))
        elif k == "tanh":
            t = torch.tanh(a)
            d1 = 1 - t * t
            out = (t, d1, -2 * t * d1)
        elif k == "sigmoid":
            sg = torch.sigmoid(a)
            d1 = sg * (1 - sg)
            out = (sg, d1, d1 * (1 - 2 * sg))
        elif k == "gelu":
            cdf = 0.5 * (1 + torch.erf(a * _INV_SQRT_2))
            pdf = _INV_SQRT_2PI * torch.exp(-0.5 * a * a)
            out = (a * cdf, cdf + a * pdf, pdf * (2 - a * a))
        elif k == "gelu_tanh":
            u = _SQRT_2_OVER_PI * (a + _GELU_C * a**3)
            du = _SQRT_2_OVER_PI * (1 + 3 * _GELU_C * a * a)
            ddu = _SQRT_2_OVER_PI * 6 * _GELU_C * a
            t = torch.tanh(u)
            sech2 = 1 - t * t
            d1 = 0.5 * (1 + t) + 0.5 * a * sech2 * du
            d2 = sech2 * du + 0.5 * a * (sech2 * ddu - 2 * t * sech2 * du * du)
            out = (0.5 * a * (1 + t), d1, d2)
        else:  # pragma: no cover - guarded by from_module
            raise ValueError(f"unknown activation kind {k!r}")
        return out[: order + 1]


IDENTITY = Activation("identity")


#: Exact module type -> the :class:`Activation` it computes. Subclasses are not listed: they may
#: override ``forward``, and the fused path would not run their code.
_FROM_TYPE = {
    nn.Identity: lambda m: IDENTITY,
    nn.ReLU: lambda m: Activation("relu"),
    nn.LeakyReLU: lambda m: Activation("leaky_relu", (float(m.negative_slope),)),
    nn.ELU: lambda m: Activation("elu", (float(m.alpha),)),
    nn.SiLU: lambda m: Activation("silu"),
    nn.Softplus: lambda m: Activation("softplus", (float(m.beta), float(m.threshold))),
    nn.Tanh: lambda m: Activation("tanh"),
    nn.Sigmoid: lambda m: Activation("sigmoid"),
    nn.GELU: lambda m: Activation("gelu_tanh" if m.approximate == "tanh" else "gelu"),
}


def from_module(module: nn.Module) -> Activation | None:
    """The :class:`Activation` a module computes, or ``None`` if it is not exactly one of the
    supported activation classes (a subclass is ``None``: its ``forward`` may differ)."""
    make = _FROM_TYPE.get(type(module))
    return None if make is None else make(module)
