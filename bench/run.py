"""Side-by-side benchmark: direct vs neonlocal vs pgbouncer. See bench/README.md.

.venv/bin/python bench/run.py [--quick]
"""

from __future__ import annotations

import sys

from nlbench.main import main

if __name__ == "__main__":
    sys.exit(main())
