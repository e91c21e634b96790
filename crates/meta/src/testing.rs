//! Support for test suites that run against every engine (this crate's, the vfs's): a fresh
//! metadata URL per test, PostgreSQL included.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The engines a suite runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

/// A PostgreSQL database for tests: `CELLAR_TEST_POSTGRES_URL`, or else a throw-away server this
/// process starts once with `tests/harness/postgres.sh` (stopped when the process exits).
/// Panics if neither works: a suite must not silently skip PostgreSQL.
pub fn postgres_url() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        if let Ok(url) = std::env::var("CELLAR_TEST_POSTGRES_URL") {
            return url;
        }
        let dir = std::env::temp_dir().join(format!("cellar-test-pg-{}", std::process::id()));
        let status = std::process::Command::new("bash")
            .arg(harness())
            .arg("start")
            .arg(&dir)
            .status()
            .expect("running tests/harness/postgres.sh");
        assert!(status.success(), "tests/harness/postgres.sh start failed");
        STARTED.set(dir.clone()).expect("started once");
        // SAFETY: registers a plain function with no captured state.
        unsafe { libc::atexit(stop_postgres) };
        let env = std::fs::read_to_string(dir.join("env")).expect("reading the harness's env");
        env.lines()
            .find_map(|line| line.strip_prefix("CELLAR_TEST_POSTGRES_URL="))
            .expect("CELLAR_TEST_POSTGRES_URL in the harness's env")
            .to_string()
    })
    .clone()
}

static STARTED: OnceLock<PathBuf> = OnceLock::new();

fn harness() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/harness/postgres.sh")
}

extern "C" fn stop_postgres() {
    if let Some(dir) = STARTED.get() {
        let _ = std::process::Command::new("bash")
            .arg(harness())
            .arg("stop")
            .arg(dir)
            .status();
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// A metadata URL no other test uses: a file in `dir`, or a volume of its own in the test
/// database (so tests run in parallel).
pub fn fresh_meta_url(engine: Engine, dir: &Path) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    match engine {
        Engine::Sqlite => format!("sqlite://{}", dir.join("meta.db").display()),
        Engine::Postgres => {
            let n = NEXT.fetch_add(1, Ordering::SeqCst);
            let tag: u32 = rand::random();
            let base = postgres_url();
            let sep = if base.contains('?') { '&' } else { '?' };
            format!("{base}{sep}volume=t{}_{n}_{tag:08x}", std::process::id())
        }
    }
}
