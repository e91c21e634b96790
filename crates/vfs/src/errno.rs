//! Mapping of metadata and store failures to the errno the kernel sees.

use crate::Errno;
use cellar_meta::MetaError;
use cellar_store::StoreError;

impl From<MetaError> for Errno {
    fn from(e: MetaError) -> Errno {
        if !matches!(e, MetaError::Posix(_)) {
            tracing::error!(error = %e, "metadata engine failure");
        }
        Errno(e.errno())
    }
}

impl From<StoreError> for Errno {
    fn from(e: StoreError) -> Errno {
        tracing::error!(error = %e, "object store failure");
        Errno(libc::EIO)
    }
}

impl Errno {
    pub(crate) const IO: Errno = Errno(libc::EIO);
}

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", std::io::Error::from_raw_os_error(self.0))
    }
}

impl std::error::Error for Errno {}

pub(crate) fn err<T>(errno: i32) -> crate::VfsResult<T> {
    Err(Errno(errno))
}
