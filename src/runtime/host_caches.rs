//! The host runtime's caches: a slot's cache directory is renamed into the checkout for the
//! run and renamed back after it (one rename each way, no copy; both live under the
//! repository's git dir, so on one file system). The checkout is reached through directory
//! descriptors that never follow a symlink: what the agent or the command left there
//! (a symlink named `target`, a symlinked parent) is removed, never written through.
//! `~/` caches are the user's own directories, used in place.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rustix::fs::FileType;

use super::{Cache, CachePath};
use crate::git::safefs::Dir;

/// Caches moved into a checkout, to move back with [`restore`].
pub(super) struct Placed {
    moved: Vec<(Dir, OsString, PathBuf)>,
}

/// Moves each checkout-relative cache into `workdir` (replacing whatever is at its path).
pub(super) fn place(workdir: &Path, caches: &[Cache]) -> Result<Placed> {
    let mut placed = Placed { moved: Vec::new() };
    for cache in caches {
        let CachePath::Workdir(rel) = &cache.at else { continue };
        let (Some(name), parent) = (rel.file_name(), rel.parent().unwrap_or(Path::new(""))) else {
            continue;
        };
        std::fs::create_dir_all(&cache.host_dir)
            .with_context(|| format!("cannot create cache {}", cache.host_dir.display()))?;
        let root = Dir::open(workdir).with_context(|| format!("cannot open {}", workdir.display()))?;
        let mut dir = root;
        for comp in parent.components() {
            dir = dir.make_dir(comp.as_os_str())?;
        }
        dir.remove(name)
            .with_context(|| format!("cannot clear {} in the checkout", rel.display()))?;
        rustix::fs::renameat(rustix::fs::CWD, &cache.host_dir, dir.as_fd(), name)
            .with_context(|| format!("cannot move cache {} into the checkout", cache.host_dir.display()))?;
        placed.moved.push((dir, name.to_os_string(), cache.host_dir.clone()));
    }
    Ok(placed)
}

/// Moves the caches back out of the checkout. A cache the command replaced by anything but
/// a directory is dropped (the next run starts it empty).
pub(super) fn restore(placed: Placed) {
    for (dir, name, host_dir) in placed.moved {
        if let Err(e) = restore_one(&dir, &name, &host_dir) {
            tracing::warn!("cannot keep cache {}: {e:#}", host_dir.display());
        }
    }
}

fn restore_one(dir: &Dir, name: &OsStr, host_dir: &Path) -> Result<()> {
    let is_dir = dir
        .stat(name)?
        .is_some_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory);
    if is_dir {
        rustix::fs::renameat(dir.as_fd(), name, rustix::fs::CWD, host_dir)?;
    } else {
        dir.remove(name)?;
        std::fs::create_dir_all(host_dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cache_moves_in_and_out_and_a_symlink_in_its_place_is_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let (work, cache_dir, outside) = (tmp.path().join("w"), tmp.path().join("c/0/t"), tmp.path().join("o"));
        std::fs::create_dir_all(&work).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let cache = Cache {
            volume: "v".into(),
            host_dir: cache_dir.clone(),
            at: CachePath::Workdir("build/target".into()),
        };
        // What the agent left at the path: a symlink to somewhere else.
        std::fs::create_dir_all(work.join("build")).unwrap();
        std::os::unix::fs::symlink(&outside, work.join("build/target")).unwrap();
        let placed = place(&work, std::slice::from_ref(&cache)).unwrap();
        assert!(work.join("build/target").is_dir() && !work.join("build/target").is_symlink());
        std::fs::write(work.join("build/target/warm"), "1").unwrap();
        restore(placed);
        assert_eq!(std::fs::read_to_string(cache_dir.join("warm")).unwrap(), "1");
        assert!(!work.join("build/target").exists(), "moved back out");
        assert!(
            outside.read_dir().unwrap().next().is_none(),
            "nothing written through the symlink"
        );
        // The command left a symlink where the cache was: dropped, not kept as the cache.
        let placed = place(&work, std::slice::from_ref(&cache)).unwrap();
        std::fs::remove_dir_all(work.join("build/target")).unwrap();
        std::os::unix::fs::symlink(&outside, work.join("build/target")).unwrap();
        restore(placed);
        assert!(cache_dir.is_dir() && !cache_dir.is_symlink());
        assert!(cache_dir.read_dir().unwrap().next().is_none());
    }
}
