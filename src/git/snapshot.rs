//! "Everything in the working tree, as a tree object": the `git add -A`
//! step, done in-process. Used for the user's snapshot commit and for
//! committing what an agent did in its checkout.

use std::path::Path;

use anyhow::{Context, Result};
use gix::bstr::{BString, ByteSlice};
use gix::objs::tree::EntryKind;
use gix::status::index_worktree::Item as WorktreeItem;
use gix::status::plumbing::index_as_worktree::{Change, EntryStatus};
use gix::status::{tree_index::TrackRenames, Item, UntrackedFiles};

use super::Oid;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changed {
    pub path: BString,
    pub kind: ChangeKind,
    /// What the path holds afterwards (`None` when deleted).
    pub new: Option<(Oid, EntryKind)>,
}

#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The tree holding the working tree's content (ignored files excluded).
    pub tree: Oid,
    /// Paths whose content differs from `base`, sorted.
    pub changed: Vec<Changed>,
}

/// Builds the tree of the working tree of `repo`, starting from the tree
/// `base` (the HEAD tree), applying staged changes and then every worktree
/// change: modified, deleted, and untracked files that are not ignored.
/// Writes blobs and trees, moves no ref and leaves the index alone.
pub fn snapshot(repo: &gix::Repository, base: Oid) -> Result<Snapshot> {
    plan(repo, base)?.write(repo)
}

/// One step of building the snapshot tree, in the order they are applied.
#[derive(Debug, Clone)]
enum Edit {
    /// A staged entry: its blob is already in the object store.
    Staged {
        path: BString,
        kind: EntryKind,
        id: Oid,
    },
    Remove(BString),
    /// Whatever the path holds on disk (a file, a symlink, or nothing).
    FromDisk(BString),
}

/// A snapshot worked out from the status, before anything is written: what
/// a secret scan must look at comes from here, so a refused file's content
/// never becomes a blob (task checkouts share the object store).
#[derive(Debug, Clone)]
pub struct SnapshotPlan {
    base: Oid,
    edits: Vec<Edit>,
}

/// Computes what [`snapshot`] would do, reading the status only: no object
/// is written.
pub fn plan(repo: &gix::Repository, base: Oid) -> Result<SnapshotPlan> {
    let items: Vec<Item> = repo
        .status(gix::progress::Discard)?
        .head_tree(base)
        .untracked_files(UntrackedFiles::Files)
        .index_worktree_rewrites(None)
        .index_worktree_submodules(None)
        .tree_index_track_renames(TrackRenames::Disabled)
        .into_iter(None)?
        .collect::<Result<_, _>>()
        .context("cannot compute the status of the working tree")?;

    let mut edits = Vec::new();
    // Staged changes first; the working tree wins where both touch a path.
    for item in &items {
        if let Item::TreeIndex(change) = item {
            use gix::diff::index::ChangeRef;
            let staged = |location: &gix::bstr::BStr, mode: gix::index::entry::Mode, id: &gix::oid| {
                mode.to_tree_entry_mode().map(|m| Edit::Staged {
                    path: location.to_owned(),
                    kind: m.kind(),
                    id: id.to_owned(),
                })
            };
            match change {
                ChangeRef::Addition {
                    location,
                    entry_mode,
                    id,
                    ..
                }
                | ChangeRef::Modification {
                    location,
                    entry_mode,
                    id,
                    ..
                } => edits.extend(staged(location.as_ref(), *entry_mode, id.as_ref())),
                ChangeRef::Deletion { location, .. } => edits.push(Edit::Remove(location.as_ref().to_owned())),
                ChangeRef::Rewrite {
                    source_location,
                    location,
                    entry_mode,
                    id,
                    ..
                } => {
                    edits.push(Edit::Remove(source_location.as_ref().to_owned()));
                    edits.extend(staged(location.as_ref(), *entry_mode, id.as_ref()));
                }
            }
        }
    }
    for item in &items {
        let Item::IndexWorktree(item) = item else {
            continue;
        };
        match item {
            WorktreeItem::Modification { rela_path, status, .. } => match status {
                EntryStatus::Change(Change::Removed) => edits.push(Edit::Remove(rela_path.clone())),
                EntryStatus::Change(Change::Modification { .. } | Change::Type { .. })
                | EntryStatus::Conflict { .. }
                | EntryStatus::IntentToAdd => edits.push(Edit::FromDisk(rela_path.clone())),
                EntryStatus::Change(Change::SubmoduleModification(_)) | EntryStatus::NeedsUpdate(_) => {}
            },
            WorktreeItem::DirectoryContents { .. } => {}
            WorktreeItem::Rewrite { .. } => unreachable!("rewrite tracking is disabled"),
        }
    }
    // Untracked files last: a tracked file that became a directory is removed above, and its
    // path with it, so the directory's files must come after (the status may list them first).
    for item in &items {
        if let Item::IndexWorktree(WorktreeItem::DirectoryContents { entry, .. }) = item {
            if entry.status == gix::dir::entry::Status::Untracked {
                edits.push(Edit::FromDisk(entry.rela_path.clone()));
            }
        }
    }
    Ok(SnapshotPlan { base, edits })
}

