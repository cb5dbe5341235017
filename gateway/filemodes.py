"""Secrets at rest: the state directory and every private key must be the gateway's own and closed to others.

The rule is OpenSSH's: sshd refuses a host key that group or others may access ("UNPROTECTED PRIVATE KEY
FILE", any of the 0o077 bits), and ssh refuses such an identity file. Here it covers the state directory (it
holds the token signing key and generated keys, so a 0755 directory lets anyone list them and a 0775 one lets
a group replace them), the gateway's SSH host keys, the TLS keys, the token key and the VM login keys. The
owner must be the user the gateway runs as (the effective uid), or the file's owner could read or swap it.
Symlinks are followed: what counts is the file the gateway reads. Certificates and public keys are not secrets
and are not checked.

Each check raises StartupError naming the config key, the file, its mode or owner, and the command that fixes
it. Nothing is changed on disk: a loosened mode is the operator's to explain, not ours to paper over.
"""

from __future__ import annotations

import os
import shlex
import stat
from pathlib import Path

import asyncssh

from gateway.errors import StartupError

_OTHERS = 0o077  # group and other bits, as OpenSSH's sshkey_perm_ok checks them


def _stat(path: Path, key: str) -> os.stat_result:
    try:
        return path.stat()
    except FileNotFoundError:
        raise StartupError(f"{key}: file not found: {str(path)!r}") from None
    except PermissionError:
        raise StartupError(f"{key}: file not readable: {str(path)!r}") from None
    except OSError as exc:
        raise StartupError(f"{key}: cannot check {str(path)!r}: {exc.strerror}") from None


def _access(mode: int) -> str:
    """What group or others may do, in words: `read`, `read and write`, `list and enter`, ..."""
    words = ("list", "write in", "enter") if stat.S_ISDIR(mode) else ("read", "write", "run")
    return " and ".join(word for word, bits in zip(words, (0o044, 0o022, 0o011), strict=True) if mode & bits)


def _check_owner(st: os.stat_result, path: Path, key: str, what: str) -> None:
    uid = os.geteuid()
    if st.st_uid != uid:
        raise StartupError(
            f"{key}: {what} {str(path)!r} is owned by uid {st.st_uid}, not by uid {uid} that the gateway runs as; "
            f"its owner could read or replace it: run `chown {uid} {shlex.quote(str(path))}` or start the gateway as its owner"
        )


def check_state_dir(path: Path, key: str = "gateway.state_dir") -> None:
    """Refuse a state directory that is not a directory, not the gateway's own, or open to group or others.

    Raises StartupError; a directory the gateway just created (mode 0700) passes.
    """
    st = _stat(path, key)
    if not stat.S_ISDIR(st.st_mode):
        raise StartupError(f"{key}: not a directory: {str(path)!r}")
    _check_owner(st, path, key, "state directory")
    mode = stat.S_IMODE(st.st_mode)
    if mode & _OTHERS:
        raise StartupError(
            f"{key}: state directory {str(path)!r} has mode {mode:04o}, so group or others may {_access(st.st_mode)} it, "
            f"and it holds the gateway's private keys: run `chmod 700 {shlex.quote(str(path))}`"
        )


def check_private_file(path: Path, key: str, what: str = "private key file") -> None:
    """Refuse a private key (or other secret) file that is not the gateway's own or that group or others may access.

    `key` is the config key the path came from (for a generated file, the state dir's); `what` names the file for
    the operator. Raises StartupError, also when the file is missing ("file not found") or cannot be looked at.
    """
    st = _stat(path, key)
    _check_owner(st, path, key, what)
    mode = stat.S_IMODE(st.st_mode)
    if mode & _OTHERS:
        raise StartupError(
            f"{key}: UNPROTECTED PRIVATE KEY FILE: {what} {str(path)!r} has mode {mode:04o}, so group or others may "
            f"{_access(st.st_mode)} it: run `chmod 600 {shlex.quote(str(path))}`"
        )


def read_private_key(path: Path, key: str, what: str = "private key file") -> asyncssh.SSHKey:
    """An SSH private key the config names (or the gateway generated): `check_private_file`, then parsed.

    Raises StartupError naming `key` and the file: missing, unreadable, open to others, or not a usable key.
    """
    check_private_file(path, key, what)
    try:
        return asyncssh.read_private_key(path)
    except FileNotFoundError:
        raise StartupError(f"{key}: file not found: {str(path)!r}") from None
    except PermissionError:
        raise StartupError(f"{key}: file not readable: {str(path)!r}") from None
    except (asyncssh.KeyImportError, asyncssh.KeyEncryptionError, ValueError, OSError) as exc:
        raise StartupError(f"{key}: not a usable private key ({exc}): {str(path)!r}") from None
