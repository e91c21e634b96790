//! The cost of recording: nanoseconds per instrumented call with an empty body, on one thread
//! and on 16 threads recording the same operation at once (the worst case: one histogram).
//! `cargo run --release -p cellar-metrics --example overhead`

use cellar_metrics::{fs_request, meta_transaction, FsOp, StoreOp, StoreRequest, TxKind};
use std::time::Instant;

const CALLS: u32 = 2_000_000;

fn per_call(threads: u32, record: fn()) -> f64 {
    let start = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| (0..CALLS / threads).for_each(|_| record()));
        }
    });
    start.elapsed().as_nanos() as f64 / f64::from(CALLS / threads * threads)
}

fn main() {
    let cases: [(&str, fn()); 4] = [
        ("nothing (loop and clock only)", || {
            std::hint::black_box(Instant::now().elapsed());
        }),
        ("fs_request", || {
            std::hint::black_box(fs_request(FsOp::Getattr, || Ok::<_, ()>(1))).ok();
        }),
        ("meta_transaction", || {
            std::hint::black_box(meta_transaction(TxKind::Read, || Ok::<_, ()>(1))).ok();
        }),
        ("StoreRequest", || {
            let mut request = StoreRequest::start(StoreOp::Get);
            request.bytes(4096);
        }),
    ];
    for (name, record) in cases {
        println!(
            "{name:32} 1 thread: {:6.1} ns/call   16 threads: {:6.1} ns/call (wall time / calls)",
            per_call(1, record),
            per_call(16, record)
        );
    }
}
