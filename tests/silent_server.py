"""A loopback TCP server that accepts connections and never answers: a hung server or proxy."""

from __future__ import annotations

import socket
import threading
from contextlib import contextmanager


@contextmanager
def silent_server(backlog: int = 16):
    """Yields (host, port) of a server that accepts and then says nothing, until the block ends."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(backlog)
    held, stop = [], threading.Event()

    def accept():
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[:2]
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in held:
            conn.close()
        sock.close()
