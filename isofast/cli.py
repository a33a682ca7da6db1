"""Command-line entry: ``isofast <command> ...`` and ``python -m isofast <command> ...``.

Each command lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported only when their command runs, so ``isofast --help`` stays instant and a
command whose extras (matplotlib, scikit-learn, tqdm) are missing fails with a clear message
instead of breaking the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

#: command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "doctor": ("isofast.doctor", "print versions and the state of every backend"),
    "train": ("isofast.training.cli_train", "train an AE / VAE / IRVAE / IRAE"),
    "compare": ("isofast.training.cli_compare", "train a VAE and an IRVAE and draw the paper's figure"),
    "sweep": ("isofast.training.cli_sweep", "train a grid of measures x weights x seeds"),
}


def _load(name: str):  # noqa: ANN202 - returns a module
    module, _ = COMMANDS[name]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == "isofast":
            raise SystemExit(f"isofast {name}: this command is not part of this build ({exc.name} missing)")
        raise SystemExit(
            f"isofast {name}: needs the optional package {exc.name!r}; install it with "
            f"`pip install \"isofast[train]\"`"
        ) from exc


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="isofast", description="Fast isometric regularisation for PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.print_help()
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    name = argv[0]
    module = _load(name)
    cmd_parser = argparse.ArgumentParser(prog=f"isofast {name}", description=COMMANDS[name][1])
    module.add_arguments(cmd_parser)
    return int(module.run(cmd_parser.parse_args(argv[1:])) or 0)
