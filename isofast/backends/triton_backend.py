"""The ``"triton"`` backend: the fused MLP ops as Triton kernels (package ``isofast.kernels``).

Runs on CUDA tensors when Triton and a CUDA device are present, and on CPU tensors only under
Triton's interpreter (``TRITON_INTERPRET=1`` set before Triton is imported), which is how the test
suite checks the kernels without a GPU.

- dtypes: fp32, bf16 and fp16 tensors run the kernels (loads upcast to fp32, fp32 accumulation;
  ``H`` and the statistics are returned in fp32, gradients in their tensors' dtypes); fp64 tensors are not supported
  (``supports`` says so and ``plan`` picks the torch twin, exact in fp64).
- GEMM operand precision: :func:`isofast.backends.precision` (``"fp32"`` default, ``"tf32"``,
  ``"bf16"``); the mode of the forward is recorded in ``saved`` and reused by the backward.
- No host-device synchronisation: shapes decide every launch, so a whole training step can be
  captured in a CUDA graph. Weight gradients accumulate with fp32 atomics (not bitwise
  deterministic from run to run).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from isofast.activations import KINDS
from isofast import compile_stats
from isofast.backends.base import Backend, CompileResult, Grads

#: ``saved[-1]`` of a forward: an empty tensor whose length is the forward's GEMM precision code,
#: so that the backward reuses the forward's precision (one cached tensor per code).
_PRECISION_TAGS: dict[int, Tensor] = {}


def _precision_tag(code: int) -> Tensor:
    if code not in _PRECISION_TAGS:
        _PRECISION_TAGS[code] = torch.empty(code)
    return _PRECISION_TAGS[code]


def interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _kernels():
    """The kernel package ``isofast.kernels``: inside an installed isofast, or the ``kernels/``
    folder beside this ``isofast/`` in a source checkout. The checkout's folder is loaded by its
    path, so that a checkout on ``PYTHONPATH`` never runs the kernels of another installed copy."""
    loaded = sys.modules.get("isofast.kernels")
    if loaded is not None:
        return loaded
    package = Path(__file__).resolve().parents[1]
    source = package.parent / "kernels" / "__init__.py"
    if (package / "kernels").is_dir() or not source.exists():
        return importlib.import_module("isofast.kernels")
    spec = importlib.util.spec_from_file_location("isofast.kernels", source,
                                                  submodule_search_locations=[str(source.parent)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["isofast.kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["isofast.kernels"]
        raise
    return module


def _prec_code() -> int:
    """The kernels' ``PREC`` code: the index of the current mode in :data:`isofast.backends.PRECISIONS`."""
    from isofast.backends import PRECISIONS, current_precision

    return PRECISIONS.index(current_precision())


def _contig(ts: Sequence[Tensor | None]) -> list[Tensor | None]:
    return [None if t is None else t.contiguous() for t in ts]


def _weight(data_weight: Tensor | None) -> Tensor | None:
    """The data-space weight as the kernels read it (contiguous), or ``None``."""
    return None if data_weight is None else data_weight.contiguous()


def _cast_grads(grad_z: Tensor, wgrads: list[Tensor], bgrads: list[Tensor | None], weights: Sequence[Tensor],
                dtype: torch.dtype) -> Grads:
    return (
        grad_z.to(dtype),
        [g.to(w.dtype) for g, w in zip(wgrads, weights)],
        [None if g is None else g.to(w.dtype) for g, w in zip(bgrads, weights)],
    )


