//! Turning a pool checkout's files into a tree, and cohort's index of it into one that holds
//! that tree: the commit step's work on the checkout.
//!
//! cohort keeps its own index of each checkout in the checkout's admin dir, where the agent
//! cannot reach it; the agent's git has a copy in its private git dir. When the admin index is
//! the one cohort last wrote (its checksum is recorded), it holds the task's base tree with
//! fresh stat data, so only what the agent touched is hashed (see `status`). Only those
//! entries are written to the tree and updated in the index.

use std::path::Path;

use anyhow::{Context, Result};
use gix::bstr::{BStr, ByteSlice};
use gix::index::entry::{Flags, Mode};
use gix::objs::tree::EntryKind;
use gix::objs::Write;

use super::safefs::Dir;
use super::status::{self, Changes, Upsert};
use super::Oid;

/// A file in a checkout's admin dir: `<tree> <index checksum>`, the tree the index held when
/// cohort last wrote it, and that index's checksum.
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

/// What the agent changed in a checkout, before anything of it is written.
pub struct Compared {
    /// cohort's index of the checkout (at the task's base).
    index: gix::index::File,
    pub changes: Changes,
}

/// Compares the checkout at `root` with cohort's index of it, which holds `base`. Nothing is
/// written yet: what was found can still be refused (the secret scan) before any blob of it
/// reaches the object store.
pub fn compare(
    repo: &gix::Repository,
    admin: &Path,
    root: &Dir,
    base: Oid,
    settings: &mut status::Settings<'_>,
) -> Result<Compared> {
    let mut index: gix::index::File = (**repo.index_or_empty()?).clone();
    if recorded_tree(admin, &index) != Some(base) {
        // Not the index cohort wrote (a crash while writing it): without stat data every
        // file is hashed, which is slow but exact.
        tracing::debug!(admin = %admin.display(), "index not as recorded; hashing every file");
        index = repo.index_from_tree(&base)?;
    }
    let changes = status::compare(root, &index, settings)?;
    Ok(Compared { index, changes })
}

/// Writes the new blobs and the tree of a compared checkout (files over the size limit stay
/// out of it), and updates cohort's index to hold that tree. Returns the tree.
pub fn write(repo: &gix::Repository, admin: &Path, root: &Dir, base: Oid, compared: &Compared) -> Result<Oid> {
    let changes = &compared.changes;
    write_blobs(repo, root, &changes.upserts)?;
    let mut editor = repo.edit_tree(base)?;
    for path in &changes.removed {
        editor.remove(path.as_bstr())?;
    }
    // New entries after the removals: a tracked file that became a directory is removed
    // from the tree first, then the directory's files are added under its name.
    for u in &changes.upserts {
        editor.upsert(u.path.as_bstr(), kind_of(u.mode), u.id)?;
    }
    let tree = editor.write()?.detach();
    if tree == base && changes.refreshed.is_empty() {
        return Ok(tree);
    }
    let mut index = compared.index.clone();
    for (i, stat) in &changes.refreshed {
        index.entries_mut()[*i].stat = *stat;
    }
    let gone: std::collections::HashSet<&BStr> = changes.removed.iter().map(|p| p.as_bstr()).collect();
    index.remove_entries(|_, path, _| gone.contains(path));
    for u in &changes.upserts {
        match index.entry_index_by_path(u.path.as_bstr()) {
            Ok(i) => {
                let e = &mut index.entries_mut()[i];
                (e.id, e.mode, e.stat) = (u.id, u.mode, u.stat);
            }
            Err(_) => index.dangerously_push_entry(u.stat, u.id, Flags::empty(), u.mode, u.path.as_bstr()),
        }
    }
    index.sort_entries();
    index.remove_tree(); // never stale: cohort's index carries no tree cache
    index
        .write(gix::index::write::Options::default())
        .context("cannot write the index")?;
    record(admin, tree, index.checksum())?;
    Ok(tree)
}

/// Writes the blobs of new and changed files, streaming each file from the checkout again
/// (reached without symlinks) and checking it still hashes to what the status found.
fn write_blobs(repo: &gix::Repository, root: &Dir, upserts: &[Upsert]) -> Result<()> {
    for u in upserts {
        if repo.has_object(u.id) {
            continue;
        }
        let err = || format!("cannot store {}", u.path.to_str_lossy());
        let written = match &u.link {
            Some(target) => repo
                .objects
                .write_buf(gix::objs::Kind::Blob, target)
                .with_context(err)?,
            None => {
                let (file, st) = root
                    .open_beneath(super::rela_path(u.path.as_bstr()))
                    .with_context(err)?
                    .with_context(|| format!("{} went away while it was committed", u.path.to_str_lossy()))?;
                anyhow::ensure!(
                    st.st_size as u64 == u.size,
                    "{} changed while it was committed",
                    u.path.to_str_lossy()
                );
                let mut limited = std::io::Read::take(file, u.size);
                repo.objects
                    .write_stream(gix::objs::Kind::Blob, u.size, &mut limited)
                    .with_context(err)?
            }
        };
        anyhow::ensure!(
            written == u.id,
            "{} changed while it was committed",
            u.path.to_str_lossy()
        );
    }
    Ok(())
}

fn kind_of(mode: Mode) -> EntryKind {
    match mode {
        Mode::SYMLINK => EntryKind::Link,
        Mode::FILE_EXECUTABLE => EntryKind::BlobExecutable,
        _ => EntryKind::Blob,
    }
}
