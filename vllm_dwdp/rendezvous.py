"""How the ranks of one DWDP group find each other: Unix sockets in a private directory.

The ranks of a group share one host (peer memory needs it). Each rank listens on
``<dir>/rank<r>.sock``, where ``<dir>`` is ``<rendezvous_dir>/<group>`` (default
``$XDG_RUNTIME_DIR/vllm-dwdp`` or ``/tmp/vllm-dwdp-<uid>``), created with mode 0700 and refused if
another user owns it or can enter it. Every rank connects to every other rank's socket, checks
the peer's user with ``SO_PEERCRED``, and reads the peer's manifest (JSON) and the file
descriptors of its expert segments (``SCM_RIGHTS``). Nothing is pickled, no TCP port is opened.

The connections stay open after start-up and carry nothing more: a peer that exits, however it
dies, closes them, and its ``pidfd`` becomes readable. A watcher thread sees either within
milliseconds and reports the rank by number and process id, so the engine stops before its next
step reads memory a dead rank no longer keeps up to date.
"""

from __future__ import annotations

import json
import os
import select
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable

from vllm_moe_core.config import GROUP_NAME

_HEADER = struct.Struct("!I")
_MAX_MESSAGE = 64 << 20
_FDS_PER_MESSAGE = 250           # below the kernel's SCM_MAX_FD (253)


class PeerFailure(RuntimeError):
    """A DWDP peer rank is gone, never came up, or does not match this one."""


def default_base_dir() -> str:
    run = os.environ.get("XDG_RUNTIME_DIR")
    if run and os.path.isdir(run) and os.access(run, os.W_OK):
        return os.path.join(run, "vllm-dwdp")
    return f"/tmp/vllm-dwdp-{os.getuid()}"


def private_dir(path: str) -> str:
    """Create ``path`` (and its parent) as 0700 directories of this user, or refuse one that
    another user owns, that others may enter, or that is a symbolic link."""
    for d in (os.path.dirname(path), path):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass
        st = os.lstat(d)
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            raise PeerFailure(f"DWDP rendezvous path {d} is not a directory (a link?); remove it "
                              f"or set additional_config.dwdp.rendezvous_dir")
        if st.st_uid != os.getuid():
            raise PeerFailure(f"DWDP rendezvous directory {d} belongs to uid {st.st_uid}, not to "
                              f"this user ({os.getuid()}); set dwdp.rendezvous_dir to a directory "
                              f"of your own")
        if st.st_mode & 0o077:
            raise PeerFailure(f"DWDP rendezvous directory {d} has mode {stat.S_IMODE(st.st_mode):o}: "
                              f"others may enter it; run `chmod 700 {d}` or remove it")
    return path


def _send_msg(sock: socket.socket, obj: dict, fds: list[int] = ()) -> None:
    data = json.dumps(obj, separators=(",", ":")).encode()
    sock.sendall(_HEADER.pack(len(data)) + data)
    for i in range(0, len(fds), _FDS_PER_MESSAGE):
        socket.send_fds(sock, [b"F"], list(fds[i:i + _FDS_PER_MESSAGE]))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed the connection")
        buf += chunk
    return bytes(buf)


def _recv_msg(sock: socket.socket) -> dict:
    (n,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    if n > _MAX_MESSAGE:
        raise PeerFailure(f"a DWDP peer sent a {n}-byte message (limit {_MAX_MESSAGE})")
    obj = json.loads(_recv_exact(sock, n))
    if not isinstance(obj, dict):
        raise PeerFailure("a DWDP peer sent a message that is not a JSON object")
    return obj


def _recv_fds(sock: socket.socket, count: int) -> list[int]:
    fds: list[int] = []
    while len(fds) < count:
        data, got, _flags, _addr = socket.recv_fds(sock, 1, _FDS_PER_MESSAGE)
        if not data:
            for fd in got:
                os.close(fd)
            raise ConnectionError("peer closed the connection while sending descriptors")
        fds.extend(got)
    return fds


def _peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)  # pid, uid, gid


