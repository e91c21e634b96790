// Cellar against the official @daytonaio/sdk client. Case letters follow issue 3, point 6.
import { execFile } from 'node:child_process'
import { readFileSync } from 'node:fs'
import { randomUUID } from 'node:crypto'
import { fileURLToPath } from 'node:url'
import { promisify } from 'node:util'
import { DaytonaBadRequestError, DaytonaConflictError, DaytonaError } from '@daytonaio/sdk'
import { assert, assertEqual, unique, waitUntilVolumeGone } from './lib.mjs'

const MOUNT_RULES = JSON.parse(readFileSync(new URL('../mount_rules.json', import.meta.url), 'utf8'))
const EXAMPLE = fileURLToPath(new URL('./docs_volume_example.mjs', import.meta.url))

const sorted = (text) => text.split(/\s+/).filter(Boolean).sort()

// a: the docs' TypeScript volume example, verbatim, then a check of what it left in the volume and
// the volume deletion the docs show.
async function docsExample(t) {
  const { stdout } = await t.rec.call('docs example (verbatim, node)', async () => {
    try {
      return await promisify(execFile)(process.execPath, [EXAMPLE], { timeout: 300_000, env: process.env })
    } catch (err) {
      // The example's own uncaught error, e.g. "DaytonaNotFoundError: ...", not node's banner.
      const cause = (err.stderr ?? '').split('\n').find((line) => /^\w*Error\b/.test(line)) ?? err.message
      throw new Error(`the docs example failed: ${cause}`)
    }
  })
  assert(stdout.includes('File: Hello, World!'), `example output: ${stdout.slice(-500)}`)

  const volume = await t.rec.call('volume.get', () => t.daytona.volume.get('my-volume'))
  t.cleanup.volumes.push(volume)
  const checker = await t.sandbox([{ volumeId: volume.id, mountPath: '/home/daytona/volume' }])
  await t.rec.call('fs.createFolder', () => checker.fs.createFolder('/home/daytona/volume/checked', '750'))
  const files = await t.rec.call('fs.listFiles', () => checker.fs.listFiles('/home/daytona/volume'))
  assertEqual(files.map((f) => f.name).sort(), ['checked', 'new-dir', 'new-file.txt', 'users'], 'volume root')
  assertEqual(files.filter((f) => f.isDir).map((f) => f.name).sort(), ['checked', 'new-dir', 'users'], 'directories')
  assertEqual(files.find((f) => f.name === 'new-file.txt').size, 13, 'size of new-file.txt')
  assertEqual((await t.ok(checker, 'stat -c %a /home/daytona/volume/checked')).trim(), '750', 'mode of a createFolder dir')
  assertEqual(await t.ok(checker, 'cat /home/daytona/volume/new-file.txt'), 'Hello, World!', 'new-file.txt')
  assertEqual(
    await t.ok(checker, 'cat /home/daytona/volume/users/alice/alice-file.txt'),
    "Hello from Alice's subpath!",
    'users/alice/alice-file.txt',
  )
  await t.rec.call('daytona.delete(sandbox)', () => t.daytona.delete(checker))

  const listed = await t.rec.call('volume.list', () => t.daytona.volume.list())
  assert(listed.some((v) => v.id === volume.id), 'volume.list() shows the volume')
  // Right after the sandboxes' deletion: they are being destroyed, so no 409.
  await t.rec.call('volume.delete', () => t.daytona.volume.delete(volume))
  await waitUntilVolumeGone(t.daytona, t.rec, 'my-volume')
}

// c: two sandboxes mount one volume at different paths.
async function twoSandboxesShareAVolume(t) {
  const volume = await t.volume(unique('shared'))
  const first = await t.sandbox([{ volumeId: volume.id, mountPath: '/home/daytona/one' }])
  const second = await t.sandbox([{ volumeId: volume.name, mountPath: '/mnt/two' }], 'create (volumeId = name)')

  await t.ok(first, 'echo from-first > /home/daytona/one/a.txt')
  assertEqual(await t.ok(second, 'cat /mnt/two/a.txt'), 'from-first\n', 'read in the second sandbox')
  const downloaded = await t.rec.call('fs.downloadFile', () => second.fs.downloadFile('/mnt/two/a.txt'))
  assertEqual(downloaded.toString(), 'from-first\n', 'fs.downloadFile')

  await t.rec.call('fs.uploadFile', () => second.fs.uploadFile(Buffer.from('from-second'), '/mnt/two/b.txt'))
  assertEqual(await t.ok(first, 'cat /home/daytona/one/b.txt'), 'from-second', 'upload seen by the first sandbox')

  await t.ok(first, 'mkdir /home/daytona/one/dir')
  assertEqual(sorted(await t.ok(second, 'ls /mnt/two')), ['a.txt', 'b.txt', 'dir'], 'listing in the second sandbox')

  await t.ok(second, 'echo line2 >> /mnt/two/a.txt')
  assertEqual(await t.ok(first, 'cat /home/daytona/one/a.txt'), 'from-first\nline2\n', 'append seen whole')
}

