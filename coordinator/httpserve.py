"""The bounded HTTP server behind /metrics and the dashboard (issues 14 and 26).

Every connection goes through two phases:

1. intake: one thread with a selector accepts connections and reads each request head without blocking,
   from all open connections at once, until its blank line. A connection is closed there when its head is
   not complete within the request deadline (408), is longer than `MAX_HEAD` (431), or is one too many from
   its peer (`per_peer`) or in all (`max_open`). A slow-drip socket (one byte a second, forever) costs a
   file descriptor and a buffer, never a worker, and is cut off at the deadline however fast it drips.
2. serve: a fixed pool of worker threads parses the head already read and writes the answer, the socket
   timeout set to what is left of the same deadline (the deadline counts from accept, in total).

So 300 idle connections cost the intake thread plus `workers` threads, and neither slow senders nor one
greedy peer delay another peer's request (tests/coordinator/test_coord_metrics_http.py).
"""

from __future__ import annotations

import errno
import io
import logging
import queue
import re
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer

log = logging.getLogger(__name__)

MAX_HEAD = 16 * 1024  # bytes of request line + headers (a GET has no body)
PER_PEER = 32  # open connections per peer address (intake + queued + serving)
MAX_OPEN = 512  # open connections in all (below the default 1024 file descriptors)
_TOKEN_IN_URL = re.compile(r"(token=)[^&\s'\"]*", re.IGNORECASE)


class PortInUse(RuntimeError):
    """The address to bind is taken: names the host, the port and the ways out."""


def port_in_use_message(host: str, port: int) -> str:
    return (f"metrics_port {port} on {host or '0.0.0.0'} is already in use (another coordinator, or another "
            f"service): stop it (`ss -ltnp 'sport = :{port}'` shows which), or set metrics_port to a free port "
            "(0 = any), or metrics = false")


def redact(text: str) -> str:
    """`text` with every `token=...` query value replaced: request lines are logged, tokens never are."""
    return _TOKEN_IN_URL.sub(r"\1<redacted>", text)


@dataclass
class _Conn:
    addr: object  # as accept() returned it (the handler's client_address)
    peer: str  # the address part: what per_peer counts
    deadline: float  # time.monotonic() when the whole request must be done
    head: bytearray = field(default_factory=bytearray)


