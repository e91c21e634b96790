//! cellar-fuse
