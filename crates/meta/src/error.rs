use cellar_sql::Condition;

/// A POSIX error number (`libc::ENOENT`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Errno(pub i32);

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// A namespace rule was violated; maps 1:1 to an errno for the caller.
    #[error("{}", std::io::Error::from_raw_os_error(.0 .0))]
    Posix(Errno),
    #[error("metadata holds volume {found:?}, not {wanted:?}")]
    VolumeMismatch { found: String, wanted: String },
    #[error("unsupported metadata URL {0}")]
    UnsupportedUrl(String),
    #[error("metadata engine: {0}")]
    Engine(String),
    /// The engine could not do it now (docs/SEMANTICS.md, "Failure behaviour"): a lock held
    /// elsewhere past the lock timeout (ETIMEDOUT), no space left on the database's disk
    /// (ENOSPC), the database unreachable past the outage timeout (EIO).
    #[error("metadata engine: {message}")]
    Fault { errno: Errno, message: String },
    /// The stored state changed under a compare-and-swap (another writer won); retry from a
    /// fresh read.
    #[error("conflict: {0}")]
    Conflict(String),
}

impl MetaError {
    pub fn posix(errno: i32) -> Self {
        MetaError::Posix(Errno(errno))
    }
    /// The errno a caller should see: namespace errors as they are, engine failures as EIO.
    pub fn errno(&self) -> i32 {
        match self {
            MetaError::Posix(e) | MetaError::Fault { errno: e, .. } => e.0,
            _ => libc::EIO,
        }
    }
}

impl From<cellar_sql::Error> for MetaError {
    fn from(e: cellar_sql::Error) -> Self {
        let errno = match e.condition() {
            Condition::Failed => return MetaError::Engine(e.to_string()),
            Condition::LockTimeout => libc::ETIMEDOUT,
            Condition::DiskFull => libc::ENOSPC,
            Condition::Unavailable => libc::EIO,
        };
        MetaError::Fault {
            errno: Errno(errno),
            message: e.to_string(),
        }
    }
}

pub type Result<T> = std::result::Result<T, MetaError>;