// d: one sandbox mounts two volumes.
async function oneSandboxTwoVolumes(t) {
  const one = await t.volume(unique('one'))
  const two = await t.volume(unique('two'))
  const both = await t.sandbox([
    { volumeId: one.id, mountPath: '/home/daytona/one' },
    { volumeId: two.id, mountPath: '/home/daytona/two' },
  ])
  await t.ok(both, 'echo in-one > /home/daytona/one/x.txt && echo in-two > /home/daytona/two/y.txt')
  assertEqual(sorted(await t.ok(both, 'ls /home/daytona/one')), ['x.txt'], 'first volume')
  assertEqual(sorted(await t.ok(both, 'ls /home/daytona/two')), ['y.txt'], 'second volume')

  const onlyTwo = await t.sandbox([{ volumeId: two.id, mountPath: '/data' }])
  assertEqual(sorted(await t.ok(onlyTwo, 'ls /data')), ['y.txt'], 'second volume alone')
  assertEqual(await t.ok(onlyTwo, 'cat /data/y.txt'), 'in-two\n', 'content')
}

// e: the volume outlives its sandbox.
async function volumeOutlivesSandbox(t) {
  const name = unique('persist')
  const volume = await t.volume(name)
  const writer = await t.sandbox([{ volumeId: volume.id, mountPath: '/home/daytona/volume' }])
  await t.ok(writer, 'mkdir -p /home/daytona/volume/d && seq 1 1000 > /home/daytona/volume/d/numbers.txt')
  await t.rec.call('sandbox.delete(wait)', () => writer.delete(60, true))

  const found = await t.rec.call('volume.get', () => t.daytona.volume.get(name))
  assertEqual([found.id, found.state], [volume.id, 'ready'], 'the volume after its sandbox is gone')
  const listed = await t.rec.call('volume.list', () => t.daytona.volume.list())
  assert(listed.some((v) => v.id === volume.id), 'volume.list() shows the volume')
  const reader = await t.sandbox([{ volumeId: found.id, mountPath: '/srv/data' }])
  assertEqual((await t.ok(reader, 'wc -l < /srv/data/d/numbers.txt')).trim(), '1000', 'line count')
  assertEqual(await t.ok(reader, 'tail -n 1 /srv/data/d/numbers.txt'), '1000\n', 'last line')
}

// f: deleting a volume in use -> DaytonaConflictError.
async function deleteVolumeInUseConflicts(t) {
  const name = unique('busy')
  const volume = await t.volume(name)
  const sandbox = await t.sandbox([{ volumeId: volume.id, mountPath: '/home/daytona/volume' }])
  const error = await t.rec.expectError('volume.delete (in use) -> 409', DaytonaConflictError, 409, () =>
    t.daytona.volume.delete(volume),
  )
  assert(error.message, 'the conflict error carries a message')
  const still = await t.rec.call('volume.get', () => t.daytona.volume.get(name))
  assertEqual(still.state, 'ready', 'a refused delete leaves the volume ready')
  await t.ok(sandbox, 'touch /home/daytona/volume/still-mounted')

  await t.rec.call('daytona.delete(sandbox)', () => t.daytona.delete(sandbox))
  await t.rec.call('volume.delete', () => t.daytona.volume.delete(volume))
  await waitUntilVolumeGone(t.daytona, t.rec, name)
}

