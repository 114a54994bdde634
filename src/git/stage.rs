//! Committing a pool checkout by updating its index in place: the fast
//! path of [`super::commit::commit_all`].
//!
//! Rebuilding the index from the new tree and re-reading stat data for
//! every file costs a tree traversal and a few thousand `lstat`s per task
//! on a large repository. When the checkout's index is exactly the one
//! cohort last wrote (its checksum says so), the index holds a known tree,
//! so the worktree status alone says what the agent changed: only those
//! entries are hashed, written to the tree and updated in the index, and
//! their stat data comes from the open file (`fstat`), not another lookup.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{Context, Result};
use gix::bstr::{BStr, BString, ByteSlice};
use gix::index::entry::{Flags, Mode, Stat};
use gix::objs::tree::EntryKind;
use gix::status::index_worktree::Item as WorktreeItem;
use gix::status::plumbing::index_as_worktree::{Change, EntryStatus};
use gix::status::UntrackedFiles;

use super::Oid;

/// A file in a checkout's private git dir: `<tree> <index checksum>`, the
/// tree the index held when cohort last wrote it, and that index's checksum.
pub const INDEX_RECORD: &str = "cohort-index";

/// Remembers that the index just written (with `checksum`) holds `tree` exactly.
pub fn record(admin: &Path, tree: Oid, checksum: Option<Oid>) -> Result<()> {
    let path = admin.join(INDEX_RECORD);
    match checksum {
        Some(sum) => std::fs::write(&path, format!("{tree} {sum}\n"))?,
        None => {
            let _ = std::fs::remove_file(&path);
        }
    }
    Ok(())
}

/// The tree the current index holds, if it is still the index cohort wrote.
pub fn recorded_tree(admin: &Path, index: &gix::index::File) -> Option<Oid> {
    let text = std::fs::read_to_string(admin.join(INDEX_RECORD)).ok()?;
    let (tree, sum) = text.trim().split_once(' ')?;
    let sum: Oid = sum.parse().ok()?;
    (index.checksum() == Some(sum)).then(|| tree.parse().ok()).flatten()
}

