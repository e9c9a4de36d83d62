"""A TCP proxy on 127.0.0.1 that injects storage faults for real, in front of a real server (moto).

Each new connection draws one fate, with the given shares:
- refused: accepted and reset at once (the client's request gets no answer);
- cut: relayed until a random byte count (up to CUT_WITHIN, both directions together), then reset:
  a request or a response broken mid-stream;
- slow: the first request on it is answered `503 SlowDown`, as S3 answers when throttling, and closed;
- else relayed whole.

Keep-alive connections carry many requests, so a client meets the faults on every request that
needs a new connection (and every cut one sends it to a new connection). Used by the fault tests
(tests/test_faults.py) and the fault benchmark (bench/faults/run.py).
"""
from __future__ import annotations

import itertools
import random
import selectors
import socket
import struct
import threading
from collections import Counter

CUT_WITHIN = 1 << 20
SLOWDOWN = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>"
            b"<Message>Please reduce your request rate.</Message></Error>")


def _reset(s: socket.socket) -> None:
    """Close with an RST, not a FIN: the peer sees a connection reset, as when a link drops."""
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    s.close()


class FaultProxy:
    """proxy = FaultProxy(port_of_server, refuse=0.5, cut=0.2, slow=0.05).start(); proxy.url;
    proxy.counts (fates drawn); proxy.stop()."""

    def __init__(self, port: int, refuse: float = 0.0, cut: float = 0.0, slow: float = 0.0, seed: int = 0):
        if refuse + cut + slow > 1:
            raise ValueError("refuse + cut + slow must be at most 1")
        self.port, self.shares = port, (refuse, cut, slow)
        self.rng, self.lock = random.Random(seed), threading.Lock()
        self.counts: Counter = Counter()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self._stopped = False

    def start(self) -> FaultProxy:
        threading.Thread(target=self._accept, name="faultproxy", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopped = True
        self.sock.close()

    def set(self, refuse: float = 0.0, cut: float = 0.0, slow: float = 0.0) -> None:
        """New shares for the connections from now on (0, 0, 0: a clean proxy)."""
        with self.lock:
            self.shares = (refuse, cut, slow)

    def _fate(self) -> tuple[str, int]:
        with self.lock:
            r, at = self.rng.random(), self.rng.randrange(1, CUT_WITHIN)
            edges = itertools.accumulate(self.shares)
            fate = next((f for f, e in zip(("refused", "cut", "slow"), edges) if r < e), "clean")
            self.counts[fate] += 1
        return fate, at

    def _accept(self) -> None:
        while not self._stopped:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            fate, at = self._fate()
            if fate == "refused":
                _reset(c)
            elif fate == "slow":
                threading.Thread(target=_slowdown, args=(c,), daemon=True).start()
            else:
                threading.Thread(target=self._relay, args=(c, at if fate == "cut" else None), daemon=True).start()

    def _relay(self, c: socket.socket, cut_at: int | None) -> None:
        """Both directions in one thread (a socket closed under another thread's recv sends nothing)."""
        try:
            s = socket.create_connection(("127.0.0.1", self.port))
        except OSError:
            return _reset(c)
        peer, left, cut = {c: s, s: c}, cut_at, False
        with selectors.DefaultSelector() as sel:
            sel.register(c, selectors.EVENT_READ)
            sel.register(s, selectors.EVENT_READ)
            try:
                while not cut:
                    for key, _ in sel.select():
                        data = key.fileobj.recv(65536)
                        if not data:  # one side closed: HTTP never half-closes, so close both
                            raise EOFError
                        if left is not None and len(data) >= left:
                            data, cut = data[:left], True
                        elif left is not None:
                            left -= len(data)
                        peer[key.fileobj].sendall(data)
                        if cut:
                            break
            except (OSError, EOFError):
                pass
        _reset(c) if cut else c.close()
        s.close()


def _slowdown(c: socket.socket) -> None:
    """Read one request (head and Content-Length body, unless it waits for 100-continue), answer 503."""
    try:
        c.settimeout(10)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = c.recv(65536)
            if not chunk:
                return c.close()
            buf += chunk
        head, body = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").lower().split("\r\n")
        n = next((int(ln.split(":", 1)[1]) for ln in lines if ln.startswith("content-length:")), 0)
        if not any(ln.startswith("expect:") and "100-continue" in ln for ln in lines):
            while len(body) < n and (chunk := c.recv(65536)):
                body += chunk
        c.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                  + f"Content-Length: {len(SLOWDOWN)}\r\nConnection: close\r\n\r\n".encode() + SLOWDOWN)
    except OSError:
        pass
    c.close()
