//! Recycled buffers of whole pages. A fetched page is a 1 MiB allocation; with the mount
//! daemon's fixed mmap threshold (which returns freed cache pages to the system) each one is a
//! fresh mapping faulted in 4 KiB at a time and unmapped when the cache evicts it: about two
//! seconds of kernel time per GiB streamed. A page's buffer comes back here when its last
//! reference goes, and the next fetch writes into it.

use std::sync::Mutex;

use bytes::Bytes;

use crate::pages::PAGE_SIZE;

/// Free buffers kept at most (32 MiB): enough for a stream, whose evictions keep pace with its
/// fetches; beyond it buffers are freed as before.
const KEPT: usize = 32;

static FREE: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// An empty buffer for a page of `len` bytes: a recycled one for a whole page.
pub(crate) fn take(len: usize) -> Vec<u8> {
    if len == PAGE_SIZE as usize {
        if let Some(buffer) = FREE.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return buffer;
        }
    }
    Vec::with_capacity(len)
}

/// The filled buffer as shared bytes that give a whole page's buffer back when dropped.
pub(crate) fn freeze(buffer: Vec<u8>) -> Bytes {
    if buffer.capacity() == PAGE_SIZE as usize {
        Bytes::from_owner(Recycled(buffer))
    } else {
        Bytes::from(buffer)
    }
}

struct Recycled(Vec<u8>);

impl AsRef<[u8]> for Recycled {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Recycled {
    fn drop(&mut self) {
        let mut free = FREE.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < KEPT {
            let mut buffer = std::mem::take(&mut self.0);
            buffer.clear();
            free.push(buffer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_pages_are_recycled_and_others_are_not() {
        let mut page = take(PAGE_SIZE as usize);
        page.extend_from_slice(&vec![7; PAGE_SIZE as usize]);
        let address = page.as_ptr();
        let bytes = freeze(page);
        let copy = bytes.clone();
        drop(bytes);
        assert_eq!(copy[0], 7, "shared bytes stay valid while referenced");
        drop(copy);
        // Other tests may take buffers concurrently: look for ours among a few.
        let taken: Vec<Vec<u8>> = (0..KEPT).map(|_| take(PAGE_SIZE as usize)).collect();
        assert!(taken.iter().any(|b| b.as_ptr() == address && b.is_empty()));
        let short = take(10);
        assert_eq!(short.capacity(), 10);
    }
}
