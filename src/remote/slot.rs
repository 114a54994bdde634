//! A worker's checkout, kept between jobs: a plain directory (no git dir; the agent gets none
//! on a worker) and a manifest of what cohort wrote there, with stat data. After a command
//! it is compared with the manifest, as git compares a worktree with its index: a file
//! whose stat data is unchanged is not read; one that changed is hashed. What differs is
//! sent back (an agent) and named as dirty, so the next job rewrites exactly those paths.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use gix::bstr::ByteSlice;

use super::files::{self, Written};
use super::protocol::{Entry, EntryKind, Job, SlotState};
use crate::git::safefs::{Dir, Kind};

#[derive(Debug, Clone, PartialEq, Eq)]
struct Known {
    id: gix::ObjectId,
    kind: Kind,
    executable: bool,
    stat: (i64, i64, i64, u64, u64),
}

fn stat_key(st: &rustix::fs::Stat) -> (i64, i64, i64, u64, u64) {
    (st.st_size, st.st_mtime, st.st_mtime_nsec as i64, st.st_ino, st.st_dev)
}

fn blob_id(data: &[u8]) -> Result<gix::ObjectId> {
    Ok(gix::objs::compute_hash(
        gix::hash::Kind::Sha1,
        gix::objs::Kind::Blob,
        data,
    )?)
}

pub struct Slot {
    root: PathBuf,
    manifest: BTreeMap<String, Known>,
    tree: Option<String>,
    dirty: BTreeSet<String>,
}

