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

/// A free list of whole-page buffers.
struct FreeBuffers(Mutex<Vec<Vec<u8>>>);

impl FreeBuffers {
    const fn new() -> FreeBuffers {
        FreeBuffers(Mutex::new(Vec::new()))
    }

    fn list(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An empty buffer for a page of `len` bytes: a recycled one for a whole page.
    fn take(&'static self, len: usize) -> Vec<u8> {
        if len == PAGE_SIZE as usize {
            if let Some(buffer) = self.list().pop() {
                return buffer;
            }
        }
        Vec::with_capacity(len)
    }

    /// The filled buffer as shared bytes that give a whole page's buffer back when dropped.
    fn freeze(&'static self, buffer: Vec<u8>) -> Bytes {
        if buffer.capacity() == PAGE_SIZE as usize {
            Bytes::from_owner(Recycled(buffer, self))
        } else {
            Bytes::from(buffer)
        }
    }
}

static FREE: FreeBuffers = FreeBuffers::new();

/// An empty buffer for a page of `len` bytes: a recycled one for a whole page.
pub(crate) fn take(len: usize) -> Vec<u8> {
    FREE.take(len)
}

/// The filled buffer as shared bytes that give a whole page's buffer back when dropped.
pub(crate) fn freeze(buffer: Vec<u8>) -> Bytes {
    FREE.freeze(buffer)
}

struct Recycled(Vec<u8>, &'static FreeBuffers);

impl AsRef<[u8]> for Recycled {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Recycled {
    fn drop(&mut self) {
        let mut free = self.1.list();
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
        // A free list of its own: other tests use the shared one concurrently.
        let buffers: &'static FreeBuffers = Box::leak(Box::new(FreeBuffers::new()));
        let mut page = buffers.take(PAGE_SIZE as usize);
        page.extend_from_slice(&vec![7; PAGE_SIZE as usize]);
        let address = page.as_ptr();
        let bytes = buffers.freeze(page);
        let copy = bytes.clone();
        drop(bytes);
        assert_eq!(copy[0], 7, "shared bytes stay valid while referenced");
        assert!(buffers.list().is_empty(), "not back while referenced");
        drop(copy);
        let again = buffers.take(PAGE_SIZE as usize);
        assert_eq!(again.as_ptr(), address, "the buffer came back");
        assert!(again.is_empty());
        let short = buffers.take(10);
        assert_eq!(short.capacity(), 10);
        drop(buffers.freeze(short));
        assert!(buffers.list().is_empty(), "a partial page is not kept");
    }
}