impl SnapshotPlan {
    /// The paths whose new content the snapshot would take from the index
    /// or the working tree, sorted: what a secret scan must look at. A path
    /// the last step removes is not listed; one whose content turns out to
    /// equal the base may be (the scan errs on the side of looking).
    pub fn paths_to_scan(&self) -> Vec<BString> {
        let mut last: std::collections::BTreeMap<&BString, bool> = Default::default();
        for e in &self.edits {
            match e {
                Edit::Staged { path, .. } | Edit::FromDisk(path) => last.insert(path, true),
                Edit::Remove(path) => last.insert(path, false),
            };
        }
        last.into_iter()
            .filter(|(_, kept)| *kept)
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// Writes the blobs and trees: the snapshot.
    pub fn write(self, repo: &gix::Repository) -> Result<Snapshot> {
        let workdir = repo
            .workdir()
            .context("the repository has no working tree")?
            .to_path_buf();
        let mut editor = repo.edit_tree(self.base)?;
        for e in &self.edits {
            match e {
                Edit::Staged { path, kind, id } => {
                    editor.upsert(path.as_bstr(), *kind, *id)?;
                }
                Edit::Remove(path) => {
                    editor.remove(path.as_bstr())?;
                }
                Edit::FromDisk(path) => add_from_disk(repo, &mut editor, &workdir, path.as_bstr())?,
            }
        }
        let tree = editor.write()?.detach();
        let changed = diff_paths(repo, self.base, tree)?;
        Ok(Snapshot { tree, changed })
    }
}

/// Reads one file (or symlink) from disk into a blob and records it in the
/// tree; a path that is gone or is a directory is removed from it.
fn add_from_disk(
    repo: &gix::Repository,
    editor: &mut gix::object::tree::Editor<'_>,
    workdir: &Path,
    rela: &gix::bstr::BStr,
) -> Result<()> {
    let path = workdir.join(super::rela_path(rela));
    let meta = match std::fs::symlink_metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            editor.remove(rela)?;
            return Ok(());
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let (kind, bytes) = if meta.file_type().is_symlink() {
        let target = std::fs::read_link(&path)?;
        (
            EntryKind::Link,
            std::os::unix::ffi::OsStrExt::as_bytes(target.as_os_str()).to_vec(),
        )
    } else if meta.is_file() {
        use std::os::unix::fs::PermissionsExt;
        let exec = meta.permissions().mode() & 0o111 != 0;
        let kind = if exec {
            EntryKind::BlobExecutable
        } else {
            EntryKind::Blob
        };
        (
            kind,
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?,
        )
    } else {
        // A directory: a tracked file replaced by one (its files are added as untracked), or
        // an untracked nested repository, which is not ours to record.
        editor.remove(rela)?;
        return Ok(());
    };
    let id = repo.write_blob(&bytes)?.detach();
    editor.upsert(rela, kind, id)?;
    Ok(())
}

/// The paths (files, not directories) that differ between two trees, with
/// what happened to them, sorted. A tree diff: unchanged subtrees are
/// skipped by hash, so this is cheap when little changed.
pub fn diff_paths(repo: &gix::Repository, from: Oid, to: Oid) -> Result<Vec<Changed>> {
    use gix::object::tree::diff::ChangeDetached as C;
    if from == to {
        return Ok(Vec::new());
    }
    let (old, new) = (repo.find_tree(from)?, repo.find_tree(to)?);
    let changes = repo.diff_tree_to_tree(&old, &new, gix::diff::Options::default())?;
    let mut out = Vec::new();
    for c in changes {
        let path = c.location().to_owned();
        let now_tree = c.entry_mode().is_tree();
        let (mode, id) = c.entry_mode_and_id();
        let new = Some((id.to_owned(), mode.kind()));
        let (kind, new) = match &c {
            C::Addition { .. } | C::Rewrite { .. } if !now_tree => (ChangeKind::Added, new),
            C::Deletion { .. } if !now_tree => (ChangeKind::Deleted, None),
            C::Modification {
                previous_entry_mode, ..
            } => match (previous_entry_mode.is_tree(), now_tree) {
                (false, false) => (ChangeKind::Modified, new),
                (false, true) => (ChangeKind::Deleted, None),
                (true, false) => (ChangeKind::Added, new),
                (true, true) => continue,
            },
            _ => continue,
        };
        out.push(Changed { path, kind, new });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out.dedup_by(|a, b| a.path == b.path);
    Ok(out)
}
