"""SSH key pairs for the test servers and their clients: ed25519, no passphrase, made by ssh-keygen."""

from __future__ import annotations

import contextlib
from pathlib import Path

from .procs import run


def keygen(path: Path, comment: str) -> None:
    """A new key pair at path and path.pub, replacing any there."""
    for p in (path, path.with_name(path.name + ".pub")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])
