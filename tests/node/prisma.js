// Prisma ORM on @prisma/adapter-neon for serverless.js: a client the test generated (into a
// temporary directory, from prisma/schema.prisma) on either of the driver's transports.
'use strict'

const path = require('path')
const { PrismaNeon, PrismaNeonHttp } = require('@prisma/adapter-neon')

// adapter: "neon" (a Pool of WebSocket sessions) or "neon-http" (neon() over HTTP).
function openPrisma(adapter, clientDir, url) {
  const { PrismaClient } = require(path.resolve(clientDir))
  const factory = adapter === 'neon-http'
    ? new PrismaNeonHttp(url, {})
    : new PrismaNeon({ connectionString: url })
  const prisma = new PrismaClient({ adapter: factory })
  return { prisma, end: () => prisma.$disconnect() }
}

async function runPrisma(session, action, data) {
  const { prisma } = session
  switch (action) {
    case 'create':
      return await prisma.item.create({ data })
    case 'items':
      return await prisma.item.findMany({ orderBy: { id: 'asc' } })
    case 'branch':
      return await prisma.$queryRaw`SELECT name FROM branch_info`
    default:
      throw new Error(`unknown prisma action ${action}`)
  }
}

module.exports = { openPrisma, runPrisma }
