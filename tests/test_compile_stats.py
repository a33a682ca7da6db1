"""Compile-check resource usage: the ptxas report parser, and the records each backend returns."""

from __future__ import annotations

import os

import pytest

from isofast import compile_stats

LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z4wideILi8EEvPf' for 'sm_90'
ptxas info    : Function properties for _Z4wideILi8EEvPf
    64 bytes stack frame, 40 bytes spill stores, 24 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 2048 bytes smem, 380 bytes cmem[0]
ptxas info    : Compile time = 12.0 ms
ptxas-blackwell info    : Compiling entry function 'tiny_kernel' for 'sm_90a'
ptxas-blackwell info    : Function properties for tiny_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas-blackwell info    : Used 18 registers
"""


def test_parse_ptxas_log_reads_every_entry_function():
    wide, tiny = compile_stats.parse_ptxas_log(LOG)
    assert wide["function"] == "_Z4wideILi8EEvPf" and wide["arch"] == "sm_90"
    assert (wide["registers"], wide["barriers"], wide["shared_bytes"]) == (255, 1, 2048)
    assert (wide["stack_bytes"], wide["spill_stores"], wide["spill_loads"]) == (64, 40, 24)
    assert (tiny["function"], tiny["arch"], tiny["registers"], tiny["shared_bytes"]) == ("tiny_kernel", "sm_90a", 18, 0)
    assert tiny["spill_stores"] == 0 and tiny["barriers"] is None
    assert compile_stats.summary([wide, tiny]) == ("2 kernels, 18-255 registers, spills in 1 (up to 64 B), "
                                                      "stack frames up to 64 B")


def test_parse_ptxas_log_of_nothing_is_empty():
    assert compile_stats.parse_ptxas_log("") == []
    assert compile_stats.summary([]) == "no ptxas report"


def test_write_json_and_markdown(tmp_path):
    recs = compile_stats.parse_ptxas_log(LOG)
    compile_stats.write(tmp_path / "s.json", recs, {"triton": "3.6.0"})
    md = (tmp_path / "s.md").read_text()
    assert "triton 3.6.0" in md and "| 255 |" in md and md.count("\n|") == len(recs) + 2  # header, rule, rows


@pytest.mark.slow
def test_triton_compile_check_reports_registers():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1: nothing compiles for the GPU")
    from isofast.backends import triton_backend

    label, kernel, signature, constexprs = triton_backend.compile_specs()[0]
    ok, msg, stats = triton_backend._compile_one(kernel, signature, constexprs)
    assert ok, msg
    (rec,) = stats
    assert rec["registers"] > 0 and rec["spill_stores"] is not None and rec["shared_bytes"] > 0, rec
