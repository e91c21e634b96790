//! Concurrency through the vfs: several mounts of one volume (each `Vfs::open_volume` on the same
//! sqlite:// metadata file and file:// store is a mount with its own session), threads racing on
//! one file or one directory, and a stress run with a watchdog that turns a deadlock into a
//! clear failure instead of a hung test.
//!
//! Tunables (environment): CELLAR_RACE_SECS (default 3) bounds each race test,
//! CELLAR_LOST_UPDATE_ITERS (default 300), CELLAR_STRESS_SECS (default 20),
//! CELLAR_STRESS_THREADS (default 8), CELLAR_STRESS_HANG_SECS (default 30),
//! CELLAR_STRESS_SEED (random if unset; printed).

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use cellar_vfs::{Errno, Ino, LockKind, LockRange, RenameMode, SetAttrRequest, Vfs, ROOT_INO};
use common::*;
use rand::{RngExt, SeedableRng};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

fn errno_name(e: Errno) -> String {
    let name = match e.0 {
        libc::ENOENT => "ENOENT",
        libc::EEXIST => "EEXIST",
        libc::EIO => "EIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ESTALE => "ESTALE",
        libc::EINVAL => "EINVAL",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::EISDIR => "EISDIR",
        libc::ENOTDIR => "ENOTDIR",
        libc::EINTR => "EINTR",
        libc::EDEADLK => "EDEADLK",
        _ => "",
    };
    format!("{name}({})", e.0)
}

fn truncate_via(vfs: &Vfs, ino: Ino, fh: Option<u64>, size: u64) -> Result<(), Errno> {
    vfs.setattr(
        &root(),
        ino,
        SetAttrRequest {
            size: Some(size),
            fh,
            ..Default::default()
        },
    )
    .map(drop)
}

/// Describes where `data` differs from `expected_byte` (None when it does not).
fn bad_bytes(data: &[u8], expected_byte: u8) -> Option<String> {
    let first = data.iter().position(|b| *b != expected_byte)?;
    let count = data.iter().filter(|b| **b != expected_byte).count();
    let last = data.iter().rposition(|b| *b != expected_byte).unwrap();
    Some(format!(
        "{count} of {} bytes are not {expected_byte:#04x}: first at offset {first} ({:#04x}), \
         last at {last} ({:#04x})",
        data.len(),
        data[first],
        data[last]
    ))
}

// ---------------------------------------------------------------------------------------------
// 1. Lost update between mounts on an inline file.

/// The tag a writer puts in its range at iteration `i` (never 0, so "never written" shows).
fn tag(i: u64) -> u8 {
    (i % 250 + 1) as u8
}

#[test]
fn disjoint_writes_from_two_mounts_to_one_inline_file_are_not_lost() {
    const FILE_SIZE: u64 = 8 << 10;
    const HALF: u64 = FILE_SIZE / 2;
    let iterations = env_u64("CELLAR_LOST_UPDATE_ITERS", 300);
    let volume = TestVolume::new();
    let a = volume.mount();
    let b = volume.mount();
    let (ino, fh) = create_in_root(&a, "shared");
    write_all(&a, ino, fh, 0, &vec![0u8; FILE_SIZE as usize]);
    close(&a, ino, fh);

    let barrier = Arc::new(Barrier::new(2));
    let writers: Vec<_> = [(a.clone(), "A", 0), (b.clone(), "B", HALF)]
        .into_iter()
        .map(|(vfs, label, start)| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                // Lost updates seen while running: this writer's own range, read back right
                // after its close, no longer holds what it just wrote.
                let mut overwritten = Vec::new();
                for i in 1..=iterations {
                    let fh = vfs.open(&root(), ino, libc::O_RDWR).unwrap().fh;
                    write_all(&vfs, ino, fh, start, &vec![tag(i); HALF as usize]);
                    vfs.flush(ino, fh, 7).unwrap();
                    vfs.release(ino, fh, None).unwrap();
                    let fh = vfs.open(&root(), ino, libc::O_RDONLY).unwrap().fh;
                    let back = read_range(&vfs, ino, fh, start, HALF);
                    vfs.release(ino, fh, None).unwrap();
                    if back != vec![tag(i); HALF as usize] && overwritten.len() < 5 {
                        overwritten.push(format!(
                            "iteration {i}: wrote {:#04x}, read back: {}",
                            tag(i),
                            bad_bytes(&back, tag(i)).unwrap_or_else(|| "short read".into())
                        ));
                    }
                }
                (label, start, overwritten)
            })
        })
        .collect();
    let results: Vec<_> = writers.into_iter().map(|w| w.join().unwrap()).collect();

    // A third mount, opened after both writers closed, sees the committed state.
    let c = volume.mount();
    let fh = c.open(&root(), ino, libc::O_RDONLY).unwrap().fh;
    let content = read_range(&c, ino, fh, 0, FILE_SIZE + 1);
    c.release(ino, fh, None).unwrap();
    let mut problems = Vec::new();
    if content.len() as u64 != FILE_SIZE {
        problems.push(format!("size is {}, not {FILE_SIZE}", content.len()));
    }
    for (label, start, overwritten) in &results {
        let end = (start + HALF).min(content.len() as u64);
        let range = &content[(*start).min(end) as usize..end as usize];
        if let Some(bad) = bad_bytes(range, tag(iterations)) {
            problems.push(format!(
                "mount {label}'s range [{start}, {}) lost its last write (tag {:#04x}): {bad}",
                start + HALF,
                tag(iterations)
            ));
        }
        if !overwritten.is_empty() {
            problems.push(format!(
                "mount {label} saw its own range overwritten by the other mount's close: {}",
                overwritten.join("; ")
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "lost update between two mounts of one inline file ({iterations} iterations each):\n  {}",
        problems.join("\n  ")
    );
    for vfs in [a, b, c] {
        vfs.shutdown().unwrap();
    }
    volume.assert_fsck_clean();
}

// ---------------------------------------------------------------------------------------------
// 2. Truncate racing reads: a file that never held zeros must never read as zeros.

fn truncate_racing_reads(file_size: usize) {
    let secs = env_u64("CELLAR_RACE_SECS", 3);
    let volume = TestVolume::new();
    let a = volume.mount();
    let b = volume.mount();
    let content = vec![0xABu8; file_size];
    let (ino, fh) = create_in_root(&a, "racy");
    write_all(&a, ino, fh, 0, &content);
    close(&a, ino, fh);

    let stop = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let readers: Vec<_> = [
        (a.clone(), "the writer's mount"),
        (b.clone(), "the other mount"),
    ]
    .into_iter()
    .map(|(vfs, label)| {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let fh = vfs.open(&root(), ino, libc::O_RDONLY).unwrap().fh;
            let (mut reads, mut empty, mut full) = (0u64, 0u64, 0u64);
            let mut failure = None;
            while !stop.load(Ordering::SeqCst) && failure.is_none() {
                match vfs.read(ino, fh, 0, file_size as u32 + 4096) {
                    Ok(data) => {
                        reads += 1;
                        if data.is_empty() {
                            empty += 1;
                        } else if data.len() == file_size {
                            full += 1;
                        }
                        if let Some(bad) = bad_bytes(&data, 0xAB) {
                            failure = Some(format!(
                                "{label}: read {reads} returned {} bytes, {bad}",
                                data.len()
                            ));
                        }
                    }
                    Err(e) => failure = Some(format!("{label}: read failed: {e:?}")),
                }
            }
            vfs.release(ino, fh, None).unwrap();
            (label, reads, empty, full, failure)
        })
    })
    .collect();

    let fh = a.open(&root(), ino, libc::O_RDWR).unwrap().fh;
    let mut rounds = 0u64;
    while Instant::now() < deadline && !readers.iter().all(|r| r.is_finished()) {
        truncate_via(&a, ino, Some(fh), 0).unwrap();
        write_all(&a, ino, fh, 0, &content);
        a.flush(ino, fh, 7).unwrap();
        rounds += 1;
    }
    a.release(ino, fh, None).unwrap();
    stop.store(true, Ordering::SeqCst);
    let mut failures = Vec::new();
    for reader in readers {
        let (label, reads, empty, full, failure) = reader.join().unwrap();
        eprintln!("{label}: {reads} reads ({empty} empty, {full} whole) over {rounds} rewrites");
        failures.extend(failure);
    }
    assert!(
        failures.is_empty(),
        "reads racing truncate(0) + rewrite of a {file_size}-byte file of 0xAB returned bytes that \
         file never held ({rounds} rewrites):\n  {}",
        failures.join("\n  ")
    );
    a.shutdown().unwrap();
    b.shutdown().unwrap();
    volume.assert_fsck_clean();
}

