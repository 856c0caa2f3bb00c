// Run one "same as direct" scenario with node-postgres and print its outcome as one JSON line.
//
//   node scenario.js '{"scenario": "pid", "client": {...pg.Client options...}, "caFile": "ca.crt"}'
//
// Each scenario prints only what a driver can observe, so the test can compare a run straight
// to the server with a run through neonlocal. An unhandled rejection or a crash prints
// {"crash": "..."} and exits 2: that is an outcome too (a driver must not crash either way).
'use strict'

const fs = require('fs')
const { Client } = require('pg')

function clientConfig(options) {
  const config = { ...options.client }
  if (options.caFile) {
    config.ssl = { ...(config.ssl || {}), ca: fs.readFileSync(options.caFile, 'utf8') }
  }
  if (config.ssl && config.ssl.checkServerIdentity === null) {
    // JSON cannot carry a function; null means verify-ca: the CA is checked, the name is not.
    config.ssl.checkServerIdentity = () => undefined
  }
  return config
}

async function connected(options) {
  const client = new Client(clientConfig(options))
  await client.connect()
  return client
}

const scenarios = {
  // The pid a driver holds is the server's: pg_backend_pid() agrees with it.
  async pid(options) {
    const client = await connected(options)
    try {
      const { rows } = await client.query('SELECT pg_backend_pid() AS pid')
      return { agrees: rows[0].pid === client.processID }
    } finally {
      await client.end()
    }
  },

  // A NOTIFY this connection sent carries this connection's own pid.
  async ownNotify(options) {
    const client = await connected(options)
    try {
      const received = new Promise((resolve) => client.on('notification', resolve))
      await client.query('LISTEN same_as_direct')
      await client.query("NOTIFY same_as_direct, 'hello'")
      const note = await received
      return { payload: note.payload, own: note.processId === client.processID }
    } finally {
      await client.end()
    }
  },

  // connect() and end() in quick succession: Terminate may go out before the startup packet.
  async connectThenEnd(options) {
    const client = new Client(clientConfig(options))
    let settled = 'never settled'
    const connecting = client.connect().then(
      () => (settled = 'connected'),
      (err) => (settled = `connect failed: ${err.code || err.message}`),
    )
    const ending = client.end().then(
      () => 'ended',
      (err) => `end failed: ${err.code || err.message}`,
    )
    // node-postgres may leave connect() pending forever once end() won; nothing then keeps
    // the process alive, so the outcome is printed when the event loop runs dry.
    const outcome = { end: await ending }
    await Promise.race([connecting, new Promise((resolve) => setTimeout(resolve, 1000))])
    return { ...outcome, connect: settled }
  },
}

async function main() {
  const options = JSON.parse(process.argv[2])
  const scenario = scenarios[options.scenario]
  if (!scenario) throw new Error(`no scenario ${options.scenario}`)
  return scenario(options)
}

process.on('unhandledRejection', (err) => {
  process.stdout.write(JSON.stringify({ crash: String(err && err.message) }) + '\n')
  process.exit(2)
})

main().then(
  (outcome) => {
    process.stdout.write(JSON.stringify(outcome) + '\n')
  },
  (err) => {
    process.stdout.write(JSON.stringify({ error: String(err.message), code: err.code || null }) + '\n')
    process.exitCode = 1
  },
)
