// Starts an aedes MQTT broker (MQTT 3.1.1, in-memory persistence) on 127.0.0.1:<port> for the
// interoperability tests (tests/interop.rs). Usage: node aedes.mjs <port> <dir holding node_modules/aedes>
// The install directory is an argument because scripts/test.sh installs aedes under target/,
// not next to this committed script. Exits on SIGTERM/SIGKILL like any broker process.
import { createServer } from 'node:net'
import { join } from 'node:path'
import { pathToFileURL } from 'node:url'

const [port, dir] = process.argv.slice(2)
if (!port || !dir) {
  console.error('usage: node aedes.mjs <port> <dir holding node_modules/aedes>')
  process.exit(2)
}
const { Aedes } = await import(pathToFileURL(join(dir, 'node_modules', 'aedes', 'aedes.js')).href)
const broker = await Aedes.createBroker()
const server = createServer(broker.handle)
server.listen(Number(port), '127.0.0.1', () => {
  console.log(`aedes listening on 127.0.0.1:${port}`)
})
for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => broker.close(() => server.close(() => process.exit(0))))
}
