//! The FUSE adapter of a Cellar volume: serves kernel requests from a [`cellar_vfs::Vfs`] and
//! forwards the vfs's cache invalidations to the kernel.
//!
//! ```no_run
//! # fn run(vfs: std::sync::Arc<cellar_vfs::Vfs>) -> Result<(), cellar_fuse::MountError> {
//! let handle = cellar_fuse::mount(vfs, "/mnt/data".as_ref(), &cellar_fuse::MountOptions::new("data"))?;
//! let unflushed = handle.wait()?; // after `umount /mnt/data`: what could not be flushed
//! # Ok(()) }
//! ```

mod convert;
mod fs;
mod kernel_cache;
mod mount;

pub use mount::{
    check_fuse_device, check_mount_point, is_mount_point, mount, unmount, MountError, MountHandle,
    MountOptions, Unmounter,
};
