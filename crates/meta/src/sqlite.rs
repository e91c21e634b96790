//! SQLite engine (being written).
use crate::Result;
pub struct SqliteEngine;
impl SqliteEngine {
    pub fn open(path: &std::path::Path) -> Result<SqliteEngine> { let _ = path; todo!() }
}
