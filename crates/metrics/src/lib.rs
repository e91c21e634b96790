//! Prometheus metrics of a Cellar process (a mount daemon, the server).
//!
//! This file names every metric and writes its help text, once; docs/METRICS.md is the
//! reference table (a test keeps the two in step). The metrics live in one process-global
//! registry that the lower crates record into (`cellar-vfs`: file system requests and dirty bytes,
//! `cellar-sql`: metadata transactions, `cellar-store`: object-store requests and cache lookups)
//! and that [`encode`] writes out in the OpenMetrics text format; [`serve`] answers
//! `GET /metrics` over TCP or a unix socket. This crate depends on none of them.
//!
//! Labels take their values from the enums below only (operation names), so the number of series
//! is fixed: never a path, a volume, an organisation or anything secret.
//!
//! Recording is cheap: the series of every label value are created up front, so a recording is
//! an atomic add, or for a histogram one short uncontended mutex, plus two clock reads.

mod serve;

pub use serve::{Endpoint, MetricsServer};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;
use std::time::Instant;

/// The `Content-Type` of [`encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// An enum whose variants are the values of one label, with its name in the exposition.
macro_rules! label_values {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $label:literal,)* }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $name {
            $($variant,)*
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];

            pub fn label(self) -> &'static str {
                match self {
                    $($name::$variant => $label,)*
                }
            }
        }
    };
}

label_values! {
    /// A file system request: one public method of `cellar_vfs::Vfs` (what the FUSE layer
    /// forwards, and what the server's file API calls).
    FsOp {
        Lookup => "lookup",
        Forget => "forget",
        Getattr => "getattr",
        Setattr => "setattr",
        Readlink => "readlink",
        Mknod => "mknod",
        Mkdir => "mkdir",
        Unlink => "unlink",
        Rmdir => "rmdir",
        Symlink => "symlink",
        Rename => "rename",
        Link => "link",
        Open => "open",
        Create => "create",
        Read => "read",
        Write => "write",
        Flush => "flush",
        Release => "release",
        Fsync => "fsync",
        Fallocate => "fallocate",
        CopyFileRange => "copy_file_range",
        Lseek => "lseek",
        Opendir => "opendir",
        Readdir => "readdir",
        Releasedir => "releasedir",
        Fsyncdir => "fsyncdir",
        Statfs => "statfs",
        Setxattr => "setxattr",
        Getxattr => "getxattr",
        Listxattr => "listxattr",
        Removexattr => "removexattr",
        Getlk => "getlk",
        Setlk => "setlk",
    }
}

label_values! {
    /// A transaction of the SQL layer (metadata engines and the server's control database).
    TxKind {
        Read => "read",
        Write => "write",
    }
}

label_values! {
    /// A request to the object store.
    StoreOp {
        Get => "get",
        Put => "put",
        Delete => "delete",
        List => "list",
        Copy => "copy",
        Rename => "rename",
    }
}

label_values! {
    /// How one HTTP exchange with an S3 store ended (the client retries the last two).
    HttpOutcome {
        Success => "success",
        ClientError => "client_error",
        ServerError => "server_error",
        TransportError => "transport_error",
    }
}

label_values! {
    /// A block cache.
    Cache {
        Memory => "memory",
        Disk => "disk",
    }
}

type Label = [(&'static str, &'static str); 1];
type HistogramFamily = Family<Label, Histogram, fn() -> Histogram>;

/// Latency buckets from 10 µs to 10.5 s, ×4 apart: a cached getattr to a slow store request.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1e-5, 4.0, 11))
}

/// The series of one metric per label value, indexed by the label enum's discriminant.
struct PerLabel<M>(Vec<M>);

impl<M> PerLabel<M> {
    fn get(&self, index: usize) -> &M {
        &self.0[index]
    }
}

/// Creates a labelled family with a series for each of `values`, registers it.
fn family<M, C>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    key: &'static str,
    values: impl Iterator<Item = &'static str>,
    family: Family<Label, M, C>,
) -> PerLabel<M>
where
    M: prometheus_client::metrics::TypedMetric
        + prometheus_client::encoding::EncodeMetric
        + Clone
        + Send
        + Sync
        + std::fmt::Debug
        + 'static,
    C: prometheus_client::metrics::family::MetricConstructor<M>
        + Clone
        + Send
        + Sync
        + std::fmt::Debug
        + 'static,
    Label: EncodeLabelSet,
{
    let series = values
        .map(|value| family.get_or_create_owned(&[(key, value)]))
        .collect();
    registry.register(name, help, family);
    PerLabel(series)
}

fn histograms(
    registry: &mut Registry,
    name: &str,
    help: &str,
    key: &'static str,
    values: impl Iterator<Item = &'static str>,
) -> PerLabel<Histogram> {
    let constructor: fn() -> Histogram = latency_histogram;
    let histograms = HistogramFamily::new_with_constructor(constructor);
    family(registry, name, help, key, values, histograms)
}

