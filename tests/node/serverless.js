// Drive @neondatabase/serverless from a test: one JSON command per stdin line, one JSON answer
// per stdout line, so the test can switch branches between steps.
//
//   node serverless.js '{"port": 5432, "url": "postgresql://user:pw@localhost:5432/db", "secure": false}'
//
// Commands:
//   {"op": "sql", "sql": "SELECT $1", "params": [..], "opts": {arrayMode, fullResults, ...}}
//   {"op": "transaction", "queries": [{"sql", "params"}], "opts": {...}}
//   {"op": "connect", "name": "a", "kind": "client" | "pool", "url": optional}
//   {"op": "query", "name": "a", "sql": "...", "params": [..]}
//   {"op": "notifications", "name": "a"}   (LISTEN's notifications since the last ask)
//   {"op": "lastError", "name": "a"}   (an error the session had between queries)
//   {"op": "end", "name": "a"}
//   {"op": "drizzle", "driver": "neon-http" | "neon-serverless", "table": "t"}
//   {"op": "prisma", "name": "a", "adapter": "neon" | "neon-http", "client": "<generated dir>"}
//   {"op": "prismaRun", "name": "a", "action": "create" | "items" | "branch", "data": {..}}
// Answers: {"result": ...} or {"error": {"message", "code", ...}}.
'use strict'

const readline = require('readline')
const ws = require('ws')
const { neon, neonConfig, Pool, Client } = require('@neondatabase/serverless')

// Loaded by the first Prisma command, so the others work where Prisma is not installed.
const prisma = () => require('./prisma')

const ERROR_FIELDS = ['message', 'code', 'detail', 'hint', 'position', 'severity', 'where',
  'table', 'column', 'schema', 'dataType', 'constraint', 'routine', 'name']

function setup(port, secure) {
  // secure: https and wss with the daemon's local certificate (NODE_EXTRA_CA_CERTS trusts it)
  neonConfig.webSocketConstructor = ws
  neonConfig.fetchEndpoint = `${secure ? 'https' : 'http'}://localhost:${port}/sql`
  neonConfig.wsProxy = () => `localhost:${port}/v2`
  neonConfig.useSecureWebSocket = Boolean(secure)
  neonConfig.pipelineConnect = 'password'
}

function plain(value) {
  // BigInt and Buffer survive as text; Date as ISO text (JSON.stringify's own choice).
  return JSON.parse(JSON.stringify(value, (_k, v) => {
    if (typeof v === 'bigint') return v.toString()
    if (v && v.type === 'Buffer' && Array.isArray(v.data)) return { bytea: Buffer.from(v.data).toString('hex') }
    return v
  }))
}

function describeError(err) {
  const out = {}
  for (const key of ERROR_FIELDS) if (err[key] !== undefined) out[key] = err[key]
  return out
}

async function main() {
  const options = JSON.parse(process.argv[2])
  setup(options.port, options.secure)
  const sql = neon(options.url)
  const sessions = {}
  const lines = readline.createInterface({ input: process.stdin })
  for await (const line of lines) {
    if (!line.trim()) continue
    const command = JSON.parse(line)
    let answer
    try {
      answer = { result: plain(await run(command, sql, sessions, options)) }
    } catch (err) {
      answer = { error: describeError(err) }
    }
    process.stdout.write(JSON.stringify(answer) + '\n')
  }
  // A session the server ended may never finish end(): do not wait for it long.
  const ending = Object.values(sessions).map((session) => session.end().catch(() => {}))
  await Promise.race([Promise.all(ending), new Promise((resolve) => setTimeout(resolve, 1000))])
  process.exit()
}

async function run(command, sql, sessions, options) {
  switch (command.op) {
    case 'sql': {
      const result = await sql.query(command.sql, command.params || [], command.opts)
      if (result && result._parsers) {
        const { _parsers, _types, ...rest } = result
        return rest
      }
      return result
    }
    case 'transaction': {
      const queries = command.queries.map((q) => sql.query(q.sql, q.params || []))
      return await sql.transaction(queries, command.opts)
    }
    case 'connect': {
      const url = command.url || options.url
      const session = command.kind === 'pool'
        ? new Pool({ connectionString: url, max: 2 })
        : new Client(url)
      if (command.kind !== 'pool') await session.connect()
      // The first error between queries (the server ended the session) is kept for "lastError".
      session.on('error', (err) => { session.lastError = session.lastError || describeError(err) })
      session.notes = []
      session.on('notification', (note) => session.notes.push({ channel: note.channel, payload: note.payload }))
      sessions[command.name] = session
      return null
    }
    case 'query': {
      const result = await sessions[command.name].query(command.sql, command.params || [])
      return { rows: result.rows, command: result.command, rowCount: result.rowCount }
    }
    case 'notifications':
      return sessions[command.name].notes.splice(0)
    case 'lastError':
      return sessions[command.name].lastError || null
    case 'end': {
      const session = sessions[command.name]
      delete sessions[command.name]
      await session.end()
      return null
    }
    case 'drizzle':
      return await drizzleRoundTrip(command.driver, command.table, options.url)
    case 'prisma':
      sessions[command.name] = prisma().openPrisma(command.adapter, command.client, options.url)
      return null
    case 'prismaRun':
      return await prisma().runPrisma(sessions[command.name], command.action, command.data)
    default:
      throw new Error(`unknown op ${command.op}`)
  }
}

// Drizzle on either of the driver's transports: an insert, then a select of what it wrote.
async function drizzleRoundTrip(driver, table, url) {
  const { pgTable, integer, text } = require('drizzle-orm/pg-core')
  const items = pgTable(table, { id: integer('id'), name: text('name') })
  let db
  let pool
  if (driver === 'neon-http') {
    db = require('drizzle-orm/neon-http').drizzle(neon(url))
  } else {
    pool = new Pool({ connectionString: url })
    db = require('drizzle-orm/neon-serverless').drizzle(pool)
  }
  try {
    const inserted = await db.insert(items).values({ id: 1, name: driver }).returning()
    const selected = await db.select().from(items)
    return { inserted, selected }
  } finally {
    if (pool) await pool.end()
  }
}

main().catch((err) => {
  process.stdout.write(JSON.stringify({ error: describeError(err) }) + '\n')
  process.exitCode = 1
})
