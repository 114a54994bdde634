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
        let mut scan = Scan {
            manifest: &self.manifest,
            ignore: gix::ignore::Search::default(),
            ignored_dirs: Vec::new(),
            contents,
            seen: BTreeSet::new(),
            out: Vec::new(),
        };
        files::walk(&root, "", &mut scan)?;
        let (seen, mut out) = (scan.seen, scan.out);
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

/// One walk of the checkout against the manifest. Each directory's `.gitignore` is read as
/// the walk enters it (parents before children, as git layers them); an ignored directory
/// is not entered, unless cohort wrote files below it.
struct Scan<'m> {
    manifest: &'m BTreeMap<String, Known>,
    ignore: gix::ignore::Search,
    /// Ignored directories entered because cohort wrote files below them (`a/b/`).
    ignored_dirs: Vec<String>,
    contents: bool,
    seen: BTreeSet<String>,
    out: Vec<Entry>,
}

impl Scan<'_> {
    /// As git sees an untracked path: ignored by a pattern, or inside an ignored directory.
    fn ignored(&self, rel: &str, is_dir: bool) -> bool {
        self.ignored_dirs.iter().any(|d| rel.starts_with(d.as_str())) || ignored(&self.ignore, rel, is_dir)
    }

    fn tracked_under(&self, prefix: &str) -> bool {
        self.manifest
            .range(prefix.to_string()..)
            .next()
            .is_some_and(|(k, _)| k.starts_with(prefix))
    }
}

impl files::Visitor for Scan<'_> {
    fn enter(&mut self, dir: &Dir, prefix: &str) -> Result<()> {
        // Only a regular file of at most 1 MiB counts, as before (a symlink is not followed).
        if let Some(bytes) = dir.read_small(OsStr::new(".gitignore"), 1 << 20)? {
            let source = format!("{prefix}.gitignore");
            self.ignore
                .add_patterns_buffer(&bytes, source, Some(Path::new("")), Default::default())?;
        }
        Ok(())
    }

    fn visit(&mut self, dir: &Dir, rel: &str, name: &OsStr, kind: Kind) -> Result<bool> {
        let known = self.manifest.get(rel);
        if kind == Kind::Dir {
            if !self.ignored(rel, true) {
                return Ok(true);
            }
            let prefix = format!("{rel}/");
            let enter = self.tracked_under(&prefix);
            if enter {
                // Entered for cohort's files only: anything else below is ignored too.
                self.ignored_dirs.push(prefix);
            }
            return Ok(enter);
        }
        if known.is_none() && self.ignored(rel, false) {
            return Ok(false);
        }
        self.seen.insert(rel.to_string());
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
        self.out.push(if self.contents {
            entry
        } else {
            Entry {
                path: rel.to_string(),
                kind: EntryKind::Removed,
            }
        });
        Ok(false)
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

fn ignored(search: &gix::ignore::Search, rel: &str, is_dir: bool) -> bool {
    search
        .pattern_matching_relative_path(
            rel.as_bytes().as_bstr(),
            Some(is_dir),
            gix::glob::pattern::Case::Sensitive,
        )
        .is_some_and(|m| m.kind == gix::ignore::Kind::Expendable)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(changes: Vec<Entry>) -> Job {
        Job {
            lease: String::new(),
            run_id: "r".into(),
            task: 1,
            role: "agent".into(),
            tree: "t1".into(),
            reset: false,
            changes,
            scratch: Vec::new(),
            program: "true".into(),
            args: Vec::new(),
            env: Vec::new(),
            secret_env: Vec::new(),
            stdin: None,
            timeout_secs: None,
            caches: Vec::new(),
            gateway: None,
            heartbeat_secs: 2,
        }
    }

    fn paths(entries: &[Entry]) -> Vec<(String, bool)> {
        let mut v: Vec<(String, bool)> = entries
            .iter()
            .map(|e| (e.path.clone(), e.kind == EntryKind::Removed))
            .collect();
        v.sort();
        v
    }

    /// One walk reads each `.gitignore` as it enters its directory: the root's and a
    /// subdirectory's both apply, an ignored directory is skipped unless cohort wrote files
    /// below it, and only what differs from the manifest comes back.
    #[test]
    fn scan_sends_what_changed_and_skips_what_git_ignores() {
        let tmp = tempfile::tempdir().unwrap();
        let mut slot = Slot::new(&tmp.path().join("checkout")).unwrap();
        slot.apply(&job(vec![
            Entry::file(".gitignore", b"build/\n*.log\n", false),
            Entry::file("src/.gitignore", b"gen.rs\n", false),
            Entry::file("src/lib.rs", b"fn a() {}\n", false),
            Entry::file("build/kept.txt", b"tracked under an ignored dir\n", false),
            Entry::file("gone.txt", b"x\n", false),
        ]))
        .unwrap();
        assert!(slot.scan(true).unwrap().is_empty(), "nothing changed yet");

        let root = tmp.path().join("checkout");
        std::fs::write(root.join("src/lib.rs"), "fn b() {}\n").unwrap();
        std::fs::write(root.join("src/gen.rs"), "ignored by src/.gitignore").unwrap();
        std::fs::write(root.join("src/new.rs"), "new").unwrap();
        std::fs::write(root.join("run.log"), "ignored by the root's").unwrap();
        // Untracked in an ignored directory that cohort entered for its own file: ignored,
        // as git says.
        std::fs::write(root.join("build/out.o"), "ignored dir, untracked").unwrap();
        std::fs::create_dir_all(root.join("build/sub")).unwrap();
        std::fs::write(root.join("build/sub/deeper.o"), "also ignored").unwrap();
        std::fs::write(root.join("build/kept.txt"), "changed").unwrap();
        std::fs::create_dir_all(root.join("target/deep")).unwrap();
        // `*` covers the directory's own .gitignore too, as in git.
        std::fs::write(root.join("target/.gitignore"), "*\n").unwrap();
        std::fs::write(root.join("target/deep/x"), "ignored by target/.gitignore").unwrap();
        std::fs::remove_file(root.join("gone.txt")).unwrap();

        let changed = slot.scan(true).unwrap();
        assert_eq!(
            paths(&changed),
            vec![
                ("build/kept.txt".into(), false),
                ("gone.txt".into(), true),
                ("src/lib.rs".into(), false),
                ("src/new.rs".into(), false),
            ]
        );
        assert_eq!(
            slot.state().dirty,
            vec!["build/kept.txt", "gone.txt", "src/lib.rs", "src/new.rs"]
        );
    }
}
