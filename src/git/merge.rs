//! Merging a branch tip into another branch with a merge commit, moving the
//! target ref only by compare-and-swap.

use anyhow::Result;
use gix::bstr::ByteSlice;

use super::{is_ancestor, refs, write_commit, GitError, Oid};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MergeOutcome {
    /// A merge commit was written and the target ref now points at it.
    Merged { commit: Oid },
    /// `theirs` was already contained in the target; nothing moved. `merge`
    /// is the merge commit that brought it in, when one did (found on the
    /// target's first-parent line): after a crash between a merge and its
    /// record in the state DB, this is how the record is completed.
    AlreadyContained { merge: Option<Oid> },
    /// The merge has conflicts; nothing moved.
    Conflict { paths: Vec<String> },
}

/// The result of merging two commits in memory (objects are written, no ref
/// moves): a tree, or the conflicting paths.
pub fn merge_trees_of(repo: &gix::Repository, ours: Oid, theirs: Oid) -> Result<Result<Oid, Vec<String>>> {
    let options = repo.tree_merge_options()?;
    let labels = gix::merge::blob::builtin_driver::text::Labels {
        ancestor: Some("base".into()),
        current: Some("ours".into()),
        other: Some("theirs".into()),
    };
    let mut outcome = repo.merge_commits(ours, theirs, labels, options.into())?;
    let how = gix::merge::tree::TreatAsUnresolved::default();
    if outcome.tree_merge.has_unresolved_conflicts(how) {
        let mut paths: Vec<String> = outcome
            .tree_merge
            .conflicts
            .iter()
            .filter(|c| c.is_unresolved(how))
            .map(|c| c.ours.location().to_str_lossy().into_owned())
            .collect();
        paths.sort();
        paths.dedup();
        return Ok(Err(paths));
    }
    Ok(Ok(outcome.tree_merge.tree.write()?.detach()))
}

/// A merge made but not yet applied: the commit exists, the target ref has not moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Staged {
    /// `commit` merges `theirs` into `ours` (the target's tip when it was made); its tree is
    /// `tree`. [`advance`] moves the target to it if the tip is still `ours`.
    Ready {
        ours: Oid,
        commit: Oid,
        tree: Oid,
    },
    AlreadyContained {
        merge: Option<Oid>,
    },
    Conflict {
        paths: Vec<String>,
    },
}

/// Makes the merge commit of `theirs` into `target_ref`'s tip without moving anything, so
/// that the result can be checked before the branch moves (the merge train).
pub fn stage(repo: &gix::Repository, target_ref: &str, theirs: Oid, message: &str) -> Result<Staged> {
    let Some(ours) = refs::read(repo, target_ref)? else {
        anyhow::bail!("branch {target_ref} does not exist");
    };
    if is_ancestor(repo, theirs, ours)? {
        let merge = merge_commit_of(repo, ours, theirs)?;
        return Ok(Staged::AlreadyContained { merge });
    }
    let tree = match merge_trees_of(repo, ours, theirs)? {
        Ok(tree) => tree,
        Err(paths) => return Ok(Staged::Conflict { paths }),
    };
    let commit = write_commit(repo, tree, &[ours, theirs], message)?;
    Ok(Staged::Ready { ours, commit, tree })
}

/// Moves `target_ref` from `ours` to `commit` by compare-and-swap. `Ok(false)`: another
/// writer moved it meanwhile, and the merge must be staged again on the new tip.
pub fn advance(repo: &gix::Repository, target_ref: &str, ours: Oid, commit: Oid, message: &str) -> Result<bool> {
    match refs::cas(
        repo,
        target_ref,
        Some(ours),
        commit,
        message.lines().next().unwrap_or("merge"),
    ) {
        Ok(()) => Ok(true),
        Err(e) if matches!(e.downcast_ref::<GitError>(), Some(GitError::RefMoved { .. })) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Merges `theirs` into the branch `target_ref` with a merge commit whose
/// first parent is the branch's tip. If another writer moves the ref in the
/// meantime, the merge is redone on the new tip: no concurrent merge is lost.
pub fn merge_into(repo: &gix::Repository, target_ref: &str, theirs: Oid, message: &str) -> Result<MergeOutcome> {
    const ATTEMPTS: usize = 20;
    for _ in 0..ATTEMPTS {
        match stage(repo, target_ref, theirs, message)? {
            Staged::AlreadyContained { merge } => return Ok(MergeOutcome::AlreadyContained { merge }),
            Staged::Conflict { paths } => return Ok(MergeOutcome::Conflict { paths }),
            Staged::Ready { ours, commit, .. } => {
                if advance(repo, target_ref, ours, commit, message)? {
                    return Ok(MergeOutcome::Merged { commit });
                }
            }
        }
    }
    anyhow::bail!("{target_ref} kept moving during {ATTEMPTS} merge attempts; is another process writing to it?")
}

/// The commit on `tip`'s first-parent line that merged `theirs` (its second
/// parent), if there is one. Only called when `theirs` is known to be
/// contained, which is rare (a resume, or a task that changed nothing).
fn merge_commit_of(repo: &gix::Repository, tip: Oid, theirs: Oid) -> Result<Option<Oid>> {
    let mut cur = tip;
    for _ in 0..100_000 {
        let commit = repo.find_commit(cur)?;
        let parents: Vec<Oid> = commit.parent_ids().map(|p| p.detach()).collect();
        if parents.get(1) == Some(&theirs) {
            return Ok(Some(cur));
        }
        match parents.first() {
            Some(&p) => cur = p,
            None => break,
        }
    }
    Ok(None)
}
