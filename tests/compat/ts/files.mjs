// The sandbox file calls of the official @daytonaio/sdk client (issue 9, point 5): case j, every
// `fs` call on a volume and in the home with real results; case k, a large file streamed in with
// uploadFile/uploadFileStream and out with downloadFile/downloadFileStream, checksums equal, the
// server's memory bounded.
import { createHash, randomBytes } from 'node:crypto'
import { createReadStream, mkdtempSync, readFileSync, rmSync, statSync, writeSync, openSync, closeSync } from 'node:fs'
import {
  DaytonaBadRequestError,
  DaytonaConflictError,
  DaytonaFileAccessDeniedError,
  DaytonaFileNotFoundError,
} from '@daytonaio/sdk'
import { assert, assertEqual, unique } from './lib.mjs'

// A name the shell would expand if a path ever reached it unquoted.
const ODD = "odd $(touch pwned) `touch pwned` 'q' name.txt"

async function fileCalls(t) {
  const volume = await t.volume(unique('files'))
  const sandbox = await t.sandbox([{ volumeId: volume.id, mountPath: '/home/daytona/vol' }])
  const fs = sandbox.fs
  const base = '/home/daytona/vol/tree'
  const upload = (text, path) => t.rec.call('fs.uploadFile', () => fs.uploadFile(Buffer.from(text), path))
  await upload('hello world\nsecond hello\n', `${base}/a.txt`)
  await upload("print('hello')\n", `${base}/src/b.py`)
  await upload('nothing here\n', `${base}/src/deep/c.txt`)
  await upload('\0binary hello\n', `${base}/blob.bin`)
  // A relative path is relative to the home.
  await upload('hello odd\n', `vol/tree/${ODD}`)

  // getFileDetails: the fields, against stat(1) in the sandbox.
  const info = await t.rec.call('fs.getFileDetails', () => fs.getFileDetails(`${base}/a.txt`))
  assertEqual([info.name, info.isDir, info.size], ['a.txt', false, 25], 'name, isDir, size')
  assertEqual(info.permissions, '0' + (await t.ok(sandbox, `stat -c %a ${base}/a.txt`)).trim(), 'permissions')
  assertEqual(info.mode, (await t.ok(sandbox, `stat -c %A ${base}/a.txt`)).trim(), 'mode')
  assertEqual([info.owner, info.group], ['daytona', 'daytona'], 'owner and group')
  assert(info.modTime && info.modifiedAt, `times in ${JSON.stringify(info)}`)
  const dir = await t.rec.call('fs.getFileDetails', () => fs.getFileDetails('vol/tree/src'))
  assertEqual([dir.name, dir.isDir], ['src', true], 'a directory')
  await t.rec.expectError('fs.getFileDetails (missing) -> 404', DaytonaFileNotFoundError, 404, () =>
    fs.getFileDetails(`${base}/absent`),
  )

  // findFiles: lines that contain the text; the binary file is skipped.
  const matches = await t.rec.call('fs.findFiles', () => fs.findFiles(base, 'hello'))
  assertEqual(
    matches.map((m) => [m.file, m.line, m.content]).sort(),
    [
      [`${base}/a.txt`, 1, 'hello world'],
      [`${base}/a.txt`, 2, 'second hello'],
      [`${base}/${ODD}`, 1, 'hello odd'],
      [`${base}/src/b.py`, 1, "print('hello')"],
    ],
    'findFiles matches',
  )
  assertEqual(await t.rec.call('fs.findFiles', () => fs.findFiles(base, 'no such text')), [], 'no match')
  await t.rec.expectError('fs.findFiles (missing) -> 404', DaytonaFileNotFoundError, 404, () =>
    fs.findFiles(`${base}/x`, 'a'),
  )

  // searchFiles: names at any depth, or paths relative to the searched directory.
  const txt = await t.rec.call('fs.searchFiles', () => fs.searchFiles(base, '*.txt'))
  assertEqual(txt.files.sort(), [`${base}/a.txt`, `${base}/${ODD}`, `${base}/src/deep/c.txt`], '*.txt')
  const nested = await t.rec.call('fs.searchFiles', () => fs.searchFiles(base, 'src/**/*.{py,txt}'))
  assertEqual(nested.files.sort(), [`${base}/src/b.py`, `${base}/src/deep/c.txt`], 'src/**/*.{py,txt}')
  assertEqual((await t.rec.call('fs.searchFiles', () => fs.searchFiles(base, '*.rs'))).files, [], '*.rs')

  // replaceInFiles: per-file results; the text really changed, a missing file is reported.
  const results = await t.rec.call('fs.replaceInFiles', () =>
    fs.replaceInFiles([`${base}/a.txt`, `${base}/src/b.py`, `${base}/gone`], 'hello', 'bye'),
  )
  assertEqual(
    results.map((r) => [r.file, r.success]),
    [
      [`${base}/a.txt`, true],
      [`${base}/src/b.py`, true],
      [`${base}/gone`, false],
    ],
    'replace results',
  )
  assert(results[2].error, 'the missing file has an error')
  assertEqual(await t.ok(sandbox, `cat ${base}/a.txt`), 'bye world\nsecond bye\n', 'a.txt replaced')
  assertEqual(await t.ok(sandbox, `cat ${base}/src/b.py`), "print('bye')\n", 'b.py replaced')

  // setFilePermissions: the mode bits as stat(1) sees them; chown to root is refused.
  await t.rec.call('fs.setFilePermissions', () => fs.setFilePermissions(`${base}/a.txt`, { mode: '640' }))
  assertEqual((await t.ok(sandbox, `stat -c %a ${base}/a.txt`)).trim(), '640', 'mode 640')
  await t.rec.call('fs.setFilePermissions', () => fs.setFilePermissions(`vol/tree/${ODD}`, { mode: '0700' }))
  assertEqual((await t.ok(sandbox, `stat -c %a ${base}/odd*`)).trim(), '700', 'mode 700 of the odd name')
  await t.rec.call('fs.setFilePermissions', () =>
    fs.setFilePermissions(`${base}/a.txt`, { owner: 'daytona', group: 'daytona' }),
  )
  await t.rec.expectError('fs.setFilePermissions (owner root) -> 403', DaytonaFileAccessDeniedError, 403, () =>
    fs.setFilePermissions(`${base}/a.txt`, { owner: 'root' }),
  )
  await t.rec.expectError('fs.setFilePermissions (missing) -> 404', DaytonaFileNotFoundError, 404, () =>
    fs.setFilePermissions(`${base}/absent`, { mode: '644' }),
  )

  // moveFiles: renamed, the source is gone; an existing destination is a conflict.
  await t.rec.call('fs.moveFiles', () => fs.moveFiles(`${base}/a.txt`, `${base}/src/moved.txt`))
  assertEqual((await t.sh(sandbox, `test -e ${base}/a.txt`)).exitCode, 1, 'the source is gone')
  assertEqual(await t.ok(sandbox, `cat ${base}/src/moved.txt`), 'bye world\nsecond bye\n', 'moved content')
  await t.rec.expectError('fs.moveFiles (destination exists) -> 409', DaytonaConflictError, 409, () =>
    fs.moveFiles(`${base}/src/moved.txt`, `${base}/src/b.py`),
  )
  await t.rec.expectError('fs.moveFiles (missing) -> 404', DaytonaFileNotFoundError, 404, () =>
    fs.moveFiles(`${base}/absent`, `${base}/x`),
  )
  // Into the home, off the volume: a move across file systems.
  await t.rec.call('fs.moveFiles', () => fs.moveFiles(`${base}/src/deep`, '/home/daytona/deep'))
  assertEqual(await t.ok(sandbox, 'cat /home/daytona/deep/c.txt'), 'nothing here\n', 'moved across file systems')

  // deleteFile: a file; a directory only with recursive.
  await t.rec.call('fs.deleteFile', () => fs.deleteFile(`vol/tree/${ODD}`))
  assertEqual((await t.sh(sandbox, `test -e ${base}/odd*`)).exitCode, 1, 'the odd file is gone')
  await t.rec.expectError('fs.deleteFile (directory) -> 400', DaytonaBadRequestError, 400, () =>
    fs.deleteFile(`${base}/src`),
  )
  await t.rec.call('fs.deleteFile', () => fs.deleteFile(`${base}/src`, true))
  assertEqual(await t.ok(sandbox, `ls -A ${base}`), 'blob.bin\n', 'what is left')
  await t.rec.expectError('fs.deleteFile (missing) -> 404', DaytonaFileNotFoundError, 404, () =>
    fs.deleteFile(`${base}/src`),
  )
  await t.rec.expectError('fs.deleteFile (read-only system) -> 403', DaytonaFileAccessDeniedError, 403, () =>
    fs.deleteFile('/etc/hostname'),
  )

  // No path ever reached a shell unquoted.
  assertEqual(await t.ok(sandbox, 'find /home/daytona /tmp -name pwned'), '', 'no injected command ran')
}

