// Helpers for the compatibility tests with the official @daytonaio/sdk client: every client call
// goes through Recorder.call / Recorder.expectError so run.sh can print a matrix of client calls.
import { appendFileSync } from 'node:fs'
import { randomBytes } from 'node:crypto'
import { DaytonaError } from '@daytonaio/sdk'

export const CREATE_TIMEOUT = 60

const resultsDir = () => process.env.COMPAT_RESULTS

export function appendRecord(fileName, record) {
  appendFileSync(`${resultsDir()}/${fileName}`, JSON.stringify(record) + '\n')
}

export function assert(condition, message) {
  if (!condition) throw new Error(`assertion failed: ${message}`)
}

export function assertEqual(actual, expected, what) {
  const a = JSON.stringify(actual)
  const e = JSON.stringify(expected)
  if (a !== e) throw new Error(`assertion failed: ${what}: got ${a}, expected ${e}`)
}

export const unique = (stem) => `ts-${stem}-${randomBytes(4).toString('hex')}`

const describeError = (err) => `${err?.constructor?.name ?? typeof err}: ${err?.message ?? err}`

export class Recorder {
  constructor(caseId) {
    this.caseId = caseId
  }

  record(call, ok, error = '') {
    appendRecord('ts-calls.jsonl', { case: this.caseId, call, ok, error: String(error).slice(0, 500) })
  }

  async call(name, fn) {
    let result
    try {
      result = await fn()
    } catch (err) {
      this.record(name, false, describeError(err))
      throw err
    }
    this.record(name, true)
    return result
  }

  /** The call must throw `errorClass` with HTTP `status`; returns the error. */
  async expectError(name, errorClass, status, fn) {
    let result
    try {
      result = await fn()
    } catch (err) {
      if (!(err instanceof errorClass)) {
        this.record(name, false, `${describeError(err)} instead of ${errorClass.name}`)
        throw new Error(`${name}: threw ${describeError(err)} instead of ${errorClass.name}`)
      }
      if (err.statusCode !== status) {
        this.record(name, false, `statusCode ${err.statusCode}, expected ${status}: ${err.message}`)
        throw new Error(`${name}: statusCode ${err.statusCode}, expected ${status}: ${err.message}`)
      }
      this.record(name, true)
      return err
    }
    const returned = result?.id ? `${result.constructor?.name} ${result.id}` : String(result)
    this.record(name, false, `no error; returned ${returned}`)
    const unexpected = new Error(`${name}: expected ${errorClass.name} (${status}), got success: ${returned}`)
    unexpected.result = result // so the caller can clean up what was created after all
    throw unexpected
  }
}

/** After volume.delete: get(name) answers the volume in pending_delete/deleting, then 404.
 * Returns the states seen on the way. */
export async function waitUntilVolumeGone(daytona, rec, name, boundSeconds = 60) {
  const seen = []
  const deadline = Date.now() + boundSeconds * 1000
  while (Date.now() < deadline) {
    let state
    try {
      state = (await daytona.volume.get(name)).state
    } catch (err) {
      const ok = err instanceof DaytonaError && err.statusCode === 404
      rec.record('volume.get (deleted) -> 404', ok, ok ? '' : describeError(err))
      if (ok) return seen
      throw err
    }
    if (seen.at(-1) !== state) seen.push(state)
    if (!['pending_delete', 'deleting', 'deleted'].includes(state)) {
      rec.record('volume.get (deleted) -> 404', false, `state ${state} after volume.delete`)
      throw new Error(`volume ${name} is ${state} after volume.delete (states seen: ${seen})`)
    }
    await new Promise((resolve) => setTimeout(resolve, 200))
  }
  rec.record('volume.get (deleted) -> 404', false, `still there after ${boundSeconds} s, states ${seen}`)
  throw new Error(`volume ${name} still answers ${boundSeconds} s after volume.delete (states seen: ${seen})`)
}

/** Deletes what a case created even when it fails: sandboxes first, then volumes. */
export class Cleanup {
  constructor(daytona) {
    this.daytona = daytona
    this.sandboxes = []
    this.volumes = []
  }

  async run() {
    for (const sandbox of this.sandboxes) {
      try {
        await sandbox.delete(60, true)
      } catch {
        // already deleted by the case
      }
    }
    for (const volume of this.volumes) {
      for (let attempt = 0; attempt < 20; attempt++) {
        try {
          await this.daytona.volume.delete(volume)
          break
        } catch (err) {
          if (!(err instanceof DaytonaError) || err.statusCode !== 409) break
          await new Promise((resolve) => setTimeout(resolve, 500))
        }
      }
    }
  }
}

/** Context handed to each case: the client, a recorder, a cleanup registry and shortcuts. */
export class CaseContext {
  constructor(daytona, caseId) {
    this.daytona = daytona
    this.rec = new Recorder(caseId)
    this.cleanup = new Cleanup(daytona)
  }

  async volume(name) {
    const volume = await this.rec.call('volume.get(create=true)', () => this.daytona.volume.get(name, true))
    assert(volume && volume.id, 'volume.get(name, true) returned a volume')
    this.cleanup.volumes.push(volume)
    return volume
  }

  /** mounts: [{ volumeId, mountPath, subpath?, readOnly? }] */
  async sandbox(volumes, call = 'create') {
    const sandbox = await this.rec.call(call, () =>
      this.daytona.create({ language: 'typescript', volumes }, { timeout: CREATE_TIMEOUT }),
    )
    this.cleanup.sandboxes.push(sandbox)
    assertEqual(sandbox.state, 'started', 'state of the sandbox create() returned')
    return sandbox
  }

  /** Runs a shell line in the sandbox; returns { exitCode, result }. */
  async sh(sandbox, command) {
    return this.rec.call('process.executeCommand', () => sandbox.process.executeCommand(command, undefined, undefined, 120))
  }

  /** Runs a shell line that must succeed; returns its output. */
  async ok(sandbox, command) {
    const response = await this.sh(sandbox, command)
    assert(response.exitCode === 0, `${JSON.stringify(command)} exited ${response.exitCode}: ${response.result}`)
    return response.result
  }
}
