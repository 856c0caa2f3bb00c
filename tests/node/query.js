// Run one query with node-postgres and print the outcome as one line of JSON.
//
//   node query.js '{"client": {...pg.Client options...}, "sql": "SELECT 1", "caFile": "ca.crt"}'
//
// "caFile" is read into client.ssl.ca (node-postgres wants the PEM text, not a path).
// Prints {"rows": [...], "tls": "TLSv1.3" | null} and exits 0, or
// {"error": "...", "code": "<SQLSTATE or Node error code>"} and exits 1.
'use strict'

const fs = require('fs')
const { Client } = require('pg')

async function main() {
  const options = JSON.parse(process.argv[2])
  const config = { ...options.client }
  if (options.caFile) {
    config.ssl = { ...(config.ssl || {}), ca: fs.readFileSync(options.caFile, 'utf8') }
  }
  const client = new Client(config)
  await client.connect()
  try {
    const result = await client.query(options.sql)
    const stream = client.connection.stream
    const tls = typeof stream.getProtocol === 'function' ? stream.getProtocol() : null
    return { rows: result.rows, tls }
  } finally {
    await client.end()
  }
}

main().then(
  (outcome) => {
    process.stdout.write(JSON.stringify(outcome) + '\n')
  },
  (err) => {
    process.stdout.write(JSON.stringify({ error: String(err.message), code: err.code || null }) + '\n')
    process.exitCode = 1
  },
)
