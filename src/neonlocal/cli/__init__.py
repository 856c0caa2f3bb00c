"""The ``neonlocal`` command: one module per command group, each thin over the functions
that do the work.

- ``root``: the ``neonlocal`` group and its own commands (up, use, status, url, demo).
- ``context``: what every command shares: the config path, the environment, ``fail``.
- ``neon``: init, branches, branch (the Neon API).
- ``trust``: the local CA for ``sslmode=verify-full``.
- ``service``: install, uninstall, status, logs (the work is in ``neonlocal.service``).

Command groups are imported only when named, so ``neonlocal --help``, ``use`` and
``status`` start quickly.
"""

from neonlocal.cli.root import main

__all__ = ["main"]
