"""Per-kernel resource usage from the compile check: registers, spills, stack and shared memory.

Read from the ``ptxas -v`` log of each compile (``nvcc -Xptxas -v`` for ``csrc/cuda/*.cu``; the log
of the ptxas run inside ``triton.compile`` for the Triton kernels, whose shared memory is dynamic
and comes from Triton's compiled metadata), so that a slow kernel can be understood without a
profiler. ``isofast doctor --compile-check --stats FILE`` writes them as JSON.

A record is ``{"backend", "kernel", "function", "arch", "registers", "barriers", "stack_bytes",
"spill_stores", "spill_loads", "shared_bytes"}`` (``None`` where the log does not say).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

_ENTRY = re.compile(r"^ptxas\S* info\s*: Compiling entry function '([^']+)' for '([^']+)'")
_PROPS = re.compile(r"^ptxas\S* info\s*: Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"^ptxas\S* info\s*: Used (\d+) registers")
_BARRIERS = re.compile(r"used (\d+) barriers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str) -> list[dict[str, Any]]:
    """One record per entry function of a ``ptxas -v`` log, in the log's order (mangled names)."""
    records: dict[str, dict[str, Any]] = {}
    entry: str | None = None
    props: str | None = None
    for line in log.splitlines():
        line = line.strip()
        if m := _ENTRY.match(line):
            entry = m.group(1)
            records[entry] = {"backend": None, "kernel": None, "function": entry, "arch": m.group(2), "registers": None, "barriers": None,
                              "stack_bytes": None, "spill_stores": None, "spill_loads": None, "shared_bytes": None}
        elif m := _PROPS.match(line):
            props = m.group(1)
        elif (m := _FRAME.search(line)) and props in records:
            records[props].update(stack_bytes=int(m.group(1)), spill_stores=int(m.group(2)),
                                  spill_loads=int(m.group(3)))
        elif (m := _USED.match(line)) and entry in records:
            rec = records[entry]
            rec["registers"] = int(m.group(1))
            if b := _BARRIERS.search(line):
                rec["barriers"] = int(b.group(1))
            s = _SMEM.search(line)
            rec["shared_bytes"] = int(s.group(1)) if s else 0
    return list(records.values())


def summary(records: list[dict[str, Any]]) -> str:
    """One phrase for a compile message: kernel count, register range, spills."""
    regs = [r["registers"] for r in records if r.get("registers") is not None]
    if not regs:
        return "no ptxas report"
    spilled = [r for r in records if (r.get("spill_stores") or 0) + (r.get("spill_loads") or 0) > 0]
    spills = (f"spills in {len(spilled)} (up to {max(r['spill_stores'] + r['spill_loads'] for r in spilled)} B)"
              if spilled else "no spills")
    span = f"{min(regs)}-{max(regs)}" if min(regs) != max(regs) else str(regs[0])
    stack = max(r.get("stack_bytes") or 0 for r in records)
    frame = f", stack frames up to {stack} B" if stack else ""
    return f"{len(records)} kernel{'s' if len(records) != 1 else ''}, {span} registers, {spills}{frame}"


def demangle(names: list[str]) -> list[str]:
    """Readable kernel names (``c++filt``, without the parameter list); the mangled names when
    ``c++filt`` is not installed."""
    tool = shutil.which("c++filt")
    if tool is None or not names:
        return names
    try:
        proc = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return names
    out = proc.stdout.splitlines()
    if proc.returncode != 0 or len(out) != len(names):
        return names
    short = [re.sub(r"^void ", "", n).replace("(anonymous namespace)::", "") for n in out]
    return [n.split("(")[0] if "(" in n else n for n in short]


def write(path: Path, records: list[dict[str, Any]], env: dict[str, Any]) -> None:
    """``{"env": ..., "kernels": records}`` as JSON, plus a markdown table beside it (``.md``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"env": env, "kernels": records}, indent=1) + "\n")
    path.with_suffix(".md").write_text(markdown(records, env))


def markdown(records: list[dict[str, Any]], env: dict[str, Any]) -> str:
    """The records as a markdown table, one row per kernel, under a line of versions."""
    head = ", ".join(f"{k} {v}" for k, v in env.items())
    rows = ["| backend | kernel | function | arch | registers | stack B | spill stores B | spill loads B | shared B |",
            "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in records:
        cells = [r.get(k) for k in ("backend", "kernel", "function", "arch", "registers", "stack_bytes",
                                   "spill_stores", "spill_loads", "shared_bytes")]
        rows.append("| " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
    return f"Compile-check resource usage ({head}).\n\n" + "\n".join(rows) + "\n"
