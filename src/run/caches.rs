//! Warm caches for the verify command (`[verify] caches`): directories that persist between
//! the tasks of a run and between runs, per repository.
//!
//! Two verify runs never write one cache at the same time: each holds a **slot**, and every
//! slot has its own copy of every cache. A slot is held by an open-file-description lock on
//! `caches/<n>.lock` under the repository's cohort state, so slots are exclusive between the
//! tasks of a run and between cohort processes alike, and a killed process frees its slot.
//! A lease takes the lowest free slot, so a run of `-j N` uses slots 0..N (plus one for the
//! merge train) and finds them warm the next time. Copies rather than one locked cache: the
//! verify runs of parallel tasks do not queue behind each other, at the cost of disk space
//! (one copy per slot) and one cold build per slot.
//!
//! In a container a cache is a podman named volume; on the host a directory of the slot that
//! is moved into the checkout for the verify run and back after it (a rename, so no copy). A
//! `~/` cache on the host is the user's own directory, used in place under one lock of its
//! own, since it has no copy per slot.

use std::fs::File;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::runtime::{Cache, CachePath};

/// One `[verify] caches` entry, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheSpec {
    /// As the user wrote it, for messages.
    pub written: String,
    pub at: CachePath,
}

impl CacheSpec {
    /// `target`, `build/cache` (relative to the checkout) or `~/.cargo/registry` (to home).
    pub fn parse(s: &str) -> Result<CacheSpec> {
        let (rel, home) = match s.strip_prefix("~/") {
            Some(rest) => (rest, true),
            None => (s, false),
        };
        let path = Path::new(rel);
        let plain = path.components().all(|c| matches!(c, Component::Normal(_)));
        if rel.is_empty() || !plain {
            bail!(
                "[verify] caches: {s:?} is not a plain relative path; write a path inside the checkout \
                 (\"target\") or under your home (\"~/.cargo/registry\"), without `..`"
            );
        }
        let at = match home {
            true => CachePath::Home(path.to_path_buf()),
            false => CachePath::Workdir(path.to_path_buf()),
        };
        Ok(CacheSpec {
            written: s.to_string(),
            at,
        })
    }

    fn id(&self) -> String {
        let digest = crate::trust::sha256_hex(self.written.as_bytes());
        format!("{}-{}", slug(&self.written), &digest[..8])
    }
}

fn slug(s: &str) -> String {
    let out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    out.trim_matches('-').chars().take(24).collect()
}

/// The caches of one repository.
pub struct CacheSlots {
    dir: PathBuf,
    repo_key: String,
    specs: Vec<CacheSpec>,
}

/// A slot held until dropped, and its caches as a spawn mounts them.
pub struct SlotLease {
    _lock: File,
    _home_lock: Option<File>,
    pub slot: usize,
    pub caches: Vec<Cache>,
}

/// More slots than this means a leak; wait for slot 0 instead of growing.
const MAX_SLOTS: usize = 64;

impl CacheSlots {
    /// `dir` is the repository's cohort state (`<git dir>/cohort/caches`); `repo` names the
    /// repository in volume names.
    pub fn new(dir: PathBuf, repo: &Path, specs: Vec<CacheSpec>) -> CacheSlots {
        let digest = crate::trust::sha256_hex(repo.as_os_str().as_encoded_bytes());
        CacheSlots {
            dir,
            repo_key: digest[..12].to_string(),
            specs,
        }
    }

    /// The lowest free slot (blocking only when [`MAX_SLOTS`] are all held). `host`: the
    /// spawn runs on the host, whose `~/` caches are shared and so locked as a whole.
    pub fn lease(&self, host: bool) -> Result<SlotLease> {
        std::fs::create_dir_all(&self.dir).with_context(|| format!("cannot create {}", self.dir.display()))?;
        let mut found = None;
        for slot in 0..MAX_SLOTS {
            let file = self.lock_file(&format!("{slot}.lock"))?;
            if try_lock(&file, false)? {
                found = Some((slot, file));
                break;
            }
        }
        let (slot, lock) = match found {
            Some(f) => f,
            None => {
                let file = self.lock_file("0.lock")?;
                try_lock(&file, true)?;
                (0, file)
            }
        };
        let home_lock = match host && self.specs.iter().any(|s| matches!(s.at, CachePath::Home(_))) {
            true => {
                let file = self.lock_file("home.lock")?;
                try_lock(&file, true)?;
                Some(file)
            }
            false => None,
        };
        let caches = self
            .specs
            .iter()
            .map(|spec| Cache {
                volume: format!("cohort-cache-{}-{}-{slot}", self.repo_key, spec.id()),
                host_dir: self.dir.join(slot.to_string()).join(spec.id()),
                at: spec.at.clone(),
            })
            .collect();
        Ok(SlotLease {
            _lock: lock,
            _home_lock: home_lock,
            slot,
            caches,
        })
    }

    fn lock_file(&self, name: &str) -> Result<File> {
        let p = self.dir.join(name);
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .with_context(|| format!("cannot open {}", p.display()))
    }
}

fn try_lock(file: &File, wait: bool) -> Result<bool> {
    crate::lockfile::try_lock(file, wait).context("cannot lock a cache slot")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_checked() {
        assert_eq!(
            CacheSpec::parse("target").unwrap().at,
            CachePath::Workdir("target".into())
        );
        assert_eq!(
            CacheSpec::parse("~/.cargo/registry").unwrap().at,
            CachePath::Home(".cargo/registry".into())
        );
        for bad in ["", "/abs", "../up", "a/../b", "~/", "~/../x", "./x"] {
            assert!(CacheSpec::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn two_leases_never_share_a_slot_and_a_freed_slot_is_reused() {
        let dir = tempfile::tempdir().unwrap();
        let slots = CacheSlots::new(
            dir.path().join("caches"),
            Path::new("/repo"),
            vec![CacheSpec::parse("target").unwrap()],
        );
        let a = slots.lease(true).unwrap();
        let b = slots.lease(true).unwrap();
        assert_eq!((a.slot, b.slot), (0, 1));
        assert_ne!(a.caches[0].volume, b.caches[0].volume);
        assert_ne!(a.caches[0].host_dir, b.caches[0].host_dir);
        let volume = a.caches[0].volume.clone();
        drop(a);
        let c = slots.lease(true).unwrap();
        assert_eq!(c.slot, 0);
        assert_eq!(c.caches[0].volume, volume, "the same slot gets the same, warm cache");
        assert!(volume.starts_with("cohort-cache-"), "{volume}");
    }
}
