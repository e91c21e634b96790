//! Input rules: volume names, sandbox mount paths and subpaths. Each violation names its rule.

pub const NAME_RULE: &str = "a name is 1-63 characters of letters, digits, '.', '_' and '-', \
     and starts with a letter or a digit";

/// System directories no volume may be mounted at or under.
pub const RESERVED_MOUNT_DIRS: [&str; 9] = [
    "/proc", "/sys", "/dev", "/boot", "/etc", "/bin", "/sbin", "/lib", "/lib64",
];

pub fn validate_volume_name(name: &str) -> Result<(), String> {
    validate_name("volume", name)
}

pub fn validate_sandbox_name(name: &str) -> Result<(), String> {
    validate_name("sandbox", name)
}

fn validate_name(kind: &str, name: &str) -> Result<(), String> {
    let valid = (1..=63).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if valid {
        Ok(())
    } else {
        Err(format!("invalid {kind} name {name:?}: {NAME_RULE}"))
    }
}

/// Checks one mount path and returns it normalised (single slashes, no trailing slash).
pub fn validate_mount_path(path: &str) -> Result<String, String> {
    let fail = |rule: &str| Err(format!("invalid mountPath {path:?}: {rule}"));
    if path.contains('\0') {
        return fail("must not contain NUL characters");
    }
    if !path.starts_with('/') {
        return fail("must be an absolute path");
    }
    let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    if components.iter().any(|c| *c == "." || *c == "..") {
        return fail("must not contain '.' or '..' components");
    }
    if components.is_empty() {
        return fail("must not be the root directory '/'");
    }
    // Checked on the normalised path so that `//etc` or `/etc/` is refused like `/etc`.
    let normalised = format!("/{}", components.join("/"));
    if let Some(dir) = RESERVED_MOUNT_DIRS
        .iter()
        .find(|dir| is_at_or_under(&normalised, dir))
    {
        return fail(&format!(
            "must not be at or under the system directory {dir}"
        ));
    }
    if path.contains("//") {
        return fail("must not contain '//'");
    }
    Ok(normalised)
}

/// Normalised mount paths of one sandbox must be distinct and not nested in each other.
pub fn validate_mount_set(paths: &[String]) -> Result<(), String> {
    for (i, a) in paths.iter().enumerate() {
        for b in &paths[i + 1..] {
            if a == b {
                return Err(format!(
                    "duplicate mountPath {a:?}: each volume needs its own mount path"
                ));
            }
            let (outer, inner) = if a.len() < b.len() { (a, b) } else { (b, a) };
            if is_at_or_under(inner, outer) {
                return Err(format!(
                    "nested mount paths {inner:?} and {outer:?}: a mount path must not be inside another"
                ));
            }
        }
    }
    Ok(())
}

/// Checks a subpath and returns it normalised (`None` for the volume's root).
pub fn validate_subpath(subpath: &str) -> Result<Option<String>, String> {
    let fail = |rule: &str| Err(format!("invalid subpath {subpath:?}: {rule}"));
    if subpath.contains('\0') {
        return fail("must not contain NUL characters");
    }
    if subpath.starts_with('/') {
        return fail("must be a relative path inside the volume");
    }
    let components: Vec<&str> = subpath
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    if components.contains(&"..") {
        return fail("must not contain '..' components");
    }
    Ok((!components.is_empty()).then(|| components.join("/")))
}

fn is_at_or_under(path: &str, dir: &str) -> bool {
    path == dir
        || path
            .strip_prefix(dir)
            .is_some_and(|rest| rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_names() {
        for ok in ["a", "my-volume", "v1.2_x", &"a".repeat(63)] {
            assert!(validate_volume_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", ".a", "_a", "a/b", "a b", "ä", &"a".repeat(64)] {
            let err = validate_volume_name(bad).unwrap_err();
            assert!(err.contains(NAME_RULE), "{err}");
        }
    }

    #[test]
    fn mount_paths() {
        assert_eq!(
            validate_mount_path("/home/daytona/volume").unwrap(),
            "/home/daytona/volume"
        );
        assert_eq!(validate_mount_path("/data/").unwrap(), "/data");
        assert_eq!(validate_mount_path("/etcetera").unwrap(), "/etcetera");
        let cases = [
            ("data", "absolute"),
            ("", "absolute"),
            ("/", "root"),
            ("///", "root"),
            ("/a/../b", "'..'"),
            ("/a/./b", "'.'"),
            ("/a/..", "'..'"),
            ("/a/.", "'.'"),
            ("/a//b", "'//'"),
            ("//etc", "/etc"),
            ("/etc", "/etc"),
            ("/etc/", "/etc"),
            ("/proc/x", "/proc"),
            ("/lib64", "/lib64"),
            ("/usr/../etc", "'..'"),
        ];
        for (path, rule) in cases {
            let err = validate_mount_path(path).unwrap_err();
            assert!(err.contains(rule), "{path}: {err}");
        }
    }

    #[test]
    fn mount_sets() {
        let set = |paths: &[&str]| paths.iter().map(|p| p.to_string()).collect::<Vec<_>>();
        assert!(validate_mount_set(&set(&["/a", "/ab", "/b/c"])).is_ok());
        assert!(validate_mount_set(&set(&["/a", "/a"]))
            .unwrap_err()
            .contains("duplicate"));
        assert!(validate_mount_set(&set(&["/a/b", "/a"]))
            .unwrap_err()
            .contains("nested"));
    }

    #[test]
    fn subpaths() {
        assert_eq!(validate_subpath("a/b/").unwrap().as_deref(), Some("a/b"));
        assert_eq!(validate_subpath("./").unwrap(), None);
        assert!(validate_subpath("/a").unwrap_err().contains("relative"));
        assert!(validate_subpath("a/../../b").unwrap_err().contains("'..'"));
    }
}
