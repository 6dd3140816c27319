"""Private per-node state: the directory holding Ray's temp dir, the auth token, the API key,
logs and pid files, and the secret files in it. Standard library only.

The same source runs on every node (``python -c SOURCE OP ...`` over SSH; a secret arrives on
stdin, never on a command line) and locally (imported, for tests and ``ssh: local``).

- The directory defaults to ``~/.cache/vllm-spark/<cluster>-<host>`` of the SSH user. It is
  created mode 0700 and then opened without following symlinks; it must be owned by the
  user and carry no group/other bits, and no directory above it may be writable by others
  unless it is sticky (``/tmp``), so nobody else can plant, replace or read it.
- A secret file is created exclusively (``O_CREAT | O_EXCL | O_NOFOLLOW``, mode 0600) after
  removing the old one: a symlink planted at the path is removed, never written through.
- A secret is read back only from a regular file owned by the user with mode 0600.

Every failure is one JSON line ``{"error": what, "fix": fix}`` (exit status 3) when run as
a script, or :class:`StateDirError` when imported.
"""

from __future__ import annotations

import json
import os
import stat
import sys

DEFAULT_ROOT = "~/.cache/vllm-spark"


class StateDirError(Exception):
    def __init__(self, what: str, fix: str):
        self.what, self.fix = what, fix
        super().__init__(f"{what} -> fix: {fix}")


def default_state_dir(name: str) -> str:
    return os.path.join(os.path.expanduser(DEFAULT_ROOT), name)


def _check_ancestors(path: str) -> None:
    """No directory above ``path`` may let someone else rename or replace its entries."""
    me = os.geteuid()
    parent = os.path.dirname(path)
    while True:
        try:
            st = os.stat(parent)
        except OSError as e:
            raise StateDirError(f"cannot stat {parent}: {e.strerror}",
                                "set state_dir to a directory you own") from None
        writable_by_others = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if st.st_uid not in (0, me) or (writable_by_others and not st.st_mode & stat.S_ISVTX):
            raise StateDirError(
                f"{parent} (above the state dir {path}) is owned by uid {st.st_uid} with mode "
                f"{stat.S_IMODE(st.st_mode):04o}: others could replace the state dir",
                f"set state_dir under a directory only you can write (default {DEFAULT_ROOT})")
        if parent == os.path.dirname(parent):
            return
        parent = os.path.dirname(parent)


def ensure_private_dir(path: str) -> str:
    """Create (0700) or check ``path``; returns it absolute. Raises :class:`StateDirError`."""
    path = os.path.abspath(os.path.expanduser(path))
    old = os.umask(0o077)
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
    except OSError as e:
        raise StateDirError(f"cannot create the state dir {path}: {e.strerror}",
                            "set state_dir to a directory you can create") from None
    finally:
        os.umask(old)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as e:
        what = ("is a symlink" if os.path.islink(path) else
                "is not a directory" if os.path.lexists(path) else e.strerror)
        raise StateDirError(f"state dir {path} {what}: refusing to use it",
                            f"remove {path} (someone may have planted it) or set state_dir "
                            "elsewhere") from None
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if st.st_uid != os.geteuid():
        raise StateDirError(f"state dir {path} is owned by uid {st.st_uid}, not by you "
                            f"(uid {os.geteuid()})",
                            f"remove {path} (someone else created it) or set state_dir "
                            "elsewhere")
    if st.st_mode & 0o077:
        raise StateDirError(f"state dir {path} has mode {stat.S_IMODE(st.st_mode):04o}: "
                            "others can read or enter it",
                            f"chmod 700 {path} (and remove any token in it)")
    _check_ancestors(path)
    return path


def write_secret(path: str, data: str) -> None:
    """Replace ``path`` with a new 0600 file holding ``data``; its directory must be private."""
    ensure_private_dir(os.path.dirname(path))
    try:
        os.unlink(path)  # a symlink is removed itself, its target is untouched
    except FileNotFoundError:
        pass
    except OSError as e:
        raise StateDirError(f"cannot replace {path}: {e.strerror}", f"remove {path}") from None
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except OSError as e:
        raise StateDirError(f"cannot create {path} exclusively: {e.strerror} (another "
                            "process raced for it)", f"remove {path} and retry") from None
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data.encode())
    finally:
        os.close(fd)


def read_secret(path: str) -> str:
    """The content of a secret file, refusing symlinks, others' files and open modes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise StateDirError(f"cannot read {path}: {e.strerror}",
                            "write it again (`vllm-spark up` writes a fresh token)") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise StateDirError(f"{path} is not a private file of yours (uid {st.st_uid}, mode "
                                f"{stat.S_IMODE(st.st_mode):04o})",
                                f"remove {path}; `vllm-spark up` writes a fresh one")
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks).decode()
    finally:
        os.close(fd)


def main(argv: list[str]) -> int:
    """``ensure PATH-or-'' NAME`` | ``write PATH`` (data on stdin) | ``read PATH`` |
    ``digest PATH`` (a short hash; null when absent or not private)."""
    try:
        op = argv[0]
        if op == "ensure":
            path = ensure_private_dir(argv[1] or default_state_dir(argv[2]))
            print(json.dumps({"path": path}))
        elif op == "write":
            write_secret(argv[1], sys.stdin.read())
            print(json.dumps({"path": argv[1]}))
        elif op == "read":
            sys.stdout.write(read_secret(argv[1]))
        elif op == "digest":  # compare secrets across nodes without moving them
            import hashlib

            try:
                value = read_secret(argv[1])
            except StateDirError:
                value = None
            print(json.dumps({"digest": value and
                              hashlib.sha256(value.strip().encode()).hexdigest()[:16]}))
        else:
            raise SystemExit(f"unknown operation {op!r}")
    except StateDirError as e:
        print(json.dumps({"error": e.what, "fix": e.fix}))
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