// g: every mount-path rule -> DaytonaBadRequestError; look-alike paths are accepted.
async function mountRules(t) {
  const volumes = [await t.volume(unique('rules-a')), await t.volume(unique('rules-b'))]
  const failures = []
  const expectBadRequest = async (label, mounts) => {
    try {
      await t.rec.expectError(`create -> 400: ${label}`, DaytonaBadRequestError, 400, () =>
        t.daytona.create({ language: 'typescript', volumes: mounts }, { timeout: 30 }),
      )
    } catch (err) {
      if (err.result?.delete) t.cleanup.sandboxes.push(err.result)
      failures.push(err.message)
    }
  }
  for (const rule of MOUNT_RULES.single) {
    const mount = { volumeId: volumes[0].id, mountPath: rule.mountPath }
    if (rule.subpath !== undefined) mount.subpath = rule.subpath
    await expectBadRequest(rule.label, [mount])
  }
  for (const rule of MOUNT_RULES.multi) {
    await expectBadRequest(
      rule.label,
      rule.mountPaths.map((mountPath, i) => ({ volumeId: volumes[i].id, mountPath })),
    )
  }
  const lookalike = await t.sandbox(
    [
      { volumeId: volumes[0].id, mountPath: '/etcetera' },
      { volumeId: volumes[1].id, mountPath: '/home/daytona/lib', subpath: 'team.one/..bob' },
    ],
    'create (look-alike paths)',
  )
  await t.ok(lookalike, 'touch /etcetera/ok /home/daytona/lib/ok')
  await t.rec.call('daytona.delete(sandbox)', () => t.daytona.delete(lookalike))
  const siblings = await t.sandbox(
    [
      { volumeId: volumes[0].id, mountPath: '/home/daytona/a' },
      { volumeId: volumes[1].id, mountPath: '/home/daytona/ab' },
    ],
    'create (sibling paths)',
  )
  await t.ok(siblings, 'touch /home/daytona/a/ok /home/daytona/ab/ok')
  assert(failures.length === 0, `${failures.length} rule(s) not enforced: ${failures.join('; ')}`)
}

// h: a read-only mount refuses writes; a subpath cannot be escaped.
async function readOnlyMount(t) {
  const volume = await t.volume(unique('ro'))
  const writer = await t.sandbox([{ volumeId: volume.id, mountPath: '/home/daytona/rw' }])
  await t.ok(writer, 'echo original > /home/daytona/rw/data.txt && mkdir /home/daytona/rw/dir')
  // SandboxVolume has no readOnly field in the client's types, but create() sends the object as given.
  const reader = await t.sandbox(
    [{ volumeId: volume.id, mountPath: '/home/daytona/ro', readOnly: true }],
    'create (readOnly)',
  )
  assertEqual(await t.ok(reader, 'cat /home/daytona/ro/data.txt'), 'original\n', 'read through a read-only mount')
  for (const command of [
    'touch /home/daytona/ro/new',
    'echo more >> /home/daytona/ro/data.txt',
    'mkdir /home/daytona/ro/newdir',
    'rm /home/daytona/ro/data.txt',
    'mv /home/daytona/ro/data.txt /home/daytona/ro/moved.txt',
    'chmod 600 /home/daytona/ro/data.txt',
    'ln -s data.txt /home/daytona/ro/link',
    'rmdir /home/daytona/ro/dir',
  ]) {
    const { exitCode, result } = await t.sh(reader, `${command} 2>&1`)
    assert(exitCode !== 0, `${command} succeeded on a read-only mount`)
    assert(result.includes('Read-only file system'), `${command}: ${result}`)
  }
  let uploaded = true
  try {
    await reader.fs.uploadFile(Buffer.from('sneaky'), '/home/daytona/ro/uploaded.txt')
  } catch (err) {
    uploaded = !(err instanceof DaytonaError)
  }
  assert(!uploaded, 'fs.uploadFile into a read-only mount must fail')
  assertEqual(sorted(await t.ok(writer, 'ls /home/daytona/rw')), ['data.txt', 'dir'], 'volume unchanged')
  assertEqual(await t.ok(writer, 'cat /home/daytona/rw/data.txt'), 'original\n', 'file unchanged')
}

