//! Input rules: volume names, sandbox mount paths and subpaths, environments, toolbox paths and
//! network allow lists. Each violation names its field and rule.

use std::collections::BTreeMap;

use cellar_runner::SANDBOX_SYSTEM_DIRS;

pub const NAME_RULE: &str = "a name is 1-63 characters of letters, digits, '.', '_' and '-', \
     and starts with a letter or a digit";

/// Longest path accepted anywhere (Linux's PATH_MAX).
pub const MAX_PATH_LEN: usize = 4096;
/// Budget of one environment (`NAME=VALUE` strings): far below the kernel's 128 KiB per argument
/// and 2 MiB per exec, so a sandbox's and an exec's environments always fit together.
pub const MAX_ENV_BYTES: usize = 64 << 10;
/// A command line is one argument of the exec (the kernel's MAX_ARG_STRLEN less the NUL).
pub const MAX_COMMAND_LEN: usize = (128 << 10) - 1;
/// Entries of `networkAllowList`.
pub const MAX_ALLOW_LIST_LEN: usize = 256;

pub fn validate_volume_name(name: &str) -> Result<(), String> {
    validate_name("volume", name)
}

pub fn validate_sandbox_name(name: &str) -> Result<(), String> {
    validate_name("sandbox", name)
}

pub fn validate_runner_name(name: &str) -> Result<(), String> {
    validate_name("runner", name)
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
    if let Some(dir) = SANDBOX_SYSTEM_DIRS
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

/// Checks a subpath; `None` for the volume's root (an empty subpath).
pub fn validate_subpath(subpath: &str) -> Result<Option<String>, String> {
    let fail = |rule: &str| Err(format!("invalid subpath {subpath:?}: {rule}"));
    if subpath.is_empty() {
        return Ok(None);
    }
    if subpath.contains('\0') {
        return fail("must not contain NUL characters");
    }
    if subpath.starts_with('/') {
        return fail("must be a relative path inside the volume");
    }
    if subpath.len() > MAX_PATH_LEN {
        return fail(&format!("must be at most {MAX_PATH_LEN} bytes long"));
    }
    for component in subpath.split('/') {
        match component {
            "" => return fail("must not contain empty components ('//' or a trailing '/')"),
            "." | ".." => return fail("must not contain '.' or '..' components"),
            name if name.len() > cellar_meta::MAX_NAME_LEN => {
                return fail(&format!(
                    "each component must be at most {} bytes long",
                    cellar_meta::MAX_NAME_LEN
                ))
            }
            _ => {}
        }
    }
    Ok(Some(subpath.to_string()))
}

/// Checks a sandbox's or an exec's environment: POSIX names, no NUL, a usable PATH, bounded size.
pub fn validate_env(field: &str, env: &BTreeMap<String, String>) -> Result<(), String> {
    let mut bytes = 0;
    for (name, value) in env {
        let posix = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !posix {
            return Err(format!(
                "invalid {field} variable name {name:?}: a name is letters, digits and '_', \
                 not starting with a digit"
            ));
        }
        if value.contains('\0') {
            return Err(format!(
                "invalid {field} variable {name}: the value must not contain NUL characters"
            ));
        }
        if name == "PATH" && value.is_empty() {
            return Err(format!(
                "invalid {field} variable PATH: must not be empty (no program could be found)"
            ));
        }
        bytes += name.len() + value.len() + 2;
    }
    if bytes > MAX_ENV_BYTES {
        return Err(format!(
            "{field} is too large: at most {MAX_ENV_BYTES} bytes of NAME=VALUE in all"
        ));
    }
    Ok(())
}

/// Checks a path given to a toolbox endpoint (relative ones are relative to the home).
pub fn validate_toolbox_path(field: &str, path: &str) -> Result<(), String> {
    let fail = |rule: &str| Err(format!("invalid {field} {path:?}: {rule}"));
    if path.is_empty() {
        return fail("must not be empty");
    }
    if path.contains('\0') {
        return fail("must not contain NUL characters");
    }
    if path.len() > MAX_PATH_LEN {
        return fail(&format!("must be at most {MAX_PATH_LEN} bytes long"));
    }
    Ok(())
}

/// Parses Daytona's `networkAllowList`: comma-separated CIDRs (blank means no list).
pub fn parse_allow_list(list: &str) -> Result<Vec<ipnet::IpNet>, String> {
    if list.trim().is_empty() {
        return Ok(Vec::new());
    }
    let networks = list
        .split(',')
        .map(|entry| {
            entry.trim().parse::<ipnet::IpNet>().map_err(|_| {
                format!(
                    "invalid networkAllowList entry {:?}: expected a CIDR such as 10.0.0.0/8",
                    entry.trim()
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if networks.len() > MAX_ALLOW_LIST_LEN {
        return Err(format!(
            "networkAllowList has {} entries: at most {MAX_ALLOW_LIST_LEN}",
            networks.len()
        ));
    }
    Ok(networks)
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
        assert_eq!(validate_mount_path("/usrdata").unwrap(), "/usrdata");
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
            ("/usr", "/usr"),
            ("/usr/bin", "/usr"),
            ("/usr/lib/x", "/usr"),
            ("/lib32", "/lib32"),
            ("/libx32", "/libx32"),
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
        assert_eq!(validate_subpath("a/b").unwrap().as_deref(), Some("a/b"));
        assert_eq!(validate_subpath("").unwrap(), None);
        let long = "x".repeat(cellar_meta::MAX_NAME_LEN + 1);
        let too_long = format!("{}/x", "a/".repeat(MAX_PATH_LEN / 2));
        let cases = [
            ("/a", "relative"),
            ("a/../../b", "'..'"),
            ("..", "'..'"),
            (".", "'.'"),
            ("./a", "'.'"),
            ("a/./b", "'.'"),
            ("a//b", "empty"),
            ("a/", "empty"),
            ("a\0b", "NUL"),
            (long.as_str(), "component"),
            (too_long.as_str(), "4096"),
        ];
        for (subpath, rule) in cases {
            let err = validate_subpath(subpath).unwrap_err();
            assert!(err.contains(rule), "{subpath}: {err}");
        }
        let ok = format!("{}/x", &long[1..]);
        assert!(validate_subpath(&ok).is_ok());
    }

    #[test]
    fn environments() {
        let env = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>()
        };
        assert!(validate_env("env", &env(&[("A_1", "x"), ("_b", ""), ("PATH", "/bin")])).is_ok());
        let cases = [
            (env(&[("", "x")]), "name"),
            (env(&[("1A", "x")]), "name"),
            (env(&[("A=B", "x")]), "name"),
            (env(&[("A\0", "x")]), "name"),
            (env(&[("A-B", "x")]), "name"),
            (env(&[("A", "x\0y")]), "NUL"),
            (env(&[("PATH", "")]), "PATH"),
            (env(&[("BIG", &"x".repeat(MAX_ENV_BYTES))]), "too large"),
        ];
        for (env, rule) in cases {
            let err = validate_env("env", &env).unwrap_err();
            assert!(err.contains(rule), "{env:?}: {err}");
        }
    }

    #[test]
    fn allow_lists() {
        let nets = parse_allow_list(" 10.0.0.0/8, 192.168.1.0/24,::1/128").unwrap();
        assert_eq!(nets.len(), 3);
        assert_eq!(parse_allow_list("  ").unwrap(), Vec::new());
        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "x",
            "10.0.0.0/8,",
            "10.0.0.0/8,,1.2.3.0/24",
        ] {
            let err = parse_allow_list(bad).unwrap_err();
            assert!(err.contains("networkAllowList"), "{bad}: {err}");
        }
    }

    #[test]
    fn toolbox_paths() {
        assert!(validate_toolbox_path("path", "a b/c").is_ok());
        for bad in ["", "a\0b", &"a".repeat(MAX_PATH_LEN + 1)] {
            assert!(validate_toolbox_path("path", bad).is_err(), "{bad:?}");
        }
    }
}