class PooledHTTPServer(HTTPServer):
    """HTTPServer whose request heads are read by one selector thread and whose requests are served by
    `workers` fixed threads (http.server's ThreadingHTTPServer starts one thread per connection, unbounded).

    `serve_forever` runs the intake loop; `shutdown` stops it (as socketserver's own).
    """

    request_queue_size = 128  # listen() backlog: accept fast and refuse here, not by SYN retransmits

    def __init__(
        self,
        addr: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        workers: int,
        deadline: float,
        *,
        per_peer: int = PER_PEER,
        max_open: int = MAX_OPEN,
    ) -> None:
        # set before binding: HTTPServer.__init__ calls server_close() when the bind fails, which reads them
        self.deadline = deadline
        self.per_peer, self.max_open = per_peer, max_open
        self.refused = 0  # connections closed at accept: over per_peer or max_open
        self.timed_out = 0  # connections closed because their request missed the deadline
        self._jobs: queue.Queue[tuple[socket.socket, object, str, bytes, float] | None] = queue.Queue()
        self._open: dict[str, int] = {}  # peer -> open connections (intake + queued + serving)
        self._lock = threading.Lock()  # _open: the intake thread adds, workers and intake release
        self._local = threading.local()  # the head and deadline of the request this worker serves
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        self._wake_r, self._wake_w = socket.socketpair()
        self._workers: list[threading.Thread] = []
        try:
            super().__init__(addr, handler)
        except OSError as exc:
            self._wake_r.close()
            self._wake_w.close()
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(port_in_use_message(*addr)) from exc
            raise
        self._workers = [
            threading.Thread(target=self._work, name=f"metrics-http-{i}", daemon=True) for i in range(workers)
        ]
        for t in self._workers:
            t.start()

    # -- intake --------------------------------------------------------------------------------
    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self._stopped.clear()
        sel = selectors.DefaultSelector()
        conns: dict[socket.socket, _Conn] = {}
        try:
            self.socket.setblocking(False)
            sel.register(self.socket, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping.is_set():
                now = time.monotonic()
                wait = min((c.deadline for c in conns.values()), default=now + poll_interval) - now
                for key, _ in sel.select(timeout=max(0.0, min(wait, poll_interval))):
                    if key.fileobj is self.socket:
                        self._accept(sel, conns)
                    elif key.fileobj is not self._wake_r:
                        sock = key.fileobj
                        assert isinstance(sock, socket.socket)
                        self._read_head(sel, conns, sock)
                now = time.monotonic()
                for sock in [s for s, c in conns.items() if c.deadline <= now]:
                    self.timed_out += 1
                    self._drop(sel, conns, sock, b"408 Request Timeout")
        finally:
            for sock in list(conns):
                self._drop(sel, conns, sock, None)
            sel.close()
            self._stopped.set()

    def shutdown(self) -> None:
        self._stopping.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self._stopped.wait()

    def _accept(self, sel: selectors.BaseSelector, conns: dict[socket.socket, _Conn]) -> None:
        for _ in range(64):  # what the backlog holds now, a bounded batch per wakeup
            try:
                sock, addr = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. EMFILE: leave it in the backlog, the next select retries
                log.debug("metrics http: accept failed", exc_info=True)
                return
            peer = str(addr[0]) if isinstance(addr, tuple) else str(addr)
            with self._lock:
                total = sum(self._open.values())
                if self._open.get(peer, 0) >= self.per_peer or total >= self.max_open:
                    self.refused += 1
                    refuse = True
                else:
                    self._open[peer] = self._open.get(peer, 0) + 1
                    refuse = False
            if refuse:
                log.debug("metrics http: %s has %d connections open (%d in all): closing a new one",
                          peer, self._open.get(peer, 0), total)  # fmt: skip
                sock.close()
                continue
            sock.setblocking(False)
            conns[sock] = _Conn(addr, peer, time.monotonic() + self.deadline)
            sel.register(sock, selectors.EVENT_READ)

    def _read_head(self, sel: selectors.BaseSelector, conns: dict[socket.socket, _Conn], sock: socket.socket) -> None:
        c = conns[sock]
        try:
            chunk = sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._drop(sel, conns, sock, None)
            return
        c.head += chunk
        end = c.head.find(b"\r\n\r\n")
        if end < 0 and b"\n\n" in c.head:  # bare-LF clients: http.server accepts them too
            end = c.head.find(b"\n\n")
        if end < 0:
            if len(c.head) > MAX_HEAD:
                self._drop(sel, conns, sock, b"431 Request Header Fields Too Large")
            return
        sel.unregister(sock)
        del conns[sock]
        sock.setblocking(True)
        self._jobs.put((sock, c.addr, c.peer, bytes(c.head), c.deadline))

    def _drop(
        self, sel: selectors.BaseSelector, conns: dict[socket.socket, _Conn], sock: socket.socket, status: bytes | None
    ) -> None:
        c = conns.pop(sock)
        sel.unregister(sock)
        if status is not None:  # best effort, never blocks: the peer may not be reading
            try:
                sock.send(b"HTTP/1.0 " + status + b"\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
            except OSError:
                pass
        sock.close()
        self._release(c.peer)

    def _release(self, peer: str) -> None:
        with self._lock:
            n = self._open.get(peer, 0) - 1
            if n > 0:
                self._open[peer] = n
            else:
                self._open.pop(peer, None)

    # -- serve ---------------------------------------------------------------------------------
    def request_head(self) -> tuple[bytes, float]:
        """(the request head, the deadline) of the request the calling worker serves (the handler's setup)."""
        return self._local.head, self._local.deadline

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            request, client_address, peer, head, deadline = job
            self._local.head, self._local.deadline = head, deadline
            try:
                if time.monotonic() < deadline:
                    self.finish_request(request, client_address)
                else:
                    self.timed_out += 1
            except Exception:  # a client's broken connection must not kill the worker
                log.debug("metrics http: request from %s failed", client_address, exc_info=True)
            finally:
                self.shutdown_request(request)
                self._release(peer)

    def server_close(self) -> None:
        super().server_close()
        for sock in (self._wake_r, self._wake_w):
            sock.close()
        while True:  # close what is still queued, then stop every worker
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self.shutdown_request(job[0])
        for _ in self._workers:
            self._jobs.put(None)
        for t in self._workers:
            t.join(timeout=self.deadline + 1)


class PrefetchedHandler(BaseHTTPRequestHandler):
    """A handler that reads its request head from what the intake thread read (PooledHTTPServer) and
    writes with the socket timeout set to what is left of the request's deadline. Logs never show a token."""

    server: PooledHTTPServer

    def setup(self) -> None:
        head, deadline = self.server.request_head()
        super().setup()
        self.connection.settimeout(max(0.01, deadline - time.monotonic()))  # sendall: in total, not per send
        self.rfile.close()
        self.rfile = io.BytesIO(head)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("metrics http: %s", redact(format % args))

