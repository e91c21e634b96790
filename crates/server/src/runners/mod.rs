//! Where sandboxes run: the runner embedded in the server, or `cellar runner` processes on other
//! hosts that registered with it. Both answer the same operations.

pub mod agent;
pub mod protocol;
mod remote;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use cellar_runner::{ExecRequest, ExecResult, Runner, RunnerError, SandboxSpec, VolumeMountSpec};
use tokio::io::AsyncRead;

pub use remote::RemoteRunner;

/// A file streamed out of a sandbox; ends with an error, not silently short, if reading failed.
pub type ByteStream = Pin<Box<dyn AsyncRead + Send>>;

pub enum RunnerHandle {
    Embedded(Arc<Runner>),
    Remote(RemoteRunner),
}

impl RunnerHandle {
    pub fn is_remote(&self) -> bool {
        matches!(self, RunnerHandle::Remote(_))
    }

    pub async fn create_sandbox(&self, spec: SandboxSpec) -> Result<(), RunnerError> {
        match self {
            RunnerHandle::Embedded(runner) => runner.create_sandbox(spec).await,
            RunnerHandle::Remote(runner) => runner.create_sandbox(&spec).await,
        }
    }

    pub async fn destroy_sandbox(&self, id: &str) -> Result<(), RunnerError> {
        match self {
            RunnerHandle::Embedded(runner) => runner.destroy_sandbox(id).await,
            RunnerHandle::Remote(runner) => runner.destroy_sandbox(id).await,
        }
    }

    pub async fn attach_volume(&self, id: &str, mount: VolumeMountSpec) -> Result<(), RunnerError> {
        match self {
            RunnerHandle::Embedded(runner) => runner.attach_volume(id, mount).await,
            RunnerHandle::Remote(runner) => runner.attach_volume(id, &mount).await,
        }
    }

    pub async fn detach_volume(
        &self,
        id: &str,
        mount_path: &str,
        force: bool,
    ) -> Result<(), RunnerError> {
        match self {
            RunnerHandle::Embedded(runner) => runner.detach_volume(id, mount_path, force).await,
            RunnerHandle::Remote(runner) => runner.detach_volume(id, mount_path, force).await,
        }
    }

    pub async fn exec(&self, id: &str, request: ExecRequest) -> Result<ExecResult, RunnerError> {
        match self {
            RunnerHandle::Embedded(runner) => runner.exec(id, request).await,
            RunnerHandle::Remote(runner) => runner.exec(id, &request).await,
        }
    }

    pub async fn upload(
        &self,
        id: &str,
        path: &str,
        body: impl AsyncRead + Unpin + Send,
    ) -> Result<(), RunnerError> {
        match self {
            RunnerHandle::Embedded(runner) => runner.upload(id, path, body).await,
            RunnerHandle::Remote(runner) => runner.upload(id, path, body).await,
        }
    }

    pub async fn download(&self, id: &str, path: &str) -> Result<ByteStream, RunnerError> {
        match self {
            RunnerHandle::Embedded(runner) => Ok(Box::pin(runner.download(id, path).await?)),
            RunnerHandle::Remote(runner) => runner.download(id, path).await,
        }
    }
}

/// The runners this server process can call, by name.
#[derive(Default)]
pub struct Registry {
    runners: RwLock<HashMap<String, Arc<RunnerHandle>>>,
}

impl Registry {
    pub fn get(&self, name: &str) -> Option<Arc<RunnerHandle>> {
        self.read().get(name).cloned()
    }

    /// Adds a runner, replacing an earlier registration under the same name. Returns the new
    /// entry and the one it replaced (for [`Registry::undo_insert`]).
    pub fn insert(
        &self,
        name: &str,
        handle: RunnerHandle,
    ) -> (Arc<RunnerHandle>, Option<Arc<RunnerHandle>>) {
        let handle = Arc::new(handle);
        let replaced = self.write().insert(name.to_string(), Arc::clone(&handle));
        (handle, replaced)
    }

    /// Puts back what `insert` replaced, unless another registration replaced `inserted` since.
    pub fn undo_insert(
        &self,
        name: &str,
        inserted: &Arc<RunnerHandle>,
        replaced: Option<Arc<RunnerHandle>>,
    ) {
        let mut runners = self.write();
        if !runners
            .get(name)
            .is_some_and(|current| Arc::ptr_eq(current, inserted))
        {
            return;
        }
        match replaced {
            Some(previous) => runners.insert(name.to_string(), previous),
            None => runners.remove(name),
        };
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<RunnerHandle>>> {
        self.runners
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn names(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<RunnerHandle>>> {
        self.runners
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
