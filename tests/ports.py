"""Ports for the servers tests start, so that two sessions on one machine never collide."""

import socket

_given: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS's choice), never one this process was
    given before: once its probe socket closed, the OS may offer the same port to the next call (two of
    a Ray head's ports collided so, and `ray start` refused them)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _given:
            _given.add(port)
            return port
