// Runs the TypeScript compatibility cases one after another (they share one server) and records
// each outcome in $COMPAT_RESULTS/ts-cases.jsonl. Usage: node ts/run.mjs [case letters, e.g. c g]
import { Daytona } from '@daytonaio/sdk'
import { appendRecord, CaseContext } from './lib.mjs'
import { CASES } from './cases.mjs'
import { FILE_CASES } from './files.mjs'

for (const name of ['DAYTONA_API_URL', 'DAYTONA_API_KEY', 'COMPAT_RESULTS', 'COMPAT_CANARY', 'COMPAT_DATA_DIR']) {
  if (!process.env[name]) {
    console.error(`run these tests through tests/compat/run.sh; ${name} is unset`)
    process.exit(2)
  }
}

const only = process.argv.slice(2)
const daytona = new Daytona()
let failed = 0
for (const testCase of [...CASES, ...FILE_CASES].filter((c) => only.length === 0 || only.includes(c.id))) {
  const context = new CaseContext(daytona, testCase.id)
  const started = Date.now()
  let error = ''
  try {
    await testCase.run(context)
  } catch (err) {
    error = err?.stack ?? String(err)
  } finally {
    await context.cleanup.run()
  }
  const seconds = ((Date.now() - started) / 1000).toFixed(1)
  console.log(`${error ? 'FAIL' : 'ok  '} ${testCase.id} ${testCase.name} (${seconds}s)${error ? '\n     ' + error.split('\n').slice(0, 6).join('\n     ') : ''}`)
  if (error) failed++
  appendRecord('ts-cases.jsonl', { case: testCase.id, test: testCase.name, ok: !error, error: error.slice(0, 1000) })
}
// The client may keep a Socket.IO reconnect loop alive; the cases are done.
process.exit(failed ? 1 : 0)