#[test]
fn reads_racing_truncate_and_rewrite_of_an_inline_file_never_see_zeros() {
    truncate_racing_reads(8 << 10);
}

#[test]
fn reads_racing_truncate_and_rewrite_of_a_chunked_file_never_see_zeros() {
    truncate_racing_reads(256 << 10);
}

// ---------------------------------------------------------------------------------------------
// 3. Stress with a watchdog.

const SHARED_NAMES: [&str; 5] = ["n0", "n1", "n2", "n3", "n4"];
/// Errors a namespace operation may meet when other threads race it on the same names.
const RACE_ERRNOS: [i32; 2] = [libc::ENOENT, libc::EEXIST];
/// A lingering handle is written right after it opens, then left open and unflushed this long,
/// so the idle flusher (5 s idle) commits it before the handle closes.
const LINGER: Duration = Duration::from_millis(6500);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    Create,
    Open,
    Write,
    Read,
    Flush,
    Fsync,
    Release,
    Truncate,
    Getattr,
    Unlink,
    Rename,
    Link,
    Readdir,
    Linger,
}

const OPS: [Op; 14] = [
    Op::Create,
    Op::Open,
    Op::Write,
    Op::Read,
    Op::Flush,
    Op::Fsync,
    Op::Release,
    Op::Truncate,
    Op::Getattr,
    Op::Unlink,
    Op::Rename,
    Op::Link,
    Op::Readdir,
    Op::Linger,
];

impl Op {
    /// Operations on names, which other workers race; the rest work on an open handle.
    fn is_namespace(self) -> bool {
        matches!(
            self,
            Op::Create | Op::Open | Op::Unlink | Op::Rename | Op::Link | Op::Linger
        )
    }
}

struct Stress {
    progress: AtomicU64,
    done: AtomicBool,
    /// What each worker is doing and since when (printed by the watchdog).
    states: Vec<Mutex<(String, Instant)>>,
    ok: Vec<AtomicU64>,
    raced: Vec<AtomicU64>,
    /// Failures by kind ("Fsync ENOENT(2)"): how many, and the first few in full.
    failures: Mutex<BTreeMap<String, (u64, Vec<String>)>>,
    failure_count: AtomicU64,
    /// Lingering handles closed after LINGER, and how many of their writes the other mount
    /// already saw committed (by the idle flusher) before the close.
    lingered: AtomicU64,
    flushed_by_flusher: AtomicU64,
}

impl Stress {
    fn enter(&self, worker: usize, what: String) {
        *self.states[worker].lock().unwrap() = (what, Instant::now());
    }

