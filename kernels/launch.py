"""Launch settings of every Triton kernel of the fused MLP path, computed here once.

Host side only: tile sizes, grids and warp counts from the shapes (no device synchronisation, so a
training step can be captured in a CUDA graph), the kernels' activation arguments, and the
placeholder passed for an absent optional pointer. Under Triton's interpreter the tiles grow:
each program instance costs interpreter time, not GPU occupancy.
"""

from __future__ import annotations

import torch
import triton

from isofast.activations import Activation
from isofast.backends.triton_backend import interpreting

__all__ = ["act_kwargs", "col_tile", "dummy", "interpreting", "num_warps", "row_tiles", "sm_count", "stream_launch"]


def _p2(x: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(max(1, int(x))))


def row_tiles(ns: int, bsz: int) -> tuple[int, int]:
    """``(NSP, BM)``: padded stream count and samples per program; ``NSP * BM >= 16`` rows.

    On a GPU a program owns 64 stacked rows (128 at large batch); under the interpreter one
    program takes as many samples as possible."""
    nsp = _p2(ns)
    if interpreting():
        rows = min(256, max(16, _p2(ns * bsz)))
    else:
        rows = 128 if bsz * ns >= 32768 else 64
        rows = max(rows, 16 * ((nsp + 15) // 16))
    return nsp, max(1, rows // nsp)


def col_tile(n: int, cap: int = 64) -> int:
    """A column / contraction tile: a power of two in ``[16, cap]`` (whole width under the interpreter)."""
    cap = 128 if interpreting() else cap
    return min(cap, _p2(n, 16))


def num_warps(rows: int, cols: int) -> int:
    """Warps of a program whose output tile is ``rows x cols``."""
    return 8 if rows * cols >= 128 * 128 else 4


def stream_launch(ns: int, bsz: int, n_out: int, n_red: int, out: str = "BN",
                  red: str = "BK") -> tuple[tuple[int, int], dict[str, int]]:
    """``(grid, meta)`` of a kernel whose programs own ``BM`` samples in all ``ns`` streams and a
    tile of its ``n_out`` output columns, contracting ``n_red`` in steps: the grid is
    ``(sample blocks, column tiles)`` and ``meta`` holds ``NS``, ``NSP``, ``BM``, the column and
    contraction tiles under the kernel's names ``out`` and ``red``, and ``num_warps``."""
    nsp, bm = row_tiles(ns, bsz)
    bo, br = col_tile(n_out), col_tile(n_red, 32)
    grid = (triton.cdiv(bsz, bm), triton.cdiv(n_out, bo))
    return grid, {"NS": ns, "NSP": nsp, "BM": bm, out: bo, red: br, "num_warps": num_warps(nsp * bm, bo)}


def act_kwargs(act: Activation) -> dict[str, object]:
    """The kernels' activation arguments: kind code ``ACT`` (constexpr) and ``coef``, ``threshold``
    (see :attr:`isofast.activations.Activation.kernel_params`)."""
    coef, threshold = act.kernel_params
    return {"ACT": act.code, "coef": coef, "threshold": threshold}


def dummy(ref: torch.Tensor) -> torch.Tensor:
    """What an absent optional pointer argument receives (its kernel never reads it)."""
    return torch.empty(1, device=ref.device, dtype=torch.float32)


_SM_COUNT: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 for any other device)."""
    if device.type != "cuda":
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]
