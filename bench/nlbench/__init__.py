"""The side-by-side benchmark of issue 5: direct vs neonlocal vs pgbouncer (see bench/README.md)."""