class TritonBackend(Backend):
    name = "triton"
    #: The last layer's kernels (Gram, statistics, chain top) weight by ``data_weight``.
    diagonal_data_metric = True

    # ---------------------------------------------------------------- availability

    def availability(self) -> tuple[bool, str]:
        try:
            import triton  # noqa: F401
        except ImportError:
            return False, "triton is not installed (pip install triton)"
        try:
            _kernels()
        except ModuleNotFoundError as exc:
            return False, f"the Triton kernels are not part of this build ({exc.name} missing)"
        if interpreting():
            return True, "through the Triton interpreter (TRITON_INTERPRET=1): CPU tensors, slow"
        if not torch.cuda.is_available():
            return False, "no CUDA device (TRITON_INTERPRET=1 runs the kernels on CPU tensors)"
        return True, ""

    def supports(self, device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[bool, str]:
        if dtype == torch.float64:
            # fp64 GEMMs gain nothing from Triton: the torch twin is exact there, and plan() says so.
            return False, "float64 runs on the torch twin (Triton kernels are for fp32/bf16/fp16)"
        if device.type == "cuda":
            return (True, "") if torch.cuda.is_available() else (False, "no CUDA device")
        if device.type == "cpu":
            if interpreting():
                return True, ""
            return False, "CPU tensors run the Triton kernels only under TRITON_INTERPRET=1"
        return False, f"Triton kernels do not run on {device.type} tensors"

    # ---------------------------------------------------------------- ops

    def mlp_pullback_forward(self, z, weights, biases, acts, data_weight=None):  # type: ignore[override]
        k = _kernels()
        prec = _prec_code()
        gram, saved = k.mlp_pullback.mlp_pullback_forward(
            z.contiguous(), _contig(weights), _contig(biases), acts, prec, _weight(data_weight)
        )
        return gram, (*saved, _precision_tag(prec))  # fp32: the accumulation dtype (base.acc_dtype)

    def mlp_pullback_backward(self, grad_h, weights, has_bias, acts, saved, data_weight=None):  # type: ignore[override]
        *saved, tag = saved
        k = _kernels()
        grad_z, wg, bg = k.mlp_pullback.mlp_pullback_backward(
            grad_h.contiguous(), _contig(weights), has_bias, acts, saved, tag.shape[0], _weight(data_weight)
        )
        return _cast_grads(grad_z, wg, bg, weights, weights[0].dtype)

    def mlp_hutchinson_forward(self, z, probes, weights, biases, acts, data_weight=None):  # type: ignore[override]
        k = _kernels()
        prec = _prec_code()
        stats, saved = k.mlp_hutchinson.mlp_hutchinson_forward(
            z.contiguous(), probes.to(z.dtype).contiguous(), _contig(weights), _contig(biases), acts, prec,
            _weight(data_weight),
        )
        return stats, (*saved, _precision_tag(prec))  # fp32: the accumulation dtype (base.acc_dtype)

    def mlp_hutchinson_backward(self, grad_stats, weights, has_bias, acts, saved, data_weight=None):  # type: ignore[override]
        *saved, tag = saved
        k = _kernels()
        grad_z, wg, bg = k.mlp_hutchinson.mlp_hutchinson_backward(
            grad_stats.contiguous(), _contig(weights), has_bias, acts, saved, tag.shape[0], _weight(data_weight)
        )
        return _cast_grads(grad_z, wg, bg, weights, weights[0].dtype)

    # ---------------------------------------------------------------- ahead-of-time compilation

    def compile_check(self) -> list[CompileResult]:
        """Compile every kernel specialisation in :func:`compile_specs` for an sm_90 (H100) target
        with ``triton.compile`` (down to a cubin through the ptxas that Triton ships); no GPU needed.
        Bypasses Triton's cache so that ptxas runs and reports registers and spills."""
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            return [CompileResult("triton", False, f"triton is not importable: {exc}", [])]
        if interpreting():
            return [CompileResult("triton", False, "TRITON_INTERPRET=1 is set: unset it to compile for the GPU target", [])]
        results = []
        for label, kernel, signature, constexprs in compile_specs():
            results.append(CompileResult(label, *_compile_one(kernel, signature, constexprs)))
        for res in results:
            for rec in res.stats:
                rec.update(backend=self.name, kernel=res.kernel)
        return results


#: Pointer arguments that are fp32 whatever the tensors' dtype (accumulators and statistics).
_FP32_POINTERS = {"stats_ptr", "gram_ptr", "wgrad_ptr", "bgrad_ptr", "px_ptr"}
#: Scalar arguments that are floats (activation parameters); every other scalar is an i32.
_FLOAT_SCALARS = {"coef", "threshold"}


def _signature(kernel, dtype: str, constexprs: dict[str, object]) -> dict[str, str]:
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name in _FP32_POINTERS else f"*{dtype}"
        else:
            sig[name] = "fp32" if name in _FLOAT_SCALARS else "i32"
    return sig


def compile_specs() -> list[tuple[str, object, dict[str, str], dict[str, object]]]:
    """``(label, kernel, signature, constexprs)`` of the specialisations ``compile_check`` builds:
    every kernel with every activation (fp32 storage, ieee fp32 GEMMs), and every kernel with tf32
    and bf16 GEMM operands and with bf16 storage."""
    k = _kernels()
    ms, pb, hu = k.mlp_stream, k.mlp_pullback, k.mlp_hutchinson
    ns, nsp, bm = 3, 4, 16  # exact mode at m = 2: 64 stacked rows, as on the GPU

    def fwd(act, prec):
        return dict(NS=ns, NSP=nsp, ACT=act, HAS_BIAS=True, SAVE_P=True, SAVE_T=True, STATS=True, HAS_W=True,
                    BM=bm, BN=64, BK=32, PREC=prec)

    def dgrad(act, prec):
        return dict(NS=ns, NSP=nsp, ACT=act, PRO=ms.PRO_STREAM, HAS_T=True, HAS_PX=True, PRIMAL_ONLY=False,
                    STATS=True, BM=bm, BJ=64, BK=32, PREC=prec)

    def wgrad(act, prec):
        return dict(NS=ns, NSP=nsp, ACT=act, PRO=ms.PRO_STREAM, HAS_T=True, HAS_PX=True, HAS_BIAS=True,
                    BM=bm, BN=64, BJ=64, PREC=prec)

    def gram(act, prec):
        return dict(NS=ns, NSP=nsp, ACT=act, HAS_BIAS=True, HAS_W=True, BM=bm, BN=64, BK=32, PREC=prec)

    def gram_bwd(act, prec):
        return dict(NS=ns, NSP=nsp, ACT=act, HAS_BIAS=True, HAS_D2=True, HAS_W=True, BM=bm, BN=64, BK=32,
                    PREC=prec)

    def chain_bwd(act, prec):
        return dict(NS=2, NSP=2, ACT=act, HAS_D2=True, LAST=True, HAS_W=True, BM=32, BN=64, BK=32, PREC=prec)

    table = [
        ("mlp_stream_fwd", ms.mlp_stream_fwd_kernel, fwd),
        ("mlp_stream_dgrad", ms.mlp_stream_dgrad_kernel, dgrad),
        ("mlp_stream_wgrad", ms.mlp_stream_wgrad_kernel, wgrad),
        ("mlp_pullback_gram", pb.mlp_pullback_gram_kernel, gram),
        ("mlp_pullback_gram_bwd", pb.mlp_pullback_gram_bwd_kernel, gram_bwd),
        ("mlp_hutchinson_chain_bwd", hu.mlp_hutchinson_chain_bwd_kernel, chain_bwd),
    ]
    specs = []
    for label, kernel, make in table:
        for code, kind in enumerate(KINDS):
            c = make(code, 0)
            specs.append((f"{label}[{kind},fp32]", kernel, _signature(kernel, "fp32", c), c))
        for prec, dtype, tag in ((1, "fp32", "tf32"), (2, "fp32", "bf16-gemm"), (2, "bf16", "bf16")):
            c = make(KINDS.index("sigmoid"), prec)
            specs.append((f"{label}[sigmoid,{tag}]", kernel, _signature(kernel, dtype, c), c))
    return specs


def _compile_one(kernel, signature: dict[str, str], constexprs: dict[str, object]) -> tuple[bool, str, list[dict]]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    log = io.StringIO()
    try:
        from triton import knobs

        src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        # A cached cubin would skip ptxas and its report: compile afresh, with Triton printing the log.
        with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            knobs.compilation.always_compile = True
            knobs.nvidia.dump_ptxas_log = True
            compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    except Exception as exc:  # noqa: BLE001 - report any compiler failure as a failed check
        first = str(exc).strip().splitlines()
        return False, f"{type(exc).__name__}: {first[0] if first else ''}"[:300], []
    meta = compiled.metadata
    cubin = compiled.asm.get("cubin", b"")
    stats = compile_stats.parse_ptxas_log(log.getvalue())
    shared = getattr(meta, "shared", 0)
    for rec in stats:
        rec["shared_bytes"] = shared  # Triton's shared memory is dynamic: ptxas does not see it
    return True, (f"sm_90 cubin {len(cubin)} B, {shared} B shared, {meta.num_warps} warps, "
                  f"{compile_stats.summary(stats)}"), stats


BACKEND = TritonBackend()