    fn fail(&self, kind: String, message: String) {
        self.failure_count.fetch_add(1, Ordering::SeqCst);
        let mut failures = self.failures.lock().unwrap();
        let entry = failures.entry(kind).or_default();
        entry.0 += 1;
        if entry.1.len() < 3 {
            entry.1.push(message);
        }
    }

    fn failure_report(&self) -> String {
        self.failures
            .lock()
            .unwrap()
            .iter()
            .map(|(kind, (count, first))| {
                format!(
                    "{kind}: {count} times, e.g.\n      {}",
                    first.join("\n      ")
                )
            })
            .collect::<Vec<_>>()
            .join("\n  ")
    }

    fn dump_states(&self) {
        for (i, state) in self.states.iter().enumerate() {
            // try_lock: a worker stuck while holding its state lock must not hang the watchdog.
            match state.try_lock() {
                Ok(s) => eprintln!(
                    "  worker {i}: {} (for {:.1} s)",
                    s.0,
                    s.1.elapsed().as_secs_f64()
                ),
                Err(_) => eprintln!("  worker {i}: (state locked)"),
            }
        }
    }
}

struct Open {
    ino: Ino,
    fh: u64,
    name: String,
    opened: Instant,
    linger: bool,
}

struct Worker {
    id: usize,
    label: &'static str,
    vfs: Arc<Vfs>,
    /// Another mount of the volume (the same one when the stress runs on one mount).
    other: Arc<Vfs>,
    dir: Ino,
    threads: usize,
    rng: rand::rngs::StdRng,
    pool: Vec<Open>,
    stress: Arc<Stress>,
}

type Step = (Op, String, Result<(), Errno>);

impl Worker {
    fn some_name(&mut self) -> String {
        if self.rng.random_range(0..10) == 0 {
            format!("l{}", self.rng.random_range(0..self.threads))
        } else {
            SHARED_NAMES[self.rng.random_range(0..SHARED_NAMES.len())].to_string()
        }
    }

    fn choose(&mut self, candidates: Vec<usize>) -> Option<usize> {
        if candidates.is_empty() {
            None
        } else {
            Some(candidates[self.rng.random_range(0..candidates.len())])
        }
    }

    /// A handle of the pool; with `writable_only`, none that lingers past its first write.
    fn pick(&mut self, writable_only: bool) -> Option<usize> {
        let candidates = (0..self.pool.len())
            .filter(|&i| {
                let h = &self.pool[i];
                !writable_only || !h.linger || h.opened.elapsed() < Duration::from_millis(200)
            })
            .collect();
        self.choose(candidates)
    }

    /// A handle that may be flushed or closed now (lingering ones only after LINGER).
    fn pick_closable(&mut self) -> Option<usize> {
        let candidates = (0..self.pool.len())
            .filter(|&i| !self.pool[i].linger || self.pool[i].opened.elapsed() >= LINGER)
            .collect();
        self.choose(candidates)
    }