/// The working tree of `repo` as a tree, plus the index updated to hold it
/// (written, with fresh stat data for what changed), or `None` when the
/// index is not the one cohort recorded for `base` (the agent ran `git add`,
/// `git commit`, `git status`...): then the caller takes the slow path.
pub fn stage_all(repo: &gix::Repository, admin: &Path, base: Oid) -> Result<Option<Oid>> {
    let current = repo.index_or_empty()?;
    if recorded_tree(admin, &current) != Some(base) {
        return Ok(None);
    }
    let workdir = repo
        .workdir()
        .context("the checkout has no working tree")?
        .to_path_buf();
    // Ignored entries are listed too (whole directories as one), to be
    // removed: a pool checkout goes to the next task with nothing in it but
    // its tree, or a file an agent ignored could reach a later task's commit
    // once a `.gitignore` no longer covers it.
    let mut iter = repo
        .status(gix::progress::Discard)?
        .untracked_files(UntrackedFiles::Files)
        .dirwalk_options(|o| o.emit_ignored(Some(gix::dir::walk::EmissionMode::CollapseDirectory)))
        .index_worktree_rewrites(None)
        .index_worktree_submodules(None)
        .into_index_worktree_iter(None)?;
    let mut items = Vec::new();
    for item in iter.by_ref() {
        items.push(item.context("cannot compute the status of a checkout")?);
    }
    // The status ran against the index it loaded itself; that is the one
    // to update, and it must still be the recorded one.
    let outcome = iter.into_outcome().context("the status did not finish")?;
    let mut index: gix::index::File = match &outcome.worktree_index {
        gix::worktree::IndexPersistedOrInMemory::Persisted(i) => (***i).clone(),
        gix::worktree::IndexPersistedOrInMemory::InMemory(i) => i.clone(),
    };
    if index.checksum() != current.checksum() {
        return Ok(None);
    }

    let mut editor = repo.edit_tree(base)?;
    let mut removed = vec![false; index.entries().len()];
    let mut added: Vec<(BString, Oid, Mode, Stat)> = Vec::new();
    let mut touched = false;
    let mut ignored = Vec::new();
    for item in items {
        match item {
            WorktreeItem::Modification {
                entry_index,
                rela_path,
                status,
                ..
            } => match status {
                // Same content, newer stat data (a racily clean file).
                EntryStatus::NeedsUpdate(stat) => {
                    index.entries_mut()[entry_index].stat = stat;
                    touched = true;
                }
                EntryStatus::Change(Change::Removed) => {
                    editor.remove(rela_path.as_bstr())?;
                    removed[entry_index] = true;
                }
                EntryStatus::Change(Change::Modification { .. } | Change::Type { .. }) => {
                    match read_from_disk(repo, &workdir, rela_path.as_bstr())? {
                        Some((id, mode, stat)) => {
                            editor.upsert(rela_path.as_bstr(), kind_of(mode), id)?;
                            let e = &mut index.entries_mut()[entry_index];
                            (e.id, e.mode, e.stat) = (id, mode, stat);
                        }
                        None => {
                            // Gone or now a directory: its files show up as untracked.
                            editor.remove(rela_path.as_bstr())?;
                            removed[entry_index] = true;
                        }
                    }
                }
                EntryStatus::Change(Change::SubmoduleModification(_)) => {}
                // cohort never writes conflicts or intent-to-add entries.
                EntryStatus::Conflict { .. } | EntryStatus::IntentToAdd => return Ok(None),
            },
            WorktreeItem::DirectoryContents { entry, .. } => {
                if matches!(entry.status, gix::dir::entry::Status::Ignored(_)) {
                    ignored.push(entry.rela_path);
                    continue;
                }
                if entry.status != gix::dir::entry::Status::Untracked {
                    continue;
                }
                if let Some((id, mode, stat)) = read_from_disk(repo, &workdir, entry.rela_path.as_bstr())? {
                    added.push((entry.rela_path, id, mode, stat));
                }
            }
            WorktreeItem::Rewrite { .. } => unreachable!("rewrite tracking is disabled"),
        }
    }
    // New files after the removals: a tracked file that became a directory is removed from
    // the tree, and its path with it, so the directory's files must come afterwards (the
    // status may list them first).
    for (path, id, mode, _) in &added {
        editor.upsert(path.as_bstr(), kind_of(*mode), *id)?;
    }
    for path in &ignored {
        super::checkout::remove_path(&workdir, path.as_bstr())?;
    }
    let tree = editor.write()?.detach();
    if tree == base && !touched {
        return Ok(Some(tree)); // nothing changed; the index stays as it is
    }
    index.remove_entries(|i, _, _| removed.get(i).copied().unwrap_or(false));
    for (path, id, mode, stat) in &added {
        index.dangerously_push_entry(*stat, *id, Flags::empty(), *mode, path.as_bstr());
    }
    index.sort_entries();
    index.remove_tree(); // never stale: cohort's index carries no tree cache
    index
        .write(gix::index::write::Options::default())
        .context("cannot write the index")?;
    record(admin, tree, index.checksum())?;
    Ok(Some(tree))
}

fn kind_of(mode: Mode) -> EntryKind {
    match mode {
        Mode::SYMLINK => EntryKind::Link,
        Mode::FILE_EXECUTABLE => EntryKind::BlobExecutable,
        _ => EntryKind::Blob,
    }
}

/// Hashes one file or symlink into the object store. Stat data is taken
/// before the content is read, so a later write shows up as a change.
/// `None` when the path is gone or is not a file (a directory, a nested
/// repository).
fn read_from_disk(repo: &gix::Repository, workdir: &Path, rela: &BStr) -> Result<Option<(Oid, Mode, Stat)>> {
    let path = workdir.join(super::rela_path(rela));
    let err = || format!("cannot read {}", path.display());
    let meta = match gix::index::fs::Metadata::from_path_no_follow(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(err),
    };
    let (mode, bytes, meta) = if meta.is_symlink() {
        let target = std::fs::read_link(&path).with_context(err)?;
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(target.as_os_str()).to_vec();
        (Mode::SYMLINK, bytes, meta)
    } else if meta.is_file() {
        let mut file = match open_no_follow(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(err),
        };
        let meta = gix::index::fs::Metadata::from_file(&file).with_context(err)?;
        if !meta.is_file() {
            return Ok(None);
        }
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        file.read_to_end(&mut bytes).with_context(err)?;
        let mode = if meta.is_executable() {
            Mode::FILE_EXECUTABLE
        } else {
            Mode::FILE
        };
        (mode, bytes, meta)
    } else {
        return Ok(None);
    };
    let id = repo.write_blob(&bytes)?.detach();
    let stat = Stat::from_fs(&meta).with_context(err)?;
    Ok(Some((id, mode, stat)))
}

/// Opens a file for reading without following a symlink that replaced it
/// after it was looked at.
fn open_no_follow(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}
