"""What ``neonlocal url --serverless`` prints: the driver's setup for this daemon.

Plain text only, so the CLI can print it without loading the serverless side.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import quote

# Which password the app's DATABASE_URL must carry: the config's [local] password, any at
# all (neonlocal logs in with the branch URL's), or the role's own (the URL holds none).
PasswordSource = Literal["local", "any", "own"]

_PLACEHOLDERS: dict[PasswordSource, tuple[str, str]] = {
    "local": ("LOCAL_PASSWORD", "the [local] password of the config"),
    "any": ("x", "any password: neonlocal logs in with the branch's own"),
    "own": (
        "PASSWORD",
        "the role's own password: the branch URL has none, so neonlocal logs in with yours",
    ),
}


def driver_setup(port: int, user: str, database: str, *, password: PasswordSource) -> str:
    """JavaScript lines that point ``@neondatabase/serverless`` at the daemon on ``port``."""
    placeholder, why = _PLACEHOLDERS[password]
    role, db = quote(user, safe=""), quote(database, safe="")
    url = f"postgresql://{role}:{placeholder}@localhost:{port}/{db}"
    return "\n".join(
        [
            "// @neondatabase/serverless through neonlocal: neon() over HTTP, Pool over WebSocket",
            "import { neon, neonConfig, Pool } from '@neondatabase/serverless';",
            f"neonConfig.fetchEndpoint = 'http://localhost:{port}/sql';",
            f"neonConfig.wsProxy = () => 'localhost:{port}/v2';",
            "neonConfig.useSecureWebSocket = false;",
            "// With the local CA trusted (neonlocal trust; Node.js: NODE_EXTRA_CA_CERTS),",
            f"// 'https://localhost:{port}/sql' and useSecureWebSocket = true work as well.",
            "// Node.js before 22 has no global WebSocket: npm install ws, then",
            "// import ws from 'ws'; neonConfig.webSocketConstructor = ws;",
            "const sql = neon(process.env.DATABASE_URL);",
            "const pool = new Pool({ connectionString: process.env.DATABASE_URL });",
            "// Drizzle (drizzle-orm/neon-http, drizzle-orm/neon-serverless) and Prisma",
            "// (@prisma/adapter-neon) take the same neonConfig: set it before creating them.",
            f"// DATABASE_URL={url}   ({why})",
        ]
    )