    fn close_handle(&mut self, index: usize, flush_first: bool) -> Result<(), Errno> {
        let h = self.pool.swap_remove(index);
        if h.linger && h.opened.elapsed() >= LINGER {
            // The idle flusher should have committed the lingering write by now: the other
            // mount sees a size (unless another worker truncated the file meanwhile).
            self.stress.lingered.fetch_add(1, Ordering::Relaxed);
            if self.other.getattr(h.ino).is_ok_and(|attr| attr.size > 0) {
                self.stress
                    .flushed_by_flusher
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        let flushed = if flush_first {
            self.vfs.flush(h.ino, h.fh, self.id as u64 + 1)
        } else {
            Ok(())
        };
        let released = self.vfs.release(h.ino, h.fh, None);
        flushed.and(released)
    }

    /// Keeps at most 4 handles open per worker.
    fn make_room(&mut self) -> Result<(), Errno> {
        if self.pool.len() >= 4 {
            if let Some(i) = self.pick_closable() {
                return self.close_handle(i, true);
            }
        }
        Ok(())
    }

    fn push(&mut self, ino: Ino, fh: u64, name: String, linger: bool) {
        self.pool.push(Open {
            ino,
            fh,
            name,
            opened: Instant::now(),
            linger,
        });
    }

    fn small_data(&mut self) -> (u64, Vec<u8>) {
        let offset = self.rng.random_range(0..16u64 << 10);
        let len = if self.rng.random_range(0..20) == 0 {
            // Past the inline threshold: the file moves to slices in the store.
            self.rng.random_range(64usize << 10..160 << 10)
        } else {
            self.rng.random_range(1..4096)
        };
        (offset, pattern(self.rng.random_range(0..u64::MAX), len))
    }

    /// Opens (creating if needed) `name` into the pool.
    fn open_name(&mut self, name: &str, create: bool, linger: bool) -> Result<(Ino, u64), Errno> {
        let (vfs, ctx) = (self.vfs.clone(), root());
        let created = if create {
            vfs.create(&ctx, self.dir, name.as_bytes(), 0o644, 0o022, libc::O_RDWR)
                .map(|(attr, reply)| (attr.ino, reply.fh))
        } else {
            Err(Errno(libc::EEXIST))
        };
        let opened = match created {
            Err(Errno(libc::EEXIST)) if linger || !create => vfs
                .lookup(&ctx, self.dir, name.as_bytes())
                .and_then(|attr| {
                    vfs.open(&ctx, attr.ino, libc::O_RDWR)
                        .map(|reply| (attr.ino, reply.fh))
                }),
            other => other,
        }?;
        self.push(opened.0, opened.1, name.to_string(), linger);
        Ok(opened)
    }

    /// Runs one operation; returns its kind, a description and its outcome.
    fn step(&mut self) -> Step {
        let op = OPS[self.rng.random_range(0..OPS.len())];
        let vfs = self.vfs.clone();
        let ctx = root();
        match op {
            Op::Create | Op::Open => {
                let name = self.some_name();
                let what = format!("{op:?} {name}").to_lowercase();
                self.stress.enter(self.id, what.clone());
                if let Err(e) = self.make_room() {
                    return (Op::Release, format!("release before {what}"), Err(e));
                }
                (
                    op,
                    what,
                    self.open_name(&name, op == Op::Create, false).map(drop),
                )
            }
            Op::Linger => {
                // One lingering handle per worker at a time, on its own name (which other
                // workers may still open, rename over or unlink).
                if self.pool.iter().any(|h| h.linger) {
                    return self.getattr_some();
                }
                let name = format!("l{}", self.id);
                self.stress.enter(self.id, format!("linger-open {name}"));
                let (ino, fh) = match self.open_name(&name, true, true) {
                    Ok(opened) => opened,
                    Err(e) => return (op, format!("linger-open {name}"), Err(e)),
                };
                let (offset, data) = self.small_data();
                let what = format!("linger-write {name} at {offset} len {}", data.len());
                self.stress.enter(self.id, what.clone());
                match vfs.write(ino, fh, offset, &data) {
                    Ok(_) => (op, what, Ok(())),
                    // A write is a handle operation: its errors are never a race.
                    Err(e) => (Op::Write, what, Err(e)),
                }
            }
            Op::Write => {
                let Some(i) = self.pick(true) else {
                    return self.getattr_some();
                };
                let (offset, data) = self.small_data();
                let (ino, fh) = (self.pool[i].ino, self.pool[i].fh);
                let what = format!("write {} at {offset} len {}", self.pool[i].name, data.len());
                self.stress.enter(self.id, what.clone());
                (op, what, vfs.write(ino, fh, offset, &data).map(drop))
            }
            Op::Read => {
                let Some(i) = self.pick(false) else {
                    return self.getattr_some();
                };
                let (ino, fh) = (self.pool[i].ino, self.pool[i].fh);
                let what = format!("read {}", self.pool[i].name);
                self.stress.enter(self.id, what.clone());
                (op, what, vfs.read(ino, fh, 0, 256 << 10).map(drop))
            }
            Op::Flush | Op::Fsync => {
                let Some(i) = self.pick_closable() else {
                    return self.getattr_some();
                };
                let (ino, fh) = (self.pool[i].ino, self.pool[i].fh);
                let what = format!("{op:?} {}", self.pool[i].name).to_lowercase();
                self.stress.enter(self.id, what.clone());
                let result = if op == Op::Flush {
                    vfs.flush(ino, fh, self.id as u64 + 1)
                } else {
                    vfs.fsync(ino, fh, false)
                };
                (op, what, result)
            }
            Op::Release => {
                let Some(i) = self.pick_closable() else {
                    return self.getattr_some();
                };
                // Half the closes skip flush: release alone must commit the last handle's data.
                let flush_first = self.rng.random_range(0..2) == 0;
                let what = format!(
                    "{} {}",
                    if flush_first {
                        "flush+release"
                    } else {
                        "release"
                    },
                    self.pool[i].name
                );
                self.stress.enter(self.id, what.clone());
                (op, what, self.close_handle(i, flush_first))
            }
            Op::Truncate => {
                let Some(i) = self.pick(true) else {
                    return self.getattr_some();
                };
                let size = self.rng.random_range(0..20u64 << 10);
                let (ino, fh) = (self.pool[i].ino, self.pool[i].fh);
                let what = format!("truncate {} to {size}", self.pool[i].name);
                self.stress.enter(self.id, what.clone());
                (op, what, truncate_via(&vfs, ino, Some(fh), size))
            }
            Op::Getattr => self.getattr_some(),
            Op::Unlink => {
                let name = self.some_name();
                let what = format!("unlink {name}");
                self.stress.enter(self.id, what.clone());
                (op, what, vfs.unlink(&ctx, self.dir, name.as_bytes()))
            }
            Op::Rename => {
                let (from, to) = (self.some_name(), self.some_name());
                let mode = match self.rng.random_range(0..10) {
                    0 => RenameMode::NoReplace,
                    1 => RenameMode::Exchange,
                    _ => RenameMode::Replace,
                };
                let what = format!("rename {from} -> {to} ({mode:?})");
                self.stress.enter(self.id, what.clone());
                let result = vfs.rename(
                    &ctx,
                    self.dir,
                    from.as_bytes(),
                    self.dir,
                    to.as_bytes(),
                    mode,
                );
                (op, what, result)
            }
            Op::Link => {
                let (from, to) = (self.some_name(), self.some_name());
                let what = format!("link {from} -> {to}");
                self.stress.enter(self.id, what.clone());
                let result = vfs
                    .lookup(&ctx, self.dir, from.as_bytes())
                    .and_then(|attr| vfs.link(&ctx, attr.ino, self.dir, to.as_bytes()))
                    .map(drop);
                (op, what, result)
            }
            Op::Readdir => {
                let plus = self.rng.random_range(0..2) == 0;
                let what = format!("readdir (plus: {plus})");
                self.stress.enter(self.id, what.clone());
                let result = vfs.opendir(&ctx, self.dir, libc::O_RDONLY).and_then(|fh| {
                    let listed = vfs.readdir(self.dir, fh, 0, 1000, plus).map(drop);
                    listed.and(vfs.releasedir(self.dir, fh))
                });
                (op, what, result)
            }
        }
    }

    /// getattr of an inode this worker holds open (an open inode always has attributes).
    fn getattr_some(&mut self) -> Step {
        let Some(i) = self.pick(false) else {
            self.stress.enter(self.id, "getattr dir".into());
            let result = self.vfs.getattr(self.dir).map(drop);
            return (Op::Getattr, "getattr dir".into(), result);
        };
        let what = format!("getattr {} (open)", self.pool[i].name);
        self.stress.enter(self.id, what.clone());
        let result = self.vfs.getattr(self.pool[i].ino).map(drop);
        (Op::Getattr, what, result)
    }

    fn fail(&self, kind: String, what: &str, e: Errno) {
        self.stress.fail(
            format!("{kind} {}", errno_name(e)),
            format!(
                "worker {} (mount {}): {what}: {}",
                self.id,
                self.label,
                errno_name(e)
            ),
        );
    }

    fn run(mut self, deadline: Instant) {
        while Instant::now() < deadline {
            let (op, what, result) = self.step();
            let index = OPS.iter().position(|o| *o == op).unwrap();
            match result {
                Ok(()) => {
                    self.stress.ok[index].fetch_add(1, Ordering::Relaxed);
                }
                Err(e) if op.is_namespace() && RACE_ERRNOS.contains(&e.0) => {
                    self.stress.raced[index].fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => self.fail(format!("{op:?}"), &what, e),
            }
            self.stress.progress.fetch_add(1, Ordering::SeqCst);
        }
        self.stress.enter(self.id, "closing its handles".into());
        while !self.pool.is_empty() {
            let name = self.pool[0].name.clone();
            if let Err(e) = self.close_handle(0, true) {
                self.fail("final close".into(), &format!("final close of {name}"), e);
            }
            self.stress.progress.fetch_add(1, Ordering::SeqCst);
        }
        self.stress.enter(self.id, "finished".into());
    }
}

/// Dumps every thread's stack with gdb (best effort) so a hang shows where it hangs.
fn dump_stacks() {
    let pid = std::process::id().to_string();
    let out = std::process::Command::new("timeout")
        .args([
            "120",
            "gdb",
            "-p",
            &pid,
            "-batch",
            "-ex",
            "thread apply all bt",
        ])
        .output();
    match out {
        Ok(out) => eprintln!("{}", String::from_utf8_lossy(&out.stdout)),
        Err(e) => eprintln!("(no stack dump: {e})"),
    }
}

/// Aborts the process (a hung thread cannot be joined) when no operation completes for `hang`.
fn spawn_watchdog(stress: Arc<Stress>, hang: Duration) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || {
            let mut last = stress.progress.load(Ordering::SeqCst);
            let mut since = Instant::now();
            while !stress.done.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(200));
                let now = stress.progress.load(Ordering::SeqCst);
                if now != last {
                    last = now;
                    since = Instant::now();
                } else if since.elapsed() >= hang {
                    eprintln!(
                        "no progress: hang: no operation completed for {} s ({now} done so far); \
                         worker states:",
                        hang.as_secs()
                    );
                    stress.dump_states();
                    if std::env::var_os("CELLAR_STRESS_NO_GDB").is_none() {
                        dump_stacks();
                    }
                    eprintln!("no progress: hang (aborting the test process)");
                    std::process::abort();
                }
            }
        })
        .unwrap()
}