class PeerGroup:
    """One rank's view of its DWDP group: its listening socket, its peers' manifests and
    descriptors, and the watcher that notices a peer's death."""

    def __init__(self, group: str, rank: int, world_size: int, timeout_s: float,
                 base_dir: str | None = None):
        if not GROUP_NAME.match(group):
            raise PeerFailure(f"dwdp.group must be 1-64 letters, digits, '_', '.' or '-', "
                              f"got {group!r}")
        self.group, self.rank, self.world_size, self.timeout_s = group, rank, world_size, timeout_s
        self.dir = private_dir(os.path.join(base_dir or default_base_dir(), group))
        self.failure: str | None = None
        self.on_failure: Callable[[str], None] | None = None
        self.peer_pids: dict[int, int] = {}
        self._served: dict[int, socket.socket] = {}   # peers that fetched from us
        self._fetched: dict[int, socket.socket] = {}  # our connections to peers
        self._manifest: dict | None = None
        self._fds: list[int] = []
        self._identity: dict | None = None
        self._identity_set = threading.Event()
        self._ready = threading.Event()
        self._all_served = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._listener = self._listen()
        self._accepter = threading.Thread(target=self._accept_loop, daemon=True,
                                          name="dwdp-rendezvous")
        self._accepter.start()
        self._watcher: threading.Thread | None = None

    def path_of(self, rank: int) -> str:
        return os.path.join(self.dir, f"rank{rank}.sock")

    # ---- serving our manifest ---------------------------------------------------------------
    def _listen(self) -> socket.socket:
        path = self.path_of(self.rank)
        if os.path.lexists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # left by a rank that died: nobody listens on it
            else:
                probe.close()
                raise PeerFailure(
                    f"DWDP rank {self.rank} of group {self.group!r} is already running ({path} "
                    f"answers). Give each engine its own rank, or this group another "
                    f"dwdp.group name")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        sock.listen(self.world_size)
        return sock

    def publish(self, manifest: dict, fds: list[int]) -> None:
        """What peers get when they connect: ``manifest`` (JSON) and ``fds`` (in order). The
        group keeps its own duplicates of ``fds`` until every peer has them, so the caller
        may close its descriptors as soon as this returns."""
        with self._lock:
            self._manifest, self._fds = manifest, [os.dup(fd) for fd in fds]
        self._ready.set()
        if self.world_size == 1:
            self._close_listener()
            self._all_served.set()

    def wait_served(self, timeout: float) -> bool:
        """Wait until every peer has fetched this rank's manifest and descriptors."""
        return self._all_served.wait(timeout)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            listener = self._listener
            if listener is None:
                return
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            pid, uid, _gid = _peer_credentials(conn)
            if uid != os.getuid():
                conn.close()
                return
            conn.settimeout(self.timeout_s)
            hello = _recv_msg(conn)
            peer = hello.get("rank")
            if hello.get("want") == "identity":  # before loading: what model a rank serves
                if self._identity_set.wait(self.timeout_s):
                    _send_msg(conn, {"rank": self.rank, "identity": self._identity})
                conn.close()
                return
            if (not isinstance(peer, int) or not 0 <= peer < self.world_size or peer == self.rank
                    or hello.get("world_size") != self.world_size or peer in self._served):
                _send_msg(conn, {"error": f"rank {self.rank} of group {self.group!r} expected a "
                                          f"peer of world_size {self.world_size}, got {hello}"})
                conn.close()
                return
            if not self._ready.wait(self.timeout_s):
                conn.close()
                return
            with self._lock:
                manifest, fds = self._manifest, self._fds
            _send_msg(conn, {"rank": self.rank, "pid": os.getpid(), "manifest": manifest,
                             "nfds": len(fds)}, fds)
            conn.settimeout(None)
            with self._lock:
                self._served[peer] = conn
                self.peer_pids.setdefault(peer, pid)
                done = len(self._served) == self.world_size - 1
            if done:  # every peer has what it needs: stop listening
                self._close_listener()
                self._all_served.set()
        except (OSError, ValueError, PeerFailure):
            conn.close()

    def _close_listener(self) -> None:
        """Stop listening, remove the socket's name and close the published descriptors."""
        with self._lock:
            listener, self._listener = self._listener, None
            fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)
        if listener is None:
            return
        listener.close()
        try:
            os.unlink(self.path_of(self.rank))
        except FileNotFoundError:
            pass

    # ---- before loading: the same model everywhere -----------------------------------------
    def check_identities(self, identity: dict) -> None:
        """Publish what this rank serves (model, dtype, quantization...) and compare it with
        every peer's, before any weight is loaded; a difference stops start-up naming it."""
        self._identity = identity
        self._identity_set.set()
        deadline = time.monotonic() + self.timeout_s
        for peer in range(self.world_size):
            if peer == self.rank:
                continue
            sock = self._connect(peer, deadline)
            try:
                _send_msg(sock, {"rank": self.rank, "world_size": self.world_size,
                                 "want": "identity"})
                theirs = _recv_msg(sock).get("identity")
            except (OSError, ConnectionError, ValueError) as e:
                raise PeerFailure(f"DWDP rank {peer} went away during start-up ({e}); restart "
                                  f"all DWDP ranks together") from e
            finally:
                sock.close()
            if not isinstance(theirs, dict):
                raise PeerFailure(f"DWDP rank {peer} sent no description of its model")
            diff = sorted(k for k in set(identity) | set(theirs)
                          if identity.get(k) != theirs.get(k))
            if diff:
                k = diff[0]
                raise PeerFailure(
                    f"DWDP rank {peer} serves {k} = {theirs.get(k)!r} where rank {self.rank} "
                    f"serves {identity.get(k)!r} (differences: {diff}); every rank of group "
                    f"{self.group!r} must run the same model, dtype, quantization and vLLM")

    def _connect(self, peer: int, deadline: float) -> socket.socket:
        path = self.path_of(peer)
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
                break
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise PeerFailure(
                        f"DWDP rank {peer} of group {self.group!r} did not come up within "
                        f"{self.timeout_s:.0f} s (rank {self.rank} waited for {path}). Start all "
                        f"{self.world_size} ranks with the same model, world_size and group, or "
                        f"raise dwdp.peer_timeout_s") from None
                time.sleep(0.05)
        _pid, uid, _ = _peer_credentials(sock)
        if uid != os.getuid():
            sock.close()
            raise PeerFailure(f"{path} is served by uid {uid}, not this user: refusing it")
        sock.settimeout(max(1.0, deadline - time.monotonic()))
        return sock

    # ---- fetching peers' manifests --------------------------------------------------------
    def gather(self) -> dict[int, tuple[dict, list[int]]]:
        """Every peer's (manifest, descriptors); waits at most ``timeout_s`` for each to start."""
        out = {}
        deadline = time.monotonic() + self.timeout_s
        for p in range(self.world_size):
            if p == self.rank:
                continue
            out[p] = self._fetch(p, deadline)
        return out

    def _fetch(self, peer: int, deadline: float) -> tuple[dict, list[int]]:
        sock = self._connect(peer, deadline)
        pid = _peer_credentials(sock)[0]
        path = self.path_of(peer)
        try:
            _send_msg(sock, {"rank": self.rank, "world_size": self.world_size, "pid": os.getpid()})
            reply = _recv_msg(sock)
            if "error" in reply:
                raise PeerFailure(f"DWDP rank {peer} refused rank {self.rank}: {reply['error']}")
            nfds = reply.get("nfds")
            if reply.get("rank") != peer or not isinstance(nfds, int) or nfds < 0:
                raise PeerFailure(f"{path} answered as rank {reply.get('rank')}, not {peer}")
            fds = _recv_fds(sock, nfds)
        except (OSError, ConnectionError, ValueError) as e:
            sock.close()
            raise PeerFailure(f"DWDP rank {peer} (pid {pid}) went away during start-up ({e}); "
                              f"restart all DWDP ranks together") from e
        sock.settimeout(None)
        with self._lock:
            self._fetched[peer] = sock
            self.peer_pids[peer] = pid
        return reply["manifest"], fds

    # ---- liveness -------------------------------------------------------------------------
    def start_watching(self) -> None:
        """Watch every peer (sockets and pidfds) from now on."""
        self._watcher = threading.Thread(target=self._watch, daemon=True, name="dwdp-peer-watch")
        self._watcher.start()

    def _watch(self) -> None:
        poller = select.poll()
        who: dict[int, int] = {}
        pidfds = []
        for peer, sock in self._fetched.items():
            poller.register(sock.fileno(), select.POLLIN | select.POLLHUP)
            who[sock.fileno()] = peer
        for peer, pid in self.peer_pids.items():
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                continue  # already gone: its socket reports it
            pidfds.append(fd)
            poller.register(fd, select.POLLIN)
            who[fd] = peer
        try:
            while not self._stop.is_set():
                for fd, _ev in poller.poll(200):
                    peer = who[fd]
                    if fd in pidfds or self._peer_closed(fd):
                        self._fail(f"DWDP rank {peer} (pid {self.peer_pids.get(peer)}) exited")
                        return
        finally:
            for fd in pidfds:
                os.close(fd)

    @staticmethod
    def _peer_closed(fd: int) -> bool:
        try:
            return os.read(fd, 1) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def _fail(self, why: str) -> None:
        if self._stop.is_set() or self.failure is not None:
            return
        self.failure = (f"{why}. DWDP rank {self.rank} can no longer pull the experts it does not "
                        f"store; restart all DWDP ranks together")
        if self.on_failure is not None:
            self.on_failure(self.failure)

    def check_alive(self) -> None:
        if self.failure is not None:
            raise PeerFailure(self.failure)

    def close(self) -> None:
        self._stop.set()
        self._close_listener()
        with self._lock:
            socks = list(self._served.values()) + list(self._fetched.values())
            self._served.clear()
            self._fetched.clear()
        for s in socks:
            s.close()
