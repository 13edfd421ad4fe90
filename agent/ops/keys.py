"""Key material: generating the ED25519 key SaaSquatch is given."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.errors import AgentError


class KeygenError(AgentError):
    """The key pair cannot be written (an existing key is never overwritten)."""


def write_new_keypair(path: Path, comment: str | None = None) -> str:
    """Write PATH (mode 0600, OpenSSH format, no passphrase) and PATH.pub; return the public line.
    KeygenError when PATH exists or cannot be written."""
    try:
        return _write_new_keypair(path, comment)
    except FileExistsError:
        raise KeygenError(f"{path} already exists; not overwriting a key") from None
    except OSError as exc:
        raise KeygenError(f"cannot write {path}: {exc.strerror}") from None


def _write_new_keypair(path: Path, comment: str | None) -> str:
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    comment = comment or f"saasquatch-agent@{socket.gethostname()}"
    public_line = f"{public.decode()} {comment}"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private)
    Path(f"{path}.pub").write_text(public_line + "\n")
    return public_line
