"""Sandbox probe (Python): operations that try to break out of the component sandbox
and report what happened as JSON instead of raising. Entity type is free (e.g. `escape`).

Built with `conflux-build escape.py -o target/polyglot/escape-py.wasm`.
"""

import encodings.idna  # noqa: F401 - socket.getaddrinfo encodes host names with it; modules
import os                # must be imported at build time (componentize-py pre-init), so import it here
import socket

from conflux_sdk import entity


def _err(e):
    return {"ok": False, "error": f"{type(e).__name__}: {e}"}


@entity
class Escape:
    def read_file(self, path=None):
        """Tries to read `path` (default /etc/passwd)."""
        try:
            with open(path or "/etc/passwd", "rb") as f:
                return {"ok": True, "content": f.read(4096).decode("utf-8", "replace")}
        except BaseException as e:  # noqa: BLE001 - report, never raise
            return _err(e)

    def env(self):
        """The environment variables the component sees (expected: none)."""
        try:
            return dict(os.environ)
        except BaseException as e:  # noqa: BLE001
            return _err(e)

    def connect(self, addr=None):
        """Tries a TCP connection to `addr` ("host:port", default 127.0.0.1:80)."""
        host, _, port = (addr or "127.0.0.1:80").rpartition(":")
        try:
            s = socket.create_connection((host or "127.0.0.1", int(port)), timeout=2)
            s.close()
            return {"ok": True}
        except BaseException as e:  # noqa: BLE001
            return _err(e)

    def listdir(self, path=None):
        """Lists `path` (default /): expected an error or []."""
        try:
            return {"ok": True, "entries": sorted(os.listdir(path or "/"))}
        except BaseException as e:  # noqa: BLE001
            return _err(e)

    def preopens(self):
        """Same as listdir("/")."""
        return self.listdir("/")
