"""TLS contexts for upstream connections, built once per (mode, CA file) and reused."""

from __future__ import annotations

import ssl
from functools import lru_cache

from neonlocal.config.values import TlsMode
from neonlocal.targets import Target
from neonlocal.tls.system_ca import system_context

# PostgreSQL's registered ALPN protocol name (required for direct TLS, harmless otherwise).
ALPN = "postgresql"


@lru_cache(maxsize=32)
def _context(mode: TlsMode, cafile: str | None) -> ssl.SSLContext:
    if cafile is None:
        ctx = system_context()
    else:
        # As libpq's sslrootcert: that file's CAs and no others. The system store is not
        # loaded beside it, which would trust more than the URL says (and hold about 1 MiB).
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols([ALPN])
    if mode is TlsMode.VERIFY_CA:
        ctx.check_hostname = False
    elif mode is TlsMode.NO_VERIFY:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_context(target: Target) -> ssl.SSLContext:
    """The context to reach ``target`` with; verify-full against ``target.host`` by default."""
    cafile = target.sslrootcert if target.sslrootcert not in (None, "system") else None
    return _context(target.tls, cafile)


def forget_contexts() -> None:
    """Drop cached contexts, so a reload picks up a CA file that changed on disk."""
    _context.cache_clear()
