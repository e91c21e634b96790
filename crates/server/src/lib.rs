//! cellar-server