#[test]
fn stress_two_mounts_namespace_and_data_races_never_hang_or_fail() {
    let secs = env_u64("CELLAR_STRESS_SECS", 20);
    let threads = env_u64("CELLAR_STRESS_THREADS", 8).max(2) as usize;
    let mounts = env_u64("CELLAR_STRESS_MOUNTS", 2).clamp(1, 2) as usize;
    let hang = Duration::from_secs(env_u64("CELLAR_STRESS_HANG_SECS", 30));
    let seed = env_u64("CELLAR_STRESS_SEED", rand::random::<u32>() as u64);
    eprintln!(
        "stress: seed={seed} threads={threads} mounts={mounts} secs={secs} \
         (rerun with CELLAR_STRESS_SEED={seed})"
    );

    let volume = TestVolume::new();
    let a = volume.mount();
    let b = if mounts == 2 {
        volume.mount()
    } else {
        a.clone()
    };
    let dir = a
        .mkdir(&root(), ROOT_INO, b"dir", 0o755, 0o022)
        .unwrap()
        .ino;
    assert_eq!(b.lookup(&root(), ROOT_INO, b"dir").unwrap().ino, dir);

    let stress = Arc::new(Stress {
        progress: AtomicU64::new(0),
        done: AtomicBool::new(false),
        states: (0..threads)
            .map(|_| Mutex::new(("starting".into(), Instant::now())))
            .collect(),
        ok: OPS.iter().map(|_| AtomicU64::new(0)).collect(),
        raced: OPS.iter().map(|_| AtomicU64::new(0)).collect(),
        failures: Mutex::new(BTreeMap::new()),
        failure_count: AtomicU64::new(0),
        lingered: AtomicU64::new(0),
        flushed_by_flusher: AtomicU64::new(0),
    });
    let watchdog = spawn_watchdog(stress.clone(), hang);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    let workers: Vec<_> = (0..threads)
        .map(|id| {
            let (vfs, other, label) = if id % 2 == 0 || mounts == 1 {
                (a.clone(), b.clone(), "A")
            } else {
                (b.clone(), a.clone(), "B")
            };
            let worker = Worker {
                id,
                label,
                vfs,
                other,
                dir,
                threads,
                rng: rand::rngs::StdRng::seed_from_u64(seed.wrapping_mul(1000) + id as u64),
                pool: Vec::new(),
                stress: stress.clone(),
            };
            std::thread::Builder::new()
                .name(format!("stress-{id}"))
                .spawn(move || worker.run(deadline))
                .unwrap()
        })
        .collect();
    for (id, worker) in workers.into_iter().enumerate() {
        if worker.join().is_err() {
            stress.fail("panic".into(), format!("worker {id} panicked"));
        }
    }
    let ran = started.elapsed();

    // Shutdown and fsck stay under the watchdog: a flush that never returns is a hang too.
    for (label, vfs) in [("A", &a), ("B", &b)].into_iter().take(mounts) {
        stress.enter(0, format!("shutdown of mount {label}"));
        if let Err(e) = vfs.shutdown() {
            stress.fail(
                "shutdown".into(),
                format!("shutdown of mount {label}: {e:#}"),
            );
        }
        stress.progress.fetch_add(1, Ordering::SeqCst);
    }
    stress.enter(0, "fsck".into());
    let problems = cellar_vfs::maintenance::fsck(&volume.config, false, false).unwrap();
    stress.done.store(true, Ordering::SeqCst);
    watchdog.join().unwrap();

    let sum = |counters: &[AtomicU64]| -> u64 {
        counters.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    };
    let failed = stress.failure_count.load(Ordering::SeqCst);
    let total = sum(&stress.ok) + sum(&stress.raced) + failed;
    let per_op: Vec<String> = OPS
        .iter()
        .enumerate()
        .map(|(i, op)| {
            format!(
                "{op:?} {}+{}",
                stress.ok[i].load(Ordering::Relaxed),
                stress.raced[i].load(Ordering::Relaxed)
            )
        })
        .collect();
    eprintln!(
        "stress: ran {:.1} s with {threads} threads on {mounts} mount(s): {total} operations \
         ({:.0}/s; ok+raced: {}); {} of {} lingering writes were committed by the idle flusher \
         before their close; {failed} failures",
        ran.as_secs_f64(),
        total as f64 / ran.as_secs_f64(),
        per_op.join(", "),
        stress.flushed_by_flusher.load(Ordering::Relaxed),
        stress.lingered.load(Ordering::Relaxed),
    );
    assert!(
        failed == 0,
        "stress (seed {seed}): {failed} of {total} operations failed (ENOENT/EEXIST of namespace \
         races are expected; these are not):\n  {}",
        stress.failure_report()
    );
    assert!(
        problems.is_empty(),
        "stress (seed {seed}): fsck after the run: {problems:#?}"
    );
}

