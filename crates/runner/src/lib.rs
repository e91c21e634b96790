//! cellar-runner