impl Slot {
    /// An empty checkout at `root` (what is there is removed at the first job).
    pub fn new(root: &Path) -> Result<Slot> {
        std::fs::create_dir_all(root).with_context(|| format!("cannot create {}", root.display()))?;
        Ok(Slot {
            root: root.to_path_buf(),
            manifest: BTreeMap::new(),
            tree: None,
            dirty: BTreeSet::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    pub fn state(&self) -> SlotState {
        SlotState {
            tree: self.tree.clone(),
            dirty: self.dirty.iter().cloned().collect(),
        }
    }

    /// Makes the checkout hold the job's tree.
    pub fn apply(&mut self, job: &Job) -> Result<()> {
        let root = Dir::open(&self.root)?;
        if job.reset || self.tree.is_none() {
            for (name, _) in root.entries()? {
                root.remove(&name)?;
            }
            self.manifest.clear();
        }
        // Forget the old tree first: a failure half-way leaves a checkout nobody vouches for.
        self.tree = None;
        let by_path: std::collections::HashMap<&str, &Entry> =
            job.changes.iter().map(|e| (e.path.as_str(), e)).collect();
        for w in files::apply(&root, &job.changes)? {
            self.forget(&w.path);
            if let Some(known) = known_of(&w, by_path.get(w.path.as_str()).copied())? {
                self.manifest.insert(w.path, known);
            }
        }
        self.tree = Some(job.tree.clone());
        self.dirty.clear();
        Ok(())
    }

    fn forget(&mut self, path: &str) {
        self.manifest.remove(path);
        let prefix = format!("{path}/");
        let under: Vec<String> = self
            .manifest
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, _)| k.clone())
            .collect();
        for k in under {
            self.manifest.remove(&k);
        }
    }

    /// What differs from the job's tree now, as entries (with contents when `contents`), and
    /// remembers those paths as dirty. Untracked paths git would ignore (`.gitignore`) are
    /// neither sent nor dirty, as a local collect leaves them.
    pub fn scan(&mut self, contents: bool) -> Result<Vec<Entry>> {
        let root = Dir::open(&self.root)?;
        let ignore = ignores(&root)?;
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        let manifest = &self.manifest;
        let tracked_under = |prefix: &str| {
            manifest
                .range(prefix.to_string()..)
                .next()
                .is_some_and(|(k, _)| k.starts_with(prefix))
        };
        scan_dir(
            &root,
            "",
            &mut |dir, rel, name, kind| {
                let known = manifest.get(rel);
                if known.is_none() && ignored(&ignore, rel, kind == Kind::Dir) {
                    return Ok(false);
                }
                if kind == Kind::Dir {
                    return Ok(true);
                }
                seen.insert(rel.to_string());
                let st = dir.stat(name)?;
                if let (Some(k), Some(st)) = (known, &st) {
                    if k.stat == stat_key(st) && kind == k.kind {
                        return Ok(false);
                    }
                }
                let Some(entry) = files::read_entry(dir, rel, name, kind)? else {
                    return Ok(false); // a FIFO or device: nothing git keeps
                };
                if let Some(k) = known {
                    if same(&entry, k)? {
                        return Ok(false);
                    }
                }
                out.push(if contents {
                    entry
                } else {
                    Entry {
                        path: rel.to_string(),
                        kind: EntryKind::Removed,
                    }
                });
                Ok(false)
            },
            &tracked_under,
        )?;
        for path in self.manifest.keys().filter(|k| !seen.contains(*k)) {
            out.push(Entry {
                path: path.clone(),
                kind: EntryKind::Removed,
            });
        }
        self.dirty = out.iter().map(|e| e.path.clone()).collect();
        Ok(out)
    }
}

fn same(entry: &Entry, k: &Known) -> Result<bool> {
    Ok(match &entry.kind {
        EntryKind::File { executable, .. } => {
            let data = entry.data().map_err(anyhow::Error::msg)?.unwrap_or_default();
            k.kind == Kind::File && *executable == k.executable && blob_id(&data)? == k.id
        }
        EntryKind::Symlink { target } => k.kind == Kind::Symlink && blob_id(target.as_bytes())? == k.id,
        EntryKind::Removed => false,
    })
}

/// The manifest entry for what was just written.
fn known_of(w: &Written, entry: Option<&Entry>) -> Result<Option<Known>> {
    let (Some(st), Some(entry)) = (&w.stat, entry) else {
        return Ok(None);
    };
    Ok(Some(match &entry.kind {
        EntryKind::File { executable, .. } => Known {
            id: blob_id(&entry.data().map_err(anyhow::Error::msg)?.unwrap_or_default())?,
            kind: Kind::File,
            executable: *executable,
            stat: stat_key(st),
        },
        EntryKind::Symlink { target } => Known {
            id: blob_id(target.as_bytes())?,
            kind: Kind::Symlink,
            executable: false,
            stat: stat_key(st),
        },
        EntryKind::Removed => return Ok(None),
    }))
}

/// Walks `dir`; `visit` returns whether to enter a directory. Never enters `.git`. A
/// directory with tracked files below is always entered.
fn scan_dir(
    dir: &Dir,
    prefix: &str,
    visit: &mut dyn FnMut(&Dir, &str, &OsStr, Kind) -> Result<bool>,
    tracked_under: &dyn Fn(&str) -> bool,
) -> Result<()> {
    for (name, kind) in dir.entries()? {
        if name.as_encoded_bytes() == b".git" {
            continue;
        }
        let Some(text) = name.to_str() else {
            anyhow::bail!("{prefix}{}: a file name that is not UTF-8", name.to_string_lossy());
        };
        let rel = format!("{prefix}{text}");
        let enter = visit(dir, &rel, &name, kind)? || (kind == Kind::Dir && tracked_under(&format!("{rel}/")));
        if enter && kind == Kind::Dir {
            if let Some(sub) = dir.sub(&name)? {
                scan_dir(&sub, &format!("{rel}/"), visit, tracked_under)?;
            }
        }
    }
    Ok(())
}

/// Every `.gitignore` in the checkout, each applying below its own directory.
fn ignores(root: &Dir) -> Result<gix::ignore::Search> {
    let mut search = gix::ignore::Search::default();
    let mut found = Vec::new();
    files::walk(root, "", &mut |dir, rel, name, kind| {
        if kind == Kind::File && name == ".gitignore" {
            if let Some(bytes) = dir.read_small(name, 1 << 20)? {
                found.push((rel.to_string(), bytes));
            }
        }
        Ok(())
    })?;
    for (rel, bytes) in found {
        search.add_patterns_buffer(&bytes, rel, Some(Path::new("")), Default::default())?;
    }
    Ok(search)
}

fn ignored(search: &gix::ignore::Search, rel: &str, is_dir: bool) -> bool {
    search
        .pattern_matching_relative_path(
            rel.as_bytes().as_bstr(),
            Some(is_dir),
            gix::glob::pattern::Case::Sensitive,
        )
        .is_some_and(|m| m.kind == gix::ignore::Kind::Expendable)
}