/// readdirplus lists a directory from one snapshot, then overlays this mount's own state of
/// the inodes it has open: one freed in between (its last link removed here while another
/// handle had it open, then that handle's last close) must not fail the whole listing with
/// ENOENT (the stress test above met it once, seed 2847644117).
#[test]
fn readdirplus_never_fails_for_an_entry_freed_while_it_lists() {
    let volume = TestVolume::new();
    let vfs = volume.mount();
    let dir = vfs
        .mkdir(&root(), ROOT_INO, b"dir", 0o755, 0o022)
        .unwrap()
        .ino;
    let secs = env_u64("CELLAR_STRESS_SECS", 3);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let listings = AtomicU64::new(0);
    std::thread::scope(|scope| {
        for t in 0..3 {
            let vfs = &vfs;
            scope.spawn(move || {
                let name = format!("f{t}");
                while Instant::now() < deadline {
                    let (attr, reply) = vfs
                        .create(&root(), dir, name.as_bytes(), 0o644, 0o022, libc::O_RDWR)
                        .unwrap();
                    vfs.unlink(&root(), dir, name.as_bytes()).unwrap();
                    // The last close of an inode unlinked here frees it at once.
                    vfs.release(attr.ino, reply.fh, None).unwrap();
                }
            });
        }
        for _ in 0..2 {
            let (vfs, listings) = (&vfs, &listings);
            scope.spawn(move || {
                while Instant::now() < deadline {
                    let fh = vfs.opendir(&root(), dir, libc::O_RDONLY).unwrap();
                    let listed = vfs.readdir(dir, fh, 0, 1000, true);
                    vfs.releasedir(dir, fh).unwrap();
                    if let Err(e) = listed {
                        panic!("readdirplus failed with {e:?} while entries came and went");
                    }
                    listings.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    assert!(listings.load(Ordering::Relaxed) > 0);
    vfs.shutdown().unwrap();
    volume.assert_fsck_clean();
}

// ---------------------------------------------------------------------------------------------
// 4. Locks across mounts.

fn write_lock(pid: u32) -> LockRange {
    LockRange {
        start: 0,
        end: u64::MAX,
        kind: LockKind::Write,
        pid,
    }
}

#[test]
fn posix_write_lock_through_one_mount_is_refused_to_another_until_released() {
    let volume = TestVolume::new();
    let a = volume.mount();
    let b = volume.mount();
    let (ino, fh) = create_in_root(&a, "locked");
    close(&a, ino, fh);
    let fa = a.open(&root(), ino, libc::O_RDWR).unwrap().fh;
    let fb = b.open(&root(), ino, libc::O_RDWR).unwrap().fh;
    // The same owner number on both mounts: owners are per session, so they still conflict.
    for owner in [11, 22] {
        a.setlk(ino, fa, 11, write_lock(100), false).unwrap();
        assert_eq!(
            b.setlk(ino, fb, owner, write_lock(200), false),
            Err(Errno(libc::EAGAIN)),
            "a write lock held through mount A must be refused to owner {owner} of mount B"
        );
        let read = LockRange {
            kind: LockKind::Read,
            ..write_lock(200)
        };
        assert_eq!(
            b.setlk(ino, fb, owner, read, false),
            Err(Errno(libc::EAGAIN)),
            "a read lock must be refused too"
        );
        let conflict = b.getlk(ino, fb, owner, write_lock(200)).unwrap();
        assert!(
            matches!(
                conflict,
                Some(LockRange {
                    kind: LockKind::Write,
                    ..
                })
            ),
            "getlk through mount B must report A's write lock, got {conflict:?}"
        );
        a.setlk(
            ino,
            fa,
            11,
            LockRange {
                kind: LockKind::Unlock,
                ..write_lock(100)
            },
            false,
        )
        .unwrap();
        b.setlk(ino, fb, owner, write_lock(200), false)
            .expect("granted once A released it");
        // And the other way round; B's close of the descriptor (flush) drops its lock.
        assert_eq!(
            a.setlk(ino, fa, 11, write_lock(100), false),
            Err(Errno(libc::EAGAIN)),
            "mount B's lock must be refused to mount A"
        );
        b.flush(ino, fb, owner).unwrap();
    }

    // A blocking request (F_SETLKW) through B waits for A's unlock, then gets the lock.
    a.setlk(ino, fa, 11, write_lock(100), false).unwrap();
    let started = Instant::now();
    let waiter = {
        let b = b.clone();
        std::thread::spawn(move || {
            let result = b.setlk(ino, fb, 33, write_lock(300), true);
            (result, started.elapsed())
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !waiter.is_finished(),
        "F_SETLKW through B returned while A held the lock"
    );
    a.flush(ino, fa, 11).unwrap(); // close(2) drops A's POSIX locks
    let deadline = Instant::now() + Duration::from_secs(20);
    while !waiter.is_finished() {
        assert!(
            Instant::now() < deadline,
            "F_SETLKW through B still waits 20 s after A released its lock"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (result, waited) = waiter.join().unwrap();
    assert!(
        result.is_ok(),
        "F_SETLKW through B after A's release: {result:?}"
    );
    assert!(waited >= Duration::from_millis(500));
    assert_eq!(
        a.setlk(ino, fa, 11, write_lock(100), false),
        Err(Errno(libc::EAGAIN))
    );
    b.release(ino, fb, Some(33)).unwrap();
    a.setlk(ino, fa, 11, write_lock(100), false)
        .expect("granted after B's last close");
    a.release(ino, fa, Some(11)).unwrap();
    a.shutdown().unwrap();
    b.shutdown().unwrap();
}

/// flock(2) reaches the vfs as a whole-file lock owned by the open file description (the kernel
/// names that owner); its last close (release naming the owner) drops it.
#[test]
fn flock_through_one_mount_is_refused_to_another_until_released() {
    const FLOCK_OWNER_A: u64 = 0xF10CA;
    const FLOCK_OWNER_B: u64 = 0xF10CB;
    let volume = TestVolume::new();
    let a = volume.mount();
    let b = volume.mount();
    let (ino, fh) = create_in_root(&a, "flocked");
    close(&a, ino, fh);
    let fa = a.open(&root(), ino, libc::O_RDWR).unwrap().fh;
    let fb = b.open(&root(), ino, libc::O_RDWR).unwrap().fh;
    a.setlk(ino, fa, FLOCK_OWNER_A, write_lock(0), false)
        .unwrap();
    assert_eq!(
        b.setlk(ino, fb, FLOCK_OWNER_B, write_lock(0), false),
        Err(Errno(libc::EAGAIN)),
        "LOCK_EX through mount A must be refused to mount B"
    );
    let shared = LockRange {
        kind: LockKind::Read,
        ..write_lock(0)
    };
    assert_eq!(
        b.setlk(ino, fb, FLOCK_OWNER_B, shared, false),
        Err(Errno(libc::EAGAIN)),
        "LOCK_SH too"
    );
    // The last close of A's handle drops its flock.
    a.release(ino, fa, Some(FLOCK_OWNER_A)).unwrap();
    b.setlk(ino, fb, FLOCK_OWNER_B, write_lock(0), false)
        .expect("granted after A's close");
    b.release(ino, fb, Some(FLOCK_OWNER_B)).unwrap();
    a.shutdown().unwrap();
    b.shutdown().unwrap();
}

// ---------------------------------------------------------------------------------------------
// 5. An inode open in one mount survives its unlink through another mount.

/// Locks are sync points: mount A's unlock commits what it wrote under the lock (no fsync), and
/// a holder on mount B that had the file open before is told to drop the kernel's copy, since
/// A's push may not have reached B yet; a grant with nothing new keeps the cache (SQLite locks
/// constantly).
#[test]
fn a_lock_grant_after_another_mounts_write_drops_the_kernel_cache() {
    let volume = TestVolume::new();
    let a = volume.mount();
    let b = volume.mount();
    let (ino, fh) = create_in_root(&a, "counter");
    write_all(&a, ino, fh, 0, b"0");
    close(&a, ino, fh);
    let fa = a.open(&root(), ino, libc::O_RDWR).unwrap().fh;
    let fb = b.open(&root(), ino, libc::O_RDWR).unwrap().fh;
    let unlock = LockRange {
        kind: LockKind::Unlock,
        ..write_lock(0)
    };
    // Once B's change feed has caught up with A's create and write (a pushed change makes B
    // forget what its kernel holds, so a grant before that drops the cache too), a grant with
    // nothing new keeps it.
    let settled_grant = || {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !b
            .setlk(ino, fb, 2, write_lock(0), false)
            .unwrap()
            .keep_cache
        {
            assert!(
                Instant::now() < deadline,
                "every grant for 20 s told B to drop its cache, with nothing changed"
            );
            b.setlk(ino, fb, 2, unlock, false).unwrap();
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    settled_grant();
    assert_eq!(
        read_range(&b, ino, fb, 0, 64),
        b"0",
        "B's read caches the layout"
    );
    b.setlk(ino, fb, 2, unlock, false).unwrap();

    a.setlk(ino, fa, 1, write_lock(0), false).unwrap();
    write_all(&a, ino, fa, 0, b"                   1\n");
    a.setlk(ino, fa, 1, unlock, false).unwrap();

    let after_write = b.setlk(ino, fb, 2, write_lock(0), false).unwrap();
    assert!(
        !after_write.keep_cache,
        "B must drop the kernel's attributes and pages: A wrote while B had the file open"
    );
    assert_eq!(b.getattr(ino).unwrap().size, 21, "B's fresh attributes");
    assert_eq!(
        read_range(&b, ino, fb, 0, 64),
        b"                   1\n",
        "B reads what A wrote under the lock"
    );
    b.setlk(ino, fb, 2, unlock, false).unwrap();
    settled_grant();
    b.release(ino, fb, Some(2)).unwrap();
    a.release(ino, fa, Some(1)).unwrap();
    a.shutdown().unwrap();
    b.shutdown().unwrap();
}

/// Close-to-open holds while the reader's mount has the file open on another descriptor too:
/// the new open drops that descriptor's cached layout, which would serve the old bytes for up
/// to a second.
#[test]
fn an_open_sees_another_mounts_close_while_an_older_descriptor_is_open() {
    let volume = TestVolume::new();
    let a = volume.mount();
    let b = volume.mount();
    let (ino, fh) = create_in_root(&a, "shared");
    write_all(&a, ino, fh, 0, b"old");
    close(&a, ino, fh);
    let older = b.open(&root(), ino, libc::O_RDONLY).unwrap().fh;
    assert_eq!(read_range(&b, ino, older, 0, 64), b"old");
    let fa = a.open(&root(), ino, libc::O_WRONLY).unwrap().fh;
    write_all(&a, ino, fa, 0, b"new!");
    close(&a, ino, fa);
    let newer = b.open(&root(), ino, libc::O_RDONLY).unwrap();
    assert!(
        !newer.keep_cache,
        "the kernel's pages are of the old content"
    );
    assert_eq!(read_range(&b, ino, newer.fh, 0, 64), b"new!");
    close(&b, ino, newer.fh);
    close(&b, ino, older);
    a.shutdown().unwrap();
    b.shutdown().unwrap();
}

#[test]
fn file_open_in_one_mount_stays_usable_after_another_mount_unlinks_it() {
    let volume = TestVolume::new();
    let a = volume.mount();
    let b = volume.mount();
    let (ino, fh) = create_in_root(&a, "doomed");
    write_all(&a, ino, fh, 0, b"still here");
    close(&a, ino, fh);
    let fb = b.open(&root(), ino, libc::O_RDWR).unwrap().fh;
    a.unlink(&root(), ROOT_INO, b"doomed").unwrap();
    assert_eq!(
        a.lookup(&root(), ROOT_INO, b"doomed").unwrap_err(),
        Errno(libc::ENOENT)
    );
    // POSIX: the open descriptor in B still reads, writes and closes without error.
    assert_eq!(
        b.read(ino, fb, 0, 100).map_err(errno_name),
        Ok(b"still here".to_vec()),
        "read through mount B after mount A unlinked the file"
    );
    assert_eq!(
        b.write(ino, fb, 10, b" and more").map_err(errno_name),
        Ok(9)
    );
    assert_eq!(b.fsync(ino, fb, false).map_err(errno_name), Ok(()));
    assert_eq!(
        b.read(ino, fb, 0, 100).map_err(errno_name),
        Ok(b"still here and more".to_vec())
    );
    assert_eq!(b.flush(ino, fb, 1).map_err(errno_name), Ok(()));
    assert_eq!(b.release(ino, fb, None).map_err(errno_name), Ok(()));
    a.shutdown().unwrap();
    b.shutdown().unwrap();
    volume.assert_fsck_clean();
}

// ---------------------------------------------------------------------------------------------
// Readers of a file that this mount keeps appending to and committing (an SQLite WAL).

/// Every getattr and read in the same mount sees at least the bytes whose write returned:
/// a commit that moves bytes from the buffer to the engine between the engine read and the
/// buffer overlay must not make the size look short (SQLite then fails with a short read).
#[test]
fn readers_never_see_a_file_shorter_than_its_acknowledged_writes() {
    const PIECE: usize = 4096;
    let secs = env_u64("CELLAR_RACE_SECS", 3);
    let volume = TestVolume::new();
    let vfs = volume.mount();
    let (ino, fh) = create_in_root(&vfs, "journal");
    // Bytes acknowledged so far: readers may never see less.
    let acknowledged = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (vfs, acknowledged, stop) = (vfs.clone(), acknowledged.clone(), stop.clone());
            std::thread::spawn(move || {
                let fh = vfs.open(&root(), ino, libc::O_RDONLY).unwrap().fh;
                let mut checks = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let floor = acknowledged.load(Ordering::SeqCst);
                    let size = vfs.getattr(ino).unwrap().size;
                    assert!(
                        size >= floor,
                        "getattr saw {size} bytes after {floor} were written"
                    );
                    let data = vfs.read(ino, fh, 0, floor as u32).unwrap();
                    assert_eq!(data.len() as u64, floor, "short read of acknowledged bytes");
                    checks += 1;
                }
                vfs.release(ino, fh, None).unwrap();
                checks
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut offset = 0u64;
    while Instant::now() < deadline && offset < (48 << 20) {
        write_all(&vfs, ino, fh, offset, &[0x5a; PIECE]);
        offset += PIECE as u64;
        acknowledged.store(offset, Ordering::SeqCst);
        vfs.fsync(ino, fh, false).unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    let checks: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
    close(&vfs, ino, fh);
    assert!(checks > 0, "the readers never ran");
}
