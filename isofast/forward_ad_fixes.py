"""Correct forward-mode rules for the few PyTorch operators whose own are missing or broken.

During the generic path's tangent pass, :class:`ForwardADFixes` (a ``TorchFunctionMode``) redirects

- ``F.scaled_dot_product_attention``: PyTorch's default kernel choice takes fused kernels (flash,
  memory-efficient) that have no forward-mode rule; here it is the attention's definition
  ``softmax(q k^T * scale + mask) v`` in plain differentiable ops, which forward mode, ``vmap`` and
  reverse mode all handle;
- ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``): its explicit-weights branch,
  which does not call the fused kernels;
- ``F.group_norm``: PyTorch's forward-mode rule views its input and fails on channels-last strided
  inputs ("view size is not compatible"); here it is the normalisation over ``(N, G, C/G * spatial)``
  written with ``reshape``.

Both compute the same function as PyTorch (up to rounding), so the primal output is unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode


def attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
              is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> Tensor:
    """``softmax(q k^T * scale + mask) v`` for ``q (..., L, E)``, ``k (..., S, E)``, ``v (..., S, Ev)``:
    ``F.scaled_dot_product_attention``'s contract, as ordinary ops."""
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(rep, dim=-3), value.repeat_interleave(rep, dim=-3)
    scores = (query * scale) @ key.transpose(-2, -1)
    if is_causal:
        causal = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    weights = scores.softmax(-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, dropout_p)
    return weights @ value


def group_norm(input: Tensor, num_groups: int, weight: Tensor | None = None, bias: Tensor | None = None,
               eps: float = 1e-5) -> Tensor:
    """``F.group_norm``: normalise ``input (N, C, *)`` over each of ``num_groups`` channel groups
    (biased variance), then scale and shift per channel."""
    n, c = input.shape[:2]
    x = input.reshape(n, num_groups, -1)
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).square().mean(-1, keepdim=True)
    y = ((x - mean) * torch.rsqrt(var + eps)).reshape(input.shape)
    affine_shape = (1, c) + (1,) * (input.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(affine_shape)
    if bias is not None:
        y = y + bias.reshape(affine_shape)
    return y


def multi_head_attention_forward(*args: Any, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
    """``F.multi_head_attention_forward`` on its explicit-weights branch, which computes the attention
    with ``bmm`` and ``softmax`` instead of calling the fused ``scaled_dot_product_attention``."""
    want_weights = kwargs.pop("need_weights", args[15] if len(args) > 15 else True)
    args = args[:15] + args[16:]
    out, weights = F.multi_head_attention_forward(*args, need_weights=True, **kwargs)
    return out, (weights if want_weights else None)


#: PyTorch function -> the implementation used during the tangent pass.
REDIRECTS: dict[Callable[..., Any], Callable[..., Any]] = {
    F.scaled_dot_product_attention: attention,
    F.group_norm: group_norm,
    F.multi_head_attention_forward: multi_head_attention_forward,
}

#: One line per redirect, for ``isofast.plan``.
DESCRIPTION = ("scaled_dot_product_attention and nn.MultiheadAttention as softmax(q k^T) v (the fused kernels "
               "have no forward-mode rule), "
               "group_norm by reshape (PyTorch's forward-mode rule fails on channels-last inputs)")


class ForwardADFixes(TorchFunctionMode):
    """Redirect :data:`REDIRECTS` while active (the generic path's tangent pass)."""

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        impl = REDIRECTS.get(func)
        return (impl or func)(*args, **(kwargs or {}))
