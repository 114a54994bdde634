//! Writing and reading the entries of the protocol in a directory someone else may have
//! written: a worker's checkout (the agent's), the controller's checkout of a task (the
//! worker's result), a scratch directory. Every name is reached through directory
//! descriptors without following a symlink (`git::safefs`), so an entry can never write or
//! read outside the directory, whatever the other side left there.

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::{bail, Context, Result};
use rustix::fs::FileType;

use super::protocol::{check_path, Entry, EntryKind};
use crate::git::safefs::{Dir, Kind};

/// What writing an entry left: the file's stat data (for a worker's manifest), or nothing for
/// a removal.
pub struct Written {
    pub path: String,
    pub stat: Option<rustix::fs::Stat>,
}

/// Writes `entries` under `root`: removals first, then files and symlinks, making parent
/// directories as needed (whatever non-directory stands in a parent's place is removed).
pub fn apply(root: &Dir, entries: &[Entry]) -> Result<Vec<Written>> {
    let mut out = Vec::with_capacity(entries.len());
    for e in entries.iter().filter(|e| e.kind == EntryKind::Removed) {
        let path = check_path(&e.path).map_err(anyhow::Error::msg)?;
        let (dir, name) = parent_of(root, path, false)?;
        if let Some(dir) = dir {
            dir.remove(name).with_context(|| format!("cannot remove {}", e.path))?;
        }
        out.push(Written {
            path: e.path.clone(),
            stat: None,
        });
    }
    for e in entries.iter().filter(|e| e.kind != EntryKind::Removed) {
        let path = check_path(&e.path).map_err(anyhow::Error::msg)?;
        let (dir, name) = parent_of(root, path, true)?;
        let dir = dir.with_context(|| format!("cannot make the directory of {}", e.path))?;
        match &e.kind {
            EntryKind::File { executable, .. } => {
                let data = e.data().map_err(anyhow::Error::msg)?.unwrap_or_default();
                let mode = if *executable { 0o755 } else { 0o644 };
                // write_file keeps an existing file's mode: a mode change is a new file.
                if let Some(st) = dir.stat(name)? {
                    if st.st_mode & 0o111 != mode & 0o111
                        || FileType::from_raw_mode(st.st_mode) != FileType::RegularFile
                    {
                        dir.remove(name)?;
                    }
                }
                dir.write_file(name, &data, mode)
                    .with_context(|| format!("cannot write {}", e.path))?;
            }
            EntryKind::Symlink { target } => {
                dir.remove(name)?;
                rustix::fs::symlinkat(target.as_str(), dir.as_fd(), name)
                    .with_context(|| format!("cannot make the symlink {}", e.path))?;
            }
            EntryKind::Removed => {}
        }
        out.push(Written {
            path: e.path.clone(),
            stat: dir.stat(name)?,
        });
    }
    Ok(out)
}

/// The directory holding `path` (made when `make`), and the last component.
fn parent_of<'p>(root: &Dir, path: &'p Path, make: bool) -> Result<(Option<Dir>, &'p OsStr)> {
    let name = path.file_name().context("an empty path")?;
    let mut dir = root.try_clone()?;
    if let Some(parent) = path.parent() {
        for comp in parent.components() {
            let comp = comp.as_os_str();
            dir = match (dir.sub(comp)?, make) {
                (Some(d), _) => d,
                (None, true) => dir.make_dir(comp)?,
                (None, false) => return Ok((None, name)),
            };
        }
    }
    Ok((Some(dir), name))
}

/// Every file and symlink under `root` as entries (a scratch directory going to the other
/// side), skipping anything else; at most `cap` bytes in all.
pub fn read_all(root: &Dir, cap: u64) -> Result<Vec<Entry>> {
    struct All {
        out: Vec<Entry>,
        total: u64,
        cap: u64,
    }
    impl Visitor for All {
        fn visit(&mut self, dir: &Dir, rel: &str, name: &OsStr, kind: Kind) -> Result<bool> {
            if kind == Kind::Dir {
                return Ok(true);
            }
            if let Some(e) = read_entry(dir, rel, name, kind)? {
                self.total += e.payload_len() as u64;
                if self.total > self.cap {
                    bail!("more than {} bytes in the directory; it is not sent", self.cap);
                }
                self.out.push(e);
            }
            Ok(false)
        }
    }
    let mut all = All {
        out: Vec::new(),
        total: 0,
        cap,
    };
    walk(root, "", &mut all)?;
    Ok(all.out)
}

