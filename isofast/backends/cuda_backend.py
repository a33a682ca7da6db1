"""The ``"cuda"`` backend: CUDA kernels of the compiled extension (``csrc/cuda/*.cu``).

- exact ``mlp_pullback``: ATen GEMMs over the stacked ``(1 + K) B`` rows with the extension's
  fused CUDA epilogue (bias, activation, ``s'(p)`` gating) and backward prologue (``s''`` terms),
  and the per-sample Gram reduced by a CUDA kernel (:func:`pullback_forward`,
  :func:`pullback_backward`: the CUDA kernels of the custom op ``isofast::mlp_pullback_*``);
- the batched spectral ops (see :mod:`isofast._spectral_ext`) and the generic path's reductions
  ``tangent_gram`` and ``tangent_sqnorm``, each the CUDA kernel of its ``isofast::<op>``;
- no ``mlp_hutchinson``: :data:`isofast.dispatch.TABLE` declares the torch twin's instead, and
  ``isofast.plan`` reports it.

Available only when the extension was compiled with its CUDA sources (a CUDA build of torch and
a CUDA toolkit, or ``ISOFAST_BUILD_CUDA=1``) and a CUDA device is present.
:meth:`CudaBackend.compile_check` compiles every ``.cu`` with ``nvcc`` for ``sm_90`` without a GPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

import torch

from isofast import _ext, _spectral_ext, compile_stats, library
from isofast.backends.base import Backend, CompileResult, Grads
from isofast.backends.torch_backend import identity_seeds
from isofast.library import act_args, bias_grads

#: GPU target of :meth:`CudaBackend.compile_check`.
COMPILE_CHECK_ARCH = "sm_90"


def find_nvcc() -> str | None:
    """``nvcc`` from ``$CUDA_HOME`` / ``$CUDA_PATH``, the ``PATH``, or ``/usr/local/cuda``."""
    for env in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(env)
        if root and (Path(root) / "bin" / "nvcc").exists():
            return str(Path(root) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.exists() else None


def _torch_includes() -> list[str]:
    root = Path(torch.__file__).resolve().parent / "include"
    return [str(root), str(root / "torch" / "csrc" / "api" / "include")]


class CudaBackend(Backend):
    name = "cuda"
    #: The CUDA Gram epilogue has no diagonal data-space metric: ``data_weight`` must be ``None``
    #: (``mlp_hutchinson`` called on this backend refuses it too, for one contract).
    diagonal_data_metric = False

    def availability(self) -> tuple[bool, str]:
        module, why = _ext.load()
        if module is None:
            return False, why
        if not dict(module.build_info()).get("cuda"):
            return False, ("the compiled extension has no CUDA kernels (built without a CUDA toolkit or a CUDA "
                           "build of torch; rebuild with ISOFAST_BUILD_CUDA=1)")
        if not torch.cuda.is_available():
            return False, "no CUDA device"
        return True, ""

    def supports(self, device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[bool, str]:
        if torch.device(device).type != "cuda":
            return False, f"the cuda backend runs CUDA tensors only, got device {device}"
        if dtype not in (torch.float32, torch.float64):
            return False, f"the cuda backend runs float32 and float64, got {dtype}"
        return True, ""

    def build(self) -> tuple[bool, str]:
        return _ext.build()

    def compile_check(self) -> list[CompileResult]:
        """Compile each ``csrc/cuda/*.cu`` to an object with ``nvcc -c --std=c++17 -arch=sm_90``;
        ``-Xptxas -v`` reports each kernel's registers, spills and shared memory."""
        sources = [_ext.CSRC / s for s in _ext.CUDA_SOURCES]
        nvcc = find_nvcc()
        if nvcc is None:
            return [CompileResult(s.name, True, "skipped: nvcc not found", []) for s in sources]
        results = []
        includes = [str(_ext.CSRC), *_torch_includes(), sysconfig.get_paths()["include"]]
        with tempfile.TemporaryDirectory(prefix="isofast-nvcc-") as tmp:
            for src in sources:
                if not src.exists():
                    results.append(CompileResult(src.name, False, f"source missing: {src.name}", []))
                    continue
                cmd = [nvcc, "-c", "--std=c++17", f"-arch={COMPILE_CHECK_ARCH}", "-O3", "-Xptxas", "-v", str(src),
                       "-o", str(Path(tmp) / (src.stem + ".o"))]
                cmd += [f"-I{p}" for p in includes]
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
                except (OSError, subprocess.TimeoutExpired) as exc:
                    results.append(CompileResult(src.name, False, f"nvcc did not run: {exc}", []))
                    continue
                if proc.returncode != 0:
                    msg = (proc.stderr or proc.stdout).strip()
                    results.append(CompileResult(src.name, False, msg[-2000:], []))
                    continue
                stats = compile_stats.parse_ptxas_log(proc.stderr + proc.stdout)
                for rec, name in zip(stats, compile_stats.demangle([r["function"] for r in stats])):
                    rec.update(backend=self.name, kernel=src.name, function=name)
                results.append(CompileResult(src.name, True, f"nvcc -arch={COMPILE_CHECK_ARCH}, "
                                             f"{compile_stats.summary(stats)}", stats))
        return results

    # --- ops: each the CUDA kernel of its isofast::<op> (isofast.library) ------------------------

    def mlp_pullback_forward(self, z, weights, biases, acts, data_weight=None):  # type: ignore[override]
        self.refuse_data_weight(data_weight)
        h, saved = library.call("mlp_pullback_forward", z.device, z, list(weights), list(biases), *act_args(acts),
                                None)
        return h, tuple(saved)

    def mlp_pullback_backward(self, grad_h, weights, has_bias, acts, saved, data_weight=None):  # type: ignore[override]
        self.refuse_data_weight(data_weight)
        out = library.call("mlp_pullback_backward", grad_h.device, grad_h, list(weights), list(has_bias),
                           *act_args(acts), list(saved), None)
        return bias_grads(out, has_bias)

    @staticmethod
    def tangent_gram(x: torch.Tensor) -> torch.Tensor:
        """``G[b] = x[b] x[b]^T`` for tangent images ``x (B, K, D)`` (float32/float64, CUDA)."""
        return library.call("tangent_gram", x.device, x)

    @staticmethod
    def tangent_sqnorm(x: torch.Tensor) -> torch.Tensor:
        """``||x[b, k]||^2`` for ``x (B, K, D)`` (float32/float64, CUDA)."""
        return library.call("tangent_sqnorm", x.device, x)

    eigvalsh = staticmethod(_spectral_ext.eigvalsh)
    logdet = staticmethod(_spectral_ext.logdet)
    condition_numbers = staticmethod(_spectral_ext.condition_numbers)
    airm_sq_to_mean = staticmethod(_spectral_ext.airm_sq_to_mean)


BACKEND = CudaBackend()


# --- the CUDA kernels of isofast::mlp_pullback_forward / _backward -------------------------------
# Saved for the backward: per layer the stacked input S_l ((1 + m) B, d_in) and pre-activation
# A_l ((1 + m) B, d_out) (its first B rows the primal p_l), then the tangent images t (B, m, D).

def pullback_forward(z: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None],
                     codes: list[int], coefs: list[float], thresholds: list[float],
                     data_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(H (B, m, m), saved)`` of the exact pullback metric for CUDA ``z (B, m)``."""
    BACKEND.refuse_data_weight(data_weight)
    ext = _ext.get()
    bsz, m = z.shape
    s = identity_seeds(z).reshape((m + 1) * bsz, m)
    saved: list[torch.Tensor] = []
    n_layers = len(weights)
    for l, (w, b) in enumerate(zip(weights, biases)):
        a = s @ w.t()
        saved += [s, a]
        s = ext.cuda_forward_epilogue(a, b, m, codes[l], coefs[l], thresholds[l], l + 1 < n_layers)
    t = s[bsz:].view(m, bsz, -1).transpose(0, 1).contiguous()  # (B, K, D)
    return ext.cuda_gram(t), [*saved, t]


def pullback_backward(grad_h: torch.Tensor, weights: list[torch.Tensor], has_bias: list[bool], codes: list[int],
                      coefs: list[float], thresholds: list[float], saved: list[torch.Tensor],
                      data_weight: torch.Tensor | None = None) -> Grads:
    """``(grad_z (B, m), grad_weights, grad_biases)`` of :func:`pullback_forward` given ``grad_h (B, m, m)``."""
    BACKEND.refuse_data_weight(data_weight)
    ext = _ext.get()
    *layers, t = saved
    bsz, m, d_out = t.shape
    sym = (grad_h + grad_h.transpose(1, 2)).to(t.dtype)
    sb = torch.zeros((m + 1) * bsz, d_out, dtype=t.dtype, device=t.device)
    sb[bsz:] = torch.einsum("bkl,bld->kbd", sym, t).reshape(m * bsz, d_out)
    n_layers = len(weights)
    grad_w: list[torch.Tensor] = [None] * n_layers  # type: ignore[list-item]
    grad_b: list[torch.Tensor | None] = [None] * n_layers
    grad_z = None
    for l in reversed(range(n_layers)):
        x, a = layers[2 * l], layers[2 * l + 1]
        ext.cuda_backward_prologue(a, sb, None, m, codes[l], coefs[l], thresholds[l])
        grad_w[l] = sb.t() @ x
        if has_bias[l]:
            grad_b[l] = sb[:bsz].sum(0)
        if l > 0:
            sb = sb @ weights[l]
        else:
            grad_z = sb[:bsz] @ weights[0]
    return grad_z, grad_w, grad_b  # type: ignore[return-value]