fn counters(
    registry: &mut Registry,
    name: &str,
    help: &str,
    key: &'static str,
    values: impl Iterator<Item = &'static str>,
) -> PerLabel<Counter> {
    family(registry, name, help, key, values, Family::default())
}

fn counter(registry: &mut Registry, name: &str, help: &str) -> Counter {
    let counter = Counter::default();
    registry.register(name, help, counter.clone());
    counter
}

fn gauge(registry: &mut Registry, name: &str, help: &str) -> Gauge {
    let gauge = Gauge::default();
    registry.register(name, help, gauge.clone());
    gauge
}

struct Metrics {
    registry: Registry,
    fs_duration: PerLabel<Histogram>,
    fs_errors: PerLabel<Counter>,
    fs_read_bytes: Counter,
    fs_written_bytes: Counter,
    dirty_bytes: Gauge,
    tx_duration: PerLabel<Histogram>,
    tx_errors: PerLabel<Counter>,
    tx_retries: Counter,
    store_duration: PerLabel<Histogram>,
    store_errors: PerLabel<Counter>,
    store_bytes: PerLabel<Counter>,
    store_in_flight: PerLabel<Gauge>,
    slice_uploads_in_flight: Gauge,
    http_attempts: PerLabel<Counter>,
    integrity_failures: Counter,
    cache_hits: PerLabel<Counter>,
    cache_misses: PerLabel<Counter>,
}

fn labels<E: Copy>(
    all: &'static [E],
    label: fn(E) -> &'static str,
) -> impl Iterator<Item = &'static str> {
    all.iter().map(move |value| label(*value))
}

impl Metrics {
    fn new() -> Metrics {
        let mut r = Registry::with_prefix("cellar");
        let fs_ops = || labels(FsOp::ALL, FsOp::label);
        let tx_kinds = || labels(TxKind::ALL, TxKind::label);
        let store_ops = || labels(StoreOp::ALL, StoreOp::label);
        let caches = || labels(Cache::ALL, Cache::label);
        let outcomes = || labels(HttpOutcome::ALL, HttpOutcome::label);
        Metrics {
            fs_duration: histograms(
                &mut r,
                "fs_request_duration_seconds",
                "File system requests (vfs operations) by operation, and how long they took",
                "op",
                fs_ops(),
            ),
            fs_errors: counters(
                &mut r,
                "fs_request_errors",
                "File system requests that returned an error (ENOENT of a lookup included)",
                "op",
                fs_ops(),
            ),
            fs_read_bytes: counter(&mut r, "fs_read_bytes", "Bytes returned by reads"),
            fs_written_bytes: counter(&mut r, "fs_written_bytes", "Bytes accepted by writes"),
            dirty_bytes: gauge(
                &mut r,
                "vfs_dirty_bytes",
                "Written bytes buffered in memory, not yet committed",
            ),
            tx_duration: histograms(
                &mut r,
                "meta_transaction_duration_seconds",
                "Metadata transactions (SQL layer) by kind, and how long they took, retries included",
                "kind",
                tx_kinds(),
            ),
            tx_errors: counters(
                &mut r,
                "meta_transaction_errors",
                "Metadata transactions that ended in an error and were rolled back: a failed statement or commit, or the operation's own error (ENOENT, ENODATA, ...)",
                "kind",
                tx_kinds(),
            ),
            tx_retries: counter(
                &mut r,
                "meta_transaction_retries",
                "Re-runs of PostgreSQL transactions after a serialization failure, a deadlock or a lost connection",
            ),
            store_duration: histograms(
                &mut r,
                "store_request_duration_seconds",
                "Object-store requests by operation, and how long they took (get: until the response started; list: until the listing ended)",
                "op",
                store_ops(),
            ),
            store_errors: counters(
                &mut r,
                "store_request_errors",
                "Object-store requests that failed after the client's retries (a missing object included)",
                "op",
                store_ops(),
            ),
            store_bytes: counters(
                &mut r,
                "store_bytes",
                "Object bytes sent (put) and received (get)",
                "op",
                store_ops(),
            ),
            store_in_flight: family(
                &mut r,
                "store_requests_in_flight",
                "Object-store requests under way (op=\"put\": block uploads)",
                "op",
                store_ops(),
                Family::default(),
            ),
            slice_uploads_in_flight: gauge(
                &mut r,
                "store_slice_uploads_in_flight",
                "Slices (one flush of a file's buffered writes) being uploaded",
            ),
            http_attempts: counters(
                &mut r,
                "store_http_attempts",
                "HTTP exchanges with an S3 store, by outcome: every try of a request, so retries are the attempts beyond the requests",
                "outcome",
                outcomes(),
            ),
            integrity_failures: counter(
                &mut r,
                "store_integrity_failures",
                "Object-store answers that were short, corrupt (page checksum mismatch) or did not match the request, and were read again or failed the read",
            ),
            cache_hits: counters(
                &mut r,
                "cache_hits",
                "Block lookups answered by the cache",
                "cache",
                caches(),
            ),
            cache_misses: counters(
                &mut r,
                "cache_misses",
                "Block lookups the cache could not answer",
                "cache",
                caches(),
            ),
            registry: r,
        }
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The OpenMetrics text exposition of every metric of this process.
pub fn encode() -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &METRICS.registry)
        .expect("writing to a String cannot fail");
    out
}

