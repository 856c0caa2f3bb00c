"""`neonlocal trust`: show (or install) the local CA, so clients can verify the daemon.

The daemon's certificate for localhost, 127.0.0.1 and ::1 is signed by a CA generated beside
the config file (``tls/ca.crt``). A client that trusts that CA can use ``sslmode=verify-full``
against localhost. This command makes the CA if the daemon has not yet, prints where it is
and how each kind of client uses it, and with ``--install`` adds it to libpq's default trust
file, ``~/.postgresql/root.crt``.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import click

from neonlocal.cli.context import Context, fail, pass_ctx


def _system_ca_bundle() -> Path | None:
    """The system's trust bundle as one PEM file, where this Python's OpenSSL has one."""
    cafile = ssl.get_default_verify_paths().cafile
    return Path(cafile) if cafile and Path(cafile).is_file() else None


def usage_text(ca: Path) -> str:
    return "\n".join(
        [
            f"local CA: {ca}",
            "",
            "Clients that trust it can verify the daemon (sslmode=verify-full, host localhost):",
            f"  libpq (psql, psycopg, ...)  sslmode=verify-full sslrootcert={ca}",
            f"                              or PGSSLROOTCERT={ca}",
            f"  node-postgres               NODE_EXTRA_CA_CERTS={ca}, or ssl: {{ca: <its text>}}",
            "  `neonlocal trust --install` adds it to ~/.postgresql/root.crt, libpq's default,",
            "  so verify-full needs no sslrootcert.",
        ]
    )


@click.command()
@click.option(
    "--install",
    is_flag=True,
    help="Add the CA to ~/.postgresql/root.crt, which libpq trusts by default.",
)
@pass_ctx
def trust(obj: Context, install: bool) -> None:
    """Show the local CA that signs the daemon's TLS certificate, and how to trust it."""
    from neonlocal.paths import home_dir
    from neonlocal.tls.local import ensure_generated, install_for_libpq, tls_dir

    settings = obj.settings(missing_ok=True)
    local = settings.local
    if not local.tls:
        fail("local TLS is off ([local] tls = false): the daemon has no certificate to trust")
    if local.tls_cert is not None:
        fail(
            f"the daemon uses your own certificate ([local] tls_cert = {local.tls_cert}); "
            "trust the CA that signed it"
        )
    try:
        _cert, _key, ca = ensure_generated(tls_dir(obj.config_path))
    except (OSError, ValueError) as exc:
        fail(f"cannot make the local CA in {tls_dir(obj.config_path)}: {exc}")
    if not install:
        click.echo(usage_text(ca))
        return
    root = home_dir(obj.env) / ".postgresql" / "root.crt"
    existed = root.exists()
    seed = None if existed else _system_ca_bundle()
    try:
        already = existed and ca.read_text().strip() in root.read_text()
        target = install_for_libpq(ca, home_dir(obj.env), system_cas=seed)
    except OSError as exc:
        fail(f"cannot add the local CA to {root}: {exc.strerror or exc}")
    if already:
        click.echo(f"the neonlocal CA ({ca}) is already in {target}")
    else:
        click.echo(f"added the neonlocal CA ({ca}) to {target}")
    if not existed:
        # libpq checks sslmode=require connections against root.crt as soon as it exists.
        if seed is not None:
            click.echo(
                f"{target} is new: it also holds the system's CAs ({seed}), so "
                "sslmode=require connections to Neon and other servers keep working"
            )
        else:
            click.echo(
                f"note: {target} is new, and libpq now checks sslmode=require connections "
                "against it; add the CAs of other servers you use to it"
            )
    click.echo("sslmode=verify-full against localhost now works without sslrootcert")