/// One name as an entry: a file's bytes and executable bit, or a symlink's target.
pub fn read_entry(dir: &Dir, rel: &str, name: &OsStr, kind: Kind) -> Result<Option<Entry>> {
    Ok(match kind {
        Kind::File => match dir.open_file(name)? {
            Some((mut file, st)) => {
                let mut data = Vec::with_capacity(st.st_size as usize);
                file.read_to_end(&mut data)?;
                Some(Entry::file(rel, &data, st.st_mode & 0o100 != 0))
            }
            None => None,
        },
        Kind::Symlink => Some(Entry {
            path: rel.to_string(),
            kind: EntryKind::Symlink {
                target: String::from_utf8(dir.read_link(name)?)
                    .with_context(|| format!("{rel}: a symlink whose target is not UTF-8"))?,
            },
        }),
        _ => None,
    })
}

/// What a [`walk`] shows its caller.
pub trait Visitor {
    /// The walk is about to read directory `dir` (`prefix` is its path with a trailing `/`,
    /// empty at the root).
    fn enter(&mut self, _dir: &Dir, _prefix: &str) -> Result<()> {
        Ok(())
    }
    /// An entry of `dir`, named `name`, at `rel`; for a directory, whether to walk into it.
    fn visit(&mut self, dir: &Dir, rel: &str, name: &OsStr, kind: Kind) -> Result<bool>;
}

/// Walks `root` top-down in one pass, never entering a `.git` and never following a
/// symlink. Names that are not UTF-8 are refused: the protocol carries text.
pub fn walk(root: &Dir, prefix: &str, visitor: &mut dyn Visitor) -> Result<()> {
    visitor.enter(root, prefix)?;
    for (name, kind) in root.entries()? {
        if name.as_bytes() == b".git" {
            continue;
        }
        let Some(text) = name.to_str() else {
            bail!("{prefix}{}: a file name that is not UTF-8", name.to_string_lossy());
        };
        let rel = format!("{prefix}{text}");
        if visitor.visit(root, &rel, &name, kind)? && kind == Kind::Dir {
            if let Some(sub) = root.sub(&name)? {
                walk(&sub, &format!("{rel}/"), visitor)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_writes_removes_and_never_follows_a_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let root_path = tmp.path().join("root");
        std::fs::create_dir(&root_path).unwrap();
        std::os::unix::fs::symlink(outside.path(), root_path.join("link")).unwrap();
        std::fs::write(root_path.join("gone.txt"), "x").unwrap();
        let root = Dir::open(&root_path).unwrap();
        let entries = vec![
            Entry::file("a/b/c.txt", b"hello", false),
            Entry::file("run.sh", b"#!/bin/sh\n", true),
            Entry::file("link/escape.txt", b"no", false),
            Entry {
                path: "gone.txt".into(),
                kind: EntryKind::Removed,
            },
            Entry {
                path: "ln".into(),
                kind: EntryKind::Symlink { target: "a/b".into() },
            },
        ];
        apply(&root, &entries).unwrap();
        assert_eq!(std::fs::read(root_path.join("a/b/c.txt")).unwrap(), b"hello");
        assert!(!root_path.join("gone.txt").exists());
        // The symlink named as a parent was replaced by a directory; nothing went outside.
        assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none());
        assert!(root_path.join("link").is_dir());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(root_path.join("run.sh"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o111, 0o111);
        let mut back = read_all(&root, 1 << 20).unwrap();
        back.sort_by(|a, b| a.path.cmp(&b.path));
        let paths: Vec<_> = back.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["a/b/c.txt", "link/escape.txt", "ln", "run.sh"]);
        assert!(read_all(&root, 3).is_err());
        let bad = [Entry::file("../x", b"", false)];
        assert!(apply(&root, &bad).is_err());
    }
}
