"""The system's certificate authorities, for every TLS connection the daemon verifies: the
branches' computes (unless a URL names its own ``sslrootcert``) and the Neon API.

OpenSSL takes a store in two forms. A bundle file is parsed whole when it is loaded: about
1 MiB resident for the ~140 roots of a Mozilla bundle, in every context that loads it, for
as long as the daemon runs. A directory of certificates named by their subject's hash (what
``update-ca-certificates`` and ``openssl rehash`` keep in /etc/ssl/certs) is read on
demand: a handshake loads the one root it chains to. Where the system has such a directory,
the daemon trusts it alone; both forms are written from one list by the system's CA tools.
Otherwise (no hashed directory, or ``SSL_CERT_FILE`` set, which OpenSSL honours and so do
we) it loads the bundle as libpq does.

The Neon API client uses this too, rather than httpx's default of certifi's bundle: a
company CA installed in the system store (a TLS-inspecting proxy) then works for the API as
it does for the computes and for psql.
"""

from __future__ import annotations

import os
import re
import ssl

# The names `openssl rehash` gives: the subject hash, a dot, a number for collisions.
_HASHED_NAME = re.compile(r"[0-9a-f]{8}\.[0-9]+")


def system_context(paths: ssl.DefaultVerifyPaths | None = None) -> ssl.SSLContext:
    """A new verify-full client context trusting the system's CAs.

    ``paths`` defaults to OpenSSL's own idea of the system store (with ``SSL_CERT_FILE`` and
    ``SSL_CERT_DIR`` applied), which is what a test replaces.
    """
    if paths is None:
        paths = ssl.get_default_verify_paths()
    file_chosen = bool(os.environ.get(paths.openssl_cafile_env))
    if paths.capath is not None and not file_chosen and is_hashed_directory(paths.capath):
        return ssl.create_default_context(capath=paths.capath)
    if paths.cafile is None and paths.capath is None:
        return ssl.create_default_context()  # the platform's own way (Windows: its store)
    return ssl.create_default_context(cafile=paths.cafile, capath=paths.capath)


def is_hashed_directory(path: str) -> bool:
    """Whether ``path`` holds certificates under OpenSSL's hashed names."""
    try:
        with os.scandir(path) as entries:
            return any(_HASHED_NAME.fullmatch(entry.name) for entry in entries)
    except OSError:
        return False