/// Runs and records one file system request.
pub fn fs_request<T, E>(op: FsOp, request: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
    let metrics = &*METRICS;
    let start = Instant::now();
    let result = request();
    metrics
        .fs_duration
        .get(op as usize)
        .observe(start.elapsed().as_secs_f64());
    if result.is_err() {
        metrics.fs_errors.get(op as usize).inc();
    }
    result
}

pub fn fs_read_bytes(bytes: usize) {
    METRICS.fs_read_bytes.inc_by(bytes as u64);
}

pub fn fs_written_bytes(bytes: u32) {
    METRICS.fs_written_bytes.inc_by(u64::from(bytes));
}

/// Runs and records one transaction of the SQL layer (`transaction` includes its retries).
pub fn meta_transaction<T, E>(
    kind: TxKind,
    transaction: impl FnOnce() -> Result<T, E>,
) -> Result<T, E> {
    let metrics = &*METRICS;
    let start = Instant::now();
    let result = transaction();
    metrics
        .tx_duration
        .get(kind as usize)
        .observe(start.elapsed().as_secs_f64());
    if result.is_err() {
        metrics.tx_errors.get(kind as usize).inc();
    }
    result
}

/// A transaction is run again (PostgreSQL).
pub fn meta_retry() {
    METRICS.tx_retries.inc();
}

/// One HTTP exchange with an S3 store ended.
pub fn store_http_attempt(outcome: HttpOutcome) {
    METRICS.http_attempts.get(outcome as usize).inc();
}

/// An object-store answer failed its integrity check.
pub fn store_integrity_failure() {
    METRICS.integrity_failures.inc();
}

/// A block lookup in a cache.
pub fn cache_lookup(cache: Cache, hit: bool) {
    cache_lookups(cache, u64::from(hit), u64::from(!hit));
}

/// Several lookups at once (the pages of one read).
pub fn cache_lookups(cache: Cache, hits: u64, misses: u64) {
    METRICS.cache_hits.get(cache as usize).inc_by(hits);
    METRICS.cache_misses.get(cache as usize).inc_by(misses);
}

/// One object-store request, from [`StoreRequest::start`] until dropped: counts it in flight
/// meanwhile, and its latency, bytes and failure when dropped.
#[must_use = "the request is recorded when this is dropped"]
pub struct StoreRequest {
    op: StoreOp,
    start: Instant,
    bytes: u64,
    failed: bool,
}

impl StoreRequest {
    pub fn start(op: StoreOp) -> StoreRequest {
        METRICS.store_in_flight.get(op as usize).inc();
        StoreRequest {
            op,
            start: Instant::now(),
            bytes: 0,
            failed: false,
        }
    }

    /// Object bytes this request moved.
    pub fn bytes(&mut self, bytes: u64) {
        self.bytes += bytes;
    }

    pub fn failed(&mut self) {
        self.failed = true;
    }
}

impl Drop for StoreRequest {
    fn drop(&mut self) {
        let metrics = &*METRICS;
        let op = self.op as usize;
        metrics.store_in_flight.get(op).dec();
        metrics
            .store_duration
            .get(op)
            .observe(self.start.elapsed().as_secs_f64());
        metrics.store_bytes.get(op).inc_by(self.bytes);
        if self.failed {
            metrics.store_errors.get(op).inc();
        }
    }
}

/// A slice upload under way, until dropped.
#[must_use = "the upload counts as in flight until this is dropped"]
pub struct SliceUpload(());

pub fn slice_upload() -> SliceUpload {
    METRICS.slice_uploads_in_flight.inc();
    SliceUpload(())
}

impl Drop for SliceUpload {
    fn drop(&mut self) {
        METRICS.slice_uploads_in_flight.dec();
    }
}

/// A volume's count of dirty bytes, kept like an `AtomicU64` (same methods), whose changes the
/// process-global `cellar_vfs_dirty_bytes` gauge follows: the gauge is the sum over every
/// volume of the process. What is still counted when it is dropped leaves the gauge too.
#[derive(Debug, Default)]
pub struct DirtyBytes(AtomicU64);

impl DirtyBytes {
    pub fn fetch_add(&self, bytes: u64, order: Ordering) -> u64 {
        METRICS.dirty_bytes.inc_by(gauge_value(bytes));
        self.0.fetch_add(bytes, order)
    }

    pub fn fetch_sub(&self, bytes: u64, order: Ordering) -> u64 {
        METRICS.dirty_bytes.dec_by(gauge_value(bytes));
        self.0.fetch_sub(bytes, order)
    }

    pub fn load(&self, order: Ordering) -> u64 {
        self.0.load(order)
    }
}

impl Drop for DirtyBytes {
    fn drop(&mut self) {
        METRICS.dirty_bytes.dec_by(gauge_value(*self.0.get_mut()));
    }
}

fn gauge_value(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests;
