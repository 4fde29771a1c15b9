//! Paths compared as the file system resolves them, for the checks that keep a run's output
//! away from its inputs.
//!
//! Two spellings of one folder (`data/x`, `./data/../data/x/`, a link to it) must compare
//! equal, and an output folder that does not exist yet must still be placed: [`resolve`]
//! canonicalizes the nearest existing ancestor and appends the rest, whose `.` and `..` are
//! applied lexically (a folder that does not exist cannot be a link, so that is what the file
//! system will do once `create_dir_all` made it).
//!
//! Left out: case-insensitive file systems (two spellings differing in case compare unequal)
//! and bind mounts (one folder under two mount points).

use std::path::{Component, Path, PathBuf};

/// `path` made absolute (against the working directory), with links resolved in the part
/// that exists and `.` / `..` applied in the part that does not.
pub fn resolve(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let components: Vec<Component<'_>> = absolute.components().collect();
    for existing in (1..=components.len()).rev() {
        let prefix: PathBuf = components[..existing].iter().collect();
        let Ok(mut resolved) = prefix.canonicalize() else {
            continue;
        };
        for component in &components[existing..] {
            match component {
                Component::ParentDir => {
                    resolved.pop();
                }
                Component::Normal(name) => resolved.push(name),
                Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
            }
        }
        return resolved;
    }
    // Not even the root resolves (no working directory): compare as written.
    absolute
}

/// Whether `path` is `folder` or lies inside it, once both are [`resolve`]d.
pub fn is_within(path: &Path, folder: &Path) -> bool {
    resolve(path).starts_with(resolve(folder))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_of_one_folder_resolve_alike() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().canonicalize().unwrap();
        std::fs::create_dir(real.join("data")).unwrap();
        std::os::unix::fs::symlink(real.join("data"), real.join("link")).unwrap();
        let data = real.join("data");
        assert_eq!(resolve(&real.join("./data/../data/")), data);
        assert_eq!(resolve(&real.join("link")), data);
        // Not there yet: the existing part is resolved, the rest applied as written.
        assert_eq!(resolve(&real.join("link/new/deeper/..")), data.join("new"));
        assert_eq!(resolve(&real.join("link/new/..")), data);
        assert!(is_within(&real.join("link/new"), &data));
        assert!(is_within(&data, &real.join("link")));
        assert!(!is_within(&real.join("data2"), &data));
        assert!(!is_within(&real, &data));
    }
}