async function subpathCannotBeEscaped(t) {
  const volume = await t.volume(unique('tenants'))
  const token = `outside-subpath-${randomUUID()}`
  const admin = await t.sandbox([{ volumeId: volume.id, mountPath: '/home/daytona/all' }])
  await t.ok(
    admin,
    `cd /home/daytona/all && echo ${token} > secret.txt && mkdir -p users/alice users/bob` +
      ` && echo ${token} > users/bob/bob.txt && cd users/alice` +
      ' && ln -s / root-link && ln -s ../.. up-link && ln -s ../../secret.txt secret-link' +
      ' && ln -s /home/daytona/all/secret.txt abs-link && ln -s ../bob bob-link && echo mine > mine.txt',
  )
  // Same mount path as the admin's, so the absolute symlink is a real attempt.
  const alice = await t.sandbox(
    [{ volumeId: volume.id, mountPath: '/home/daytona/all', subpath: 'users/alice' }],
    'create (subpath)',
  )
  assertEqual(
    sorted(await t.ok(alice, 'ls -A /home/daytona/all')),
    ['abs-link', 'bob-link', 'mine.txt', 'root-link', 'secret-link', 'up-link'],
    'the subpath sandbox sees its subpath',
  )
  for (const command of [
    'cat /home/daytona/all/../all/secret.txt',
    'cat /home/daytona/all/../secret.txt',
    'cd /home/daytona/all && cd .. && cat secret.txt all/secret.txt',
    'cat /home/daytona/all/up-link/secret.txt /home/daytona/all/up-link/all/secret.txt',
    'cat /home/daytona/all/secret-link',
    'cat /home/daytona/all/abs-link',
    'cat /home/daytona/all/bob-link/bob.txt',
    'cat /home/daytona/all/root-link/home/daytona/all/secret.txt',
  ]) {
    const { result } = await t.sh(alice, `${command} 2>&1`)
    assert(!result.includes(token), `${command} reached outside the subpath: ${result.slice(0, 500)}`)
  }
  const { result } = await t.sh(
    alice,
    'timeout 90 grep -rsl --binary-files=text --exclude-dir=proc --exclude-dir=sys --exclude-dir=dev' +
      ` --exclude-dir=usr --exclude-dir=target --exclude-dir=node_modules --exclude-dir=.git ${token} /` +
      '; echo "grep-exit=$?"',
  )
  const [files, status] = result.split('grep-exit=')
  assert(status.trim() !== '124', 'grep over the sandbox file system timed out')
  assertEqual(files.trim(), '', 'files holding the token readable from the subpath sandbox')

  await t.ok(alice, 'echo from-alice > /home/daytona/all/new.txt')
  assertEqual(await t.ok(admin, 'cat /home/daytona/all/users/alice/new.txt'), 'from-alice\n', 'write lands in the subpath')
  await t.ok(admin, 'test ! -e /home/daytona/all/new.txt')
}

// i: a sandbox never sees the store's or the database's credentials.
async function noCredentialsInSandbox(t) {
  const canary = process.env.COMPAT_CANARY
  const dataDir = process.env.COMPAT_DATA_DIR
  const volume = await t.volume(unique('creds'))
  const sandbox = await t.sandbox([{ volumeId: volume.id, mountPath: '/home/daytona/volume' }])
  await t.ok(sandbox, 'echo data > /home/daytona/volume/f.txt')
  const cmdlines = "for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f; echo; done"
  const probes = {
    env: 'env',
    'environ of every process': "for f in /proc/[0-9]*/environ; do tr '\\0' '\\n' < $f; done",
    '/proc/mounts': 'cat /proc/mounts',
    mountinfo: 'cat /proc/self/mountinfo',
    'ps aux': `ps auxww || (${cmdlines})`,
    'cmdline of every process': cmdlines,
  }
  for (const [label, command] of Object.entries(probes)) {
    const { result } = await t.sh(sandbox, `${command} 2>&1`)
    assert(result.trim() !== '', `${label}: no output at all, the probe did not run`)
    assert(!result.includes(canary), `${label} shows a credential: ${result.slice(0, 800)}`)
    assert(!result.includes('AWS_SECRET_ACCESS_KEY'), `${label} shows AWS_SECRET_ACCESS_KEY`)
  }
  const listing = await t.sh(sandbox, `ls -la ${dataDir} 2>&1`)
  assert(listing.exitCode !== 0, `the server's data directory is visible: ${listing.result.slice(0, 500)}`)
  // No cellar server/runner process is visible in the sandbox's PID namespace (argv[0] of each).
  const programs = await t.ok(sandbox, "for f in /proc/[0-9]*/cmdline; do head -z -n 1 $f | tr -d '\\0'; echo; done; true")
  const cellars = programs.split(/\s+/).filter((p) => p === 'cellar' || p.endsWith('/cellar'))
  assert(cellars.length === 0, `a cellar process is visible in the sandbox: ${programs}`)
}

export const CASES = [
  { id: 'a', name: 'docs example (verbatim)', run: docsExample },
  { id: 'c', name: 'two sandboxes share a volume', run: twoSandboxesShareAVolume },
  { id: 'd', name: 'one sandbox, two volumes', run: oneSandboxTwoVolumes },
  { id: 'e', name: 'volume outlives its sandbox', run: volumeOutlivesSandbox },
  { id: 'f', name: 'delete volume in use -> 409', run: deleteVolumeInUseConflicts },
  { id: 'g', name: 'mount-path rules -> 400', run: mountRules },
  { id: 'h', name: 'read-only mount', run: readOnlyMount },
  { id: 'h', name: 'subpath cannot be escaped', run: subpathCannotBeEscaped },
  { id: 'i', name: 'no credentials in the sandbox', run: noCredentialsInSandbox },
]
