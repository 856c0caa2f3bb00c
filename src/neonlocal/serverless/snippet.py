"""What ``neonlocal url --serverless`` prints: the driver's setup for this daemon.

Plain text only, so the CLI can print it without loading the serverless side.
"""

from __future__ import annotations

from urllib.parse import quote


def driver_setup(port: int, user: str, database: str, *, local_password: bool) -> str:
    """JavaScript lines that point ``@neondatabase/serverless`` at the daemon on ``port``."""
    password = "LOCAL_PASSWORD" if local_password else "x"
    role, db = quote(user, safe=""), quote(database, safe="")
    url = f"postgresql://{role}:{password}@localhost:{port}/{db}"
    why = (
        "the [local] password of the config"
        if local_password
        else "any password: neonlocal logs in with the branch's own"
    )
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
