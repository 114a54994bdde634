//! What turns a worker's checkout into a job's tree: the tree diff from what it holds, plus
//! the paths it says changed since. A worker that keeps its checkout between jobs is sent
//! only the difference, as the local pool moves a checkout by tree diff.

use std::collections::BTreeSet;

use anyhow::{Context, Result};
use gix::bstr::{BStr, ByteSlice};
use gix::objs::tree::EntryKind as GitKind;

use super::protocol::{Entry, EntryKind, SlotState};
use crate::git::Oid;

/// The entries that make a checkout in `slot`'s state hold exactly `to`, and whether the
/// worker must empty its checkout first (it names a tree this repository does not have).
pub fn changes_for(repo: &gix::Repository, slot: &SlotState, to: Oid) -> Result<(Vec<Entry>, bool)> {
    let from = slot
        .tree
        .as_deref()
        .and_then(|t| t.parse::<Oid>().ok())
        .filter(|t| repo.find_tree(*t).is_ok());
    let mut target = repo
        .find_tree(to)
        .with_context(|| format!("the job's tree {to} is missing"))?;
    let Some(from) = from else {
        let mut out = Vec::new();
        subtree(repo, &target, "", &mut out)?;
        return Ok((out, true));
    };
    let mut paths: BTreeSet<String> = crate::git::snapshot::diff_paths(repo, from, to)?
        .into_iter()
        .map(|c| c.path.to_str_lossy().into_owned())
        .collect();
    paths.extend(slot.dirty.iter().cloned());
    let mut out = Vec::new();
    for path in paths {
        match target.peel_to_entry_by_path(path.as_str())? {
            None => out.push(Entry {
                path,
                kind: EntryKind::Removed,
            }),
            Some(e) => push_entry(repo, &path, e.mode().kind(), e.object_id(), &mut out)?,
        }
    }
    Ok((out, false))
}

fn push_entry(repo: &gix::Repository, path: &str, kind: GitKind, id: Oid, out: &mut Vec<Entry>) -> Result<()> {
    match kind {
        GitKind::Blob | GitKind::BlobExecutable => {
            let blob = repo.find_blob(id)?;
            out.push(Entry::file(path, &blob.data, kind == GitKind::BlobExecutable));
        }
        GitKind::Link => {
            let blob = repo.find_blob(id)?;
            out.push(Entry {
                path: path.to_string(),
                kind: EntryKind::Symlink {
                    target: blob.data.to_str_lossy().into_owned(),
                },
            });
        }
        // A path the worker changed that is a directory here: all of it.
        GitKind::Tree => subtree(repo, &repo.find_tree(id)?, &format!("{path}/"), out)?,
        GitKind::Commit => {} // a submodule: nothing to write, as in a local checkout
    }
    Ok(())
}

fn subtree(repo: &gix::Repository, tree: &gix::Tree<'_>, prefix: &str, out: &mut Vec<Entry>) -> Result<()> {
    for e in tree.iter() {
        let e = e?;
        let name: &BStr = e.filename();
        let path = format!("{prefix}{}", name.to_str_lossy());
        push_entry(repo, &path, e.mode().kind(), e.object_id(), out)?;
    }
    Ok(())
}
