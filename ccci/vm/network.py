"""A machine's network as its guest sees it: QEMU's user-mode network, one per QEMU process.

Every machine has the same addresses (the guest 10.0.2.15, the host 10.0.2.2, DNS 10.0.2.3);
forks never see each other because each QEMU has its own private network. The host's loopback
is reached at 10.0.2.2, so a registry on ``127.0.0.1:PORT`` is ``10.0.2.2:PORT`` in the guest.
"""

from __future__ import annotations

import re

from ..errors import ConfigError

GUEST = "10.0.2.15"
HOST = "10.0.2.2"
_LOOPBACK = ("127.0.0.1", "localhost", "[::1]")
_ADDRESS = re.compile(r"^(?:(?P<scheme>https?)://)?(?P<host>\[::1\]|[A-Za-z0-9.-]+):(?P<port>\d{1,5})/?$")


def guest_registry_url(mirror: str) -> str:
    """Return the URL the guest reaches the REGISTRY_MIRROR at; ConfigError if it is malformed.

    ``127.0.0.1:5000`` becomes ``http://10.0.2.2:5000``; a name or an https URL stays as given
    (without a scheme, http: a mirror on the host side needs no certificate).
    """
    m = _ADDRESS.fullmatch(mirror.strip())
    if not m or not 0 < int(m.group("port")) < 65536:
        raise ConfigError("REGISTRY_MIRROR", f"{mirror!r} is not HOST:PORT or http(s)://HOST:PORT")
    host = HOST if m.group("host") in _LOOPBACK else m.group("host")
    return f"{m.group('scheme') or 'http'}://{host}:{int(m.group('port'))}"
