"""Checkpoints that carry their own checksum: written new -> verified -> replaced, verified on load.

``torch.save`` stores no checksum that ``torch.load`` checks, so a checkpoint with flipped bytes
can load silently with different weights. :func:`save_checkpoint` stores a SHA-256 digest of the
checkpoint's *content* (every tensor's dtype, shape and bytes, every number and string, in a fixed
order) under ``"sha256"``, so the file stays an ordinary ``torch.load(..., weights_only=True)``
dictionary. It writes a temporary file next to the target, loads it back and checks the digest,
and only then ``os.replace`` s the target: the last good checkpoint is never lost, whether the
write fails, is cut short or produces a damaged file. :func:`load_checkpoint` recomputes the digest
and refuses (:class:`CheckpointError`, naming the file and what to do) a file that does not
unpickle, lacks the digest or does not match it.
"""

from __future__ import annotations

import hashlib
import os
import struct
from typing import Any

import torch

#: Key of the content digest inside a checkpoint dictionary.
DIGEST_KEY = "sha256"


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted (damaged, truncated, not written by this loop)."""


def _feed(h: Any, obj: Any) -> None:  # noqa: ANN401
    # Type tags keep e.g. the int 1, the float 1.0 and the string "1" apart.
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for key in sorted(obj, key=repr):
            _feed(h, key)
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        # weights_only loading may turn tuples into lists: both hash alike.
        h.update(f"L{len(obj)}".encode())
        for item in obj:
            _feed(h, item)
    elif isinstance(obj, bool) or obj is None:
        h.update(f"B{obj}".encode())
    elif isinstance(obj, int):
        h.update(f"I{obj}".encode())
    elif isinstance(obj, float):
        h.update(b"F" + struct.pack(">d", obj))
    elif isinstance(obj, str):
        h.update(b"S" + struct.pack(">Q", len(obj)) + obj.encode())
    elif isinstance(obj, bytes):
        h.update(b"Y" + struct.pack(">Q", len(obj)) + obj)
    else:
        raise TypeError(f"checkpoint content of type {type(obj).__name__} cannot be checksummed")


def content_digest(state: dict[str, Any]) -> str:
    """SHA-256 (hex) of ``state``'s content, ignoring a stored digest."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != DIGEST_KEY})
    return h.hexdigest()


def _damaged(path: str, why: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} is damaged or not an isofast checkpoint ({why}); nothing was resumed: "
        f"restore a good copy of it, or delete it (or choose another --out) and start without --resume"
    )


def load_checkpoint(path: str, *, mmap: bool = False) -> dict[str, Any]:
    """Load and verify the checkpoint at ``path`` (on the CPU, ``weights_only``; ``mmap`` maps the
    tensors from the file instead of reading them, for a verification whose result is dropped).

    Raises:
        CheckpointError: the file does not unpickle (empty, truncated, random bytes), has no stored
            digest, or its content does not match the digest (flipped bytes).
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, ... by damage
        # torch's messages run to several sentences and lines: the first sentence says what broke.
        first = str(exc).strip().splitlines()[0].split(". ")[0][:160] if str(exc).strip() else ""
        raise _damaged(path, f"it does not load: {type(exc).__name__}{': ' + first if first else ''}") from exc
    if not isinstance(state, dict) or DIGEST_KEY not in state:
        raise _damaged(path, "no stored checksum")
    try:
        digest = content_digest(state)
    except TypeError as exc:
        raise _damaged(path, str(exc)) from exc
    if digest != state[DIGEST_KEY]:
        raise _damaged(path, "its content does not match its stored checksum")
    return state


def save_checkpoint(state: dict[str, Any], path: str) -> None:
    """Write ``state`` plus its digest to ``path``: temporary file, fsync, load back and verify,
    then replace ``path`` atomically. On any failure ``path`` is left as it was and the temporary
    file is removed."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save({**state, DIGEST_KEY: content_digest(state)}, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        try:
            load_checkpoint(tmp, mmap=True)  # mapped: about half the time of reading it back
        except CheckpointError as exc:
            raise CheckpointError(f"writing checkpoint {path} failed: the new file did not verify "
                                  f"({exc.__cause__ or 'checksum mismatch'}); the previous checkpoint is kept") from exc
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
