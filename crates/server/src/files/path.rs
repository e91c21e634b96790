//! Paths inside a volume: checked and normalised before any vfs call, and resolved with the
//! semantics of openat2(RESOLVE_IN_ROOT): a symlink in an intermediate component is followed,
//! but an absolute target starts again at the volume's root and `..` stops at the root, so no
//! path ever leaves the volume. The last component is never followed: a call that names a link
//! acts on the link.

use cellar_meta::MAX_NAME_LEN;
use cellar_vfs::{Attr, FileKind, Ino, Vfs, ROOT_INO};

use super::{FileError, FileResult, API_CTX};
use crate::validate::MAX_PATH_LEN;

/// Links followed in one resolution before it fails (Linux's MAXSYMLINKS).
pub const MAX_SYMLINK_HOPS: u32 = 40;

/// A checked, absolute path: its components, without empty ones and `.`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumePath {
    components: Vec<String>,
}

impl VolumePath {
    /// Checks a path as given by a client: absolute, no NUL, no `..`, at most 4096 bytes and
    /// 255 bytes per component. `//` and `.` components are dropped.
    pub fn parse(path: &str) -> FileResult<VolumePath> {
        let invalid = |rule: &str| Err(FileError::InvalidPath(format!("path {path:?} {rule}")));
        if path.is_empty() {
            return invalid("is empty");
        }
        if path.contains('\0') {
            return invalid("contains a NUL byte");
        }
        if path.len() > MAX_PATH_LEN {
            return Err(FileError::InvalidPath(format!(
                "path is {} bytes long; at most {MAX_PATH_LEN} are allowed",
                path.len()
            )));
        }
        if !path.starts_with('/') {
            return invalid("is not absolute (paths start with '/', the volume's root)");
        }
        let mut components = Vec::new();
        for component in path.split('/') {
            match component {
                "" | "." => {}
                ".." => return invalid("contains a '..' component"),
                name if name.len() > MAX_NAME_LEN => {
                    return Err(FileError::InvalidPath(format!(
                    "path component {:?}... is {} bytes long; at most {MAX_NAME_LEN} are allowed",
                    &name[..name.floor_char_boundary(32)],
                    name.len()
                )))
                }
                name => components.push(name.to_string()),
            }
        }
        Ok(VolumePath { components })
    }

    pub fn is_root(&self) -> bool {
        self.components.is_empty()
    }

    /// The last component (empty for the root).
    pub fn name(&self) -> &str {
        self.components.last().map_or("", String::as_str)
    }

    /// `/a/b`; `/` for the root.
    pub fn as_string(&self) -> String {
        format!("/{}", self.components.join("/"))
    }

    pub fn join(&self, name: &str) -> VolumePath {
        let mut components = self.components.clone();
        components.push(name.to_string());
        VolumePath { components }
    }

    pub fn components(&self) -> &[String] {
        &self.components
    }
}

/// Where a path leads: the directory that holds its last component, and the node if it exists.
pub struct Resolved {
    pub parent: Ino,
    /// The last component's name (empty for the root).
    pub name: Vec<u8>,
    pub attr: Option<Attr>,
}

impl Resolved {
    /// The node, or 404.
    pub fn existing(self, path: &VolumePath) -> FileResult<Attr> {
        self.attr
            .ok_or_else(|| FileError::NotFound(path.as_string()))
    }
}

/// Resolves `path`; intermediate directories that are missing are created (owned by the
/// sandbox user, mode 0755) when `create_parents`, else the call fails with 404.
pub fn resolve(vfs: &Vfs, path: &VolumePath, create_parents: bool) -> FileResult<Resolved> {
    let Some((last, intermediate)) = path.components.split_last() else {
        let root = vfs
            .getattr(ROOT_INO)
            .map_err(|e| FileError::errno(e, path))?;
        return Ok(Resolved {
            parent: ROOT_INO,
            name: Vec::new(),
            attr: Some(root),
        });
    };
    // Components still to walk, the next one last; link targets are pushed onto it.
    let mut pending: Vec<Vec<u8>> = intermediate
        .iter()
        .rev()
        .map(|c| c.as_bytes().to_vec())
        .collect();
    // The directories walked so far, from the root: `..` pops, an absolute target clears.
    let mut stack: Vec<Ino> = vec![ROOT_INO];
    let mut hops = 0;
    while let Some(component) = pending.pop() {
        let dir = *stack.last().expect("the root is never popped");
        match component.as_slice() {
            b"" | b"." => continue,
            b".." => {
                if stack.len() > 1 {
                    stack.pop();
                }
                continue;
            }
            _ => {}
        }
        let attr = match vfs.lookup(&API_CTX, dir, &component) {
            Ok(attr) => attr,
            Err(e) if e.0 == libc::ENOENT && create_parents => {
                match vfs.mkdir(&API_CTX, dir, &component, 0o755, 0) {
                    Ok(attr) => attr,
                    // Made by someone else meanwhile: use theirs.
                    Err(e) if e.0 == libc::EEXIST => vfs
                        .lookup(&API_CTX, dir, &component)
                        .map_err(|e| FileError::errno(e, path))?,
                    Err(e) => return Err(FileError::errno(e, path)),
                }
            }
            Err(e) => return Err(FileError::errno(e, path)),
        };
        match attr.kind {
            FileKind::Directory => stack.push(attr.ino),
            FileKind::Symlink => {
                hops += 1;
                if hops > MAX_SYMLINK_HOPS {
                    return Err(FileError::InvalidPath(format!(
                        "resolving {} follows more than {MAX_SYMLINK_HOPS} symbolic links",
                        path.as_string()
                    )));
                }
                let target = vfs
                    .readlink(attr.ino)
                    .map_err(|e| FileError::errno(e, path))?;
                if target.starts_with(b"/") {
                    stack.truncate(1);
                }
                pending.extend(target.split(|b| *b == b'/').rev().map(<[u8]>::to_vec));
            }
            _ => {
                return Err(FileError::NotADirectory(format!(
                    "{}: a component of the path is not a directory",
                    path.as_string()
                )))
            }
        }
    }
    let parent = *stack.last().expect("the root is never popped");
    let name = last.as_bytes().to_vec();
    let attr = match vfs.lookup(&API_CTX, parent, &name) {
        Ok(attr) => Some(attr),
        Err(e) if e.0 == libc::ENOENT => None,
        Err(e) => return Err(FileError::errno(e, path)),
    };
    Ok(Resolved { parent, name, attr })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_checked_and_normalised() {
        let ok = |p: &str| VolumePath::parse(p).unwrap().as_string();
        assert_eq!(ok("/"), "/");
        assert_eq!(ok("//a//b/"), "/a/b");
        assert_eq!(ok("/a/./b"), "/a/b");
        assert_eq!(ok("/ä/…"), "/ä/…");
        assert_eq!(VolumePath::parse("/a/b").unwrap().name(), "b");
        assert!(VolumePath::parse("/").unwrap().is_root());
        let long_name = "x".repeat(MAX_NAME_LEN);
        assert_eq!(ok(&format!("/{long_name}")), format!("/{long_name}"));
        for bad in [
            "",
            "a/b",
            "/a/../b",
            "/..",
            "/a\0b",
            &format!("/{}", "x".repeat(MAX_NAME_LEN + 1)),
            &format!("/{}", "a/".repeat(MAX_PATH_LEN / 2)),
        ] {
            let err = VolumePath::parse(bad).unwrap_err();
            assert!(matches!(err, FileError::InvalidPath(_)), "{bad:?}: {err:?}");
        }
    }
}