const LARGE_MIB = Number(process.env.COMPAT_LARGE_FILE_MIB ?? 1024)
// Far below the file's size: the server streams, it does not hold the file.
const SERVER_PEAK_LIMIT_MIB = 256

function serverPeakRssMib() {
  const pid = process.env.COMPAT_SERVER_PID
  if (!pid) return undefined
  const line = readFileSync(`/proc/${pid}/status`, 'ascii')
    .split('\n')
    .find((l) => l.startsWith('VmHWM:'))
  return line ? Number(line.split(/\s+/)[1]) / 1024 : undefined
}

async function sha256File(path) {
  const hash = createHash('sha256')
  for await (const chunk of createReadStream(path)) hash.update(chunk)
  return hash.digest('hex')
}

async function largeFileStreams(t) {
  const volume = await t.volume(unique('large'))
  const sandbox = await t.sandbox([{ volumeId: volume.id, mountPath: '/home/daytona/vol' }])
  // Under /var/tmp: /tmp may be a small tmpfs.
  const scratch = mkdtempSync('/var/tmp/cellar-compat-large.')
  try {
    const local = `${scratch}/large.bin`
    const hash = createHash('sha256')
    const fd = openSync(local, 'w')
    const chunk = 8 << 20
    for (let written = 0; written < LARGE_MIB * 1048576; written += chunk) {
      const data = randomBytes(chunk)
      hash.update(data)
      writeSync(fd, data)
    }
    closeSync(fd)
    const expected = hash.digest('hex')
    const remote = '/home/daytona/vol/large.bin'

    let started = Date.now()
    await t.rec.call('fs.uploadFile (large, from a path)', () => sandbox.fs.uploadFile(local, remote, 1800))
    const uploadSeconds = (Date.now() - started) / 1000
    const remoteSum = (await t.ok(sandbox, `sha256sum ${remote}`)).split(/\s+/)[0]
    assertEqual(remoteSum, expected, 'checksum of the uploaded file')
    // The streaming variants: from a read stream, chunked, and back as a readable stream.
    const streamed = '/home/daytona/vol/streamed.bin'
    await t.rec.call('fs.uploadFileStream (large)', () =>
      sandbox.fs.uploadFileStream(createReadStream(local), streamed, { timeout: 1800 }),
    )
    const streamedSum = (await t.ok(sandbox, `sha256sum ${streamed}`)).split(/\s+/)[0]
    assertEqual(streamedSum, expected, 'checksum of the stream-uploaded file')
    rmSync(local)
    const readable = await t.rec.call('fs.downloadFileStream (large)', () =>
      sandbox.fs.downloadFileStream(streamed, { timeout: 1800 }),
    )
    const streamHash = createHash('sha256')
    let streamSize = 0
    for await (const block of readable) {
      streamHash.update(block)
      streamSize += block.length
    }
    assertEqual([streamSize, streamHash.digest('hex')], [LARGE_MIB * 1048576, expected], 'the stream-downloaded file')

    const back = `${scratch}/back.bin`
    started = Date.now()
    await t.rec.call('fs.downloadFile (large, to a path)', () => sandbox.fs.downloadFile(remote, back, 1800))
    const downloadSeconds = (Date.now() - started) / 1000
    assertEqual(statSync(back).size, LARGE_MIB * 1048576, 'size of the downloaded file')
    assertEqual(await sha256File(back), expected, 'checksum of the downloaded file')

    const peak = serverPeakRssMib()
    console.log(
      `     ${LARGE_MIB} MiB: uploadFile ${(LARGE_MIB / uploadSeconds).toFixed(0)} MiB/s, ` +
        `downloadFile ${(LARGE_MIB / downloadSeconds).toFixed(0)} MiB/s, server peak RSS ${peak} MiB`,
    )
    if (peak !== undefined) {
      assert(peak < SERVER_PEAK_LIMIT_MIB, `server peak RSS ${peak} MiB during a ${LARGE_MIB} MiB transfer`)
    }
  } finally {
    rmSync(scratch, { recursive: true, force: true })
  }
}

export const FILE_CASES = [
  { id: 'j', name: 'sandbox file calls', run: fileCalls },
  { id: 'k', name: 'large file streamed in and out', run: largeFileStreams },
]
