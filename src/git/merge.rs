//! Merging a branch tip into another branch with a merge commit, moving the
//! target ref only by compare-and-swap.

use anyhow::Result;
use gix::bstr::ByteSlice;

use super::{is_ancestor, refs, write_commit, GitError, Oid};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MergeOutcome {
    /// A merge commit was written and the target ref now points at it.
    Merged { commit: Oid },
    /// `theirs` was already contained in the target; nothing moved.
    AlreadyContained,
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

/// Merges `theirs` into the branch `target_ref` with a merge commit whose
/// first parent is the branch's tip. If another writer moves the ref in the
/// meantime, the merge is redone on the new tip: no concurrent merge is lost.
pub fn merge_into(repo: &gix::Repository, target_ref: &str, theirs: Oid, message: &str) -> Result<MergeOutcome> {
    const ATTEMPTS: usize = 20;
    for _ in 0..ATTEMPTS {
        let Some(ours) = refs::read(repo, target_ref)? else {
            anyhow::bail!("branch {target_ref} does not exist");
        };
        if is_ancestor(repo, theirs, ours)? {
            return Ok(MergeOutcome::AlreadyContained);
        }
        let tree = match merge_trees_of(repo, ours, theirs)? {
            Ok(tree) => tree,
            Err(paths) => return Ok(MergeOutcome::Conflict { paths }),
        };
        let commit = write_commit(repo, tree, &[ours, theirs], message)?;
        match refs::cas(
            repo,
            target_ref,
            Some(ours),
            commit,
            message.lines().next().unwrap_or("merge"),
        ) {
            Ok(()) => return Ok(MergeOutcome::Merged { commit }),
            Err(e) if matches!(e.downcast_ref::<GitError>(), Some(GitError::RefMoved { .. })) => continue,
            Err(e) => return Err(e),
        }
    }
    anyhow::bail!("{target_ref} kept moving during {ATTEMPTS} merge attempts; is another process writing to it?")
}
