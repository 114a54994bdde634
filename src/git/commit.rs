//! Committing what an agent left in its checkout onto the task branch.

use anyhow::{Context, Result};

use super::checkout;
use super::pool::{Checkout, CLEAN_MARK};
use super::{is_ancestor, refs, snapshot, stage, tree_of, write_commit, Oid};

#[derive(Debug, Clone)]
pub struct TaskCommit {
    /// The task branch's tip after the commit.
    pub tip: Oid,
    /// Files that differ between the task's base and `tip`.
    pub files_changed: Vec<String>,
}

impl TaskCommit {
    pub fn is_empty(&self) -> bool {
        self.files_changed.is_empty()
    }
}

/// Commits every change in `checkout` (tracked, deleted and untracked files,
/// honouring .gitignore) on top of the task branch. Commits the agent made
/// itself are kept: the branch tip, wherever the agent moved it, is the parent.
pub fn commit_all(checkout: &Checkout, branch_ref: &str, base: Oid, message: &str) -> Result<TaskCommit> {
    checkout.clear_leftovers(branch_ref, false)?;
    let repo = checkout.open()?;
    let mut tip = refs::read(&repo, branch_ref)?.with_context(|| format!("task branch {branch_ref} is missing"))?;
    // The agent may have committed on a detached HEAD or another branch:
    // when that builds on the task branch, the task branch takes it.
    if let Some(head) = agent_head(&repo, branch_ref) {
        if head != tip && is_ancestor(&repo, tip, head)? {
            refs::cas(&repo, branch_ref, Some(tip), head, "cohort: take the agent's commits")?;
            tip = head;
        }
    }
    // The task branch is what counts.
    refs::set_head_symbolic(&repo, branch_ref)?;
    let tip_tree = tree_of(&repo, tip)?;
    // Usually the index is the one cohort wrote and only what the agent
    // touched is looked at; otherwise the tree is built from a full status
    // and the index rebuilt from it. Either way the checkout then holds
    // exactly `tree` in its files and index.
    let tree = match stage::stage_all(&repo, &checkout.admin, tip_tree)? {
        Some(tree) => tree,
        None => {
            tracing::debug!(checkout = %checkout.path.display(), "index changed by the agent; full status");
            let snap = snapshot::snapshot(&repo, tip_tree)?;
            checkout::remove_ignored(&repo)?;
            let old = repo.index().ok();
            let from_tree = repo.index_from_tree(&snap.tree)?;
            let index = checkout::write_index(&repo, from_tree, old.as_ref().map(|i| &***i), &Default::default())?;
            stage::record(&checkout.admin, snap.tree, index.checksum())?;
            snap.tree
        }
    };
    let tip = if tree != tip_tree {
        let commit = write_commit(&repo, tree, &[tip], message)?;
        refs::cas(&repo, branch_ref, Some(tip), commit, "cohort: commit task")?;
        commit
    } else {
        tip
    };
    // Mark it clean, so the next task moves it by a tree diff.
    std::fs::write(checkout.admin.join(CLEAN_MARK), tree.to_string())?;
    let files_changed = snapshot::diff_paths(&repo, tree_of(&repo, base)?, tree_of(&repo, tip)?)?
        .into_iter()
        .map(|c| super::rela_path(c.path.as_ref()).display().to_string())
        .collect();
    Ok(TaskCommit { tip, files_changed })
}

/// The commit the checkout's HEAD points to when it is not the task branch
/// (detached, or another branch), if any.
fn agent_head(repo: &gix::Repository, branch_ref: &str) -> Option<Oid> {
    let head = repo.head().ok()?;
    if head.referent_name().is_some_and(|n| n.as_bstr() == branch_ref) {
        return None;
    }
    head.id().map(|id| id.detach())
}

/// The commit message for a task: subject plus trailers that tie the commit
/// to its run and task.
pub fn task_message(run_id: &str, index: usize, task: &str) -> String {
    format!("task {index:03}: {task}\n\nCohort-Run: {run_id}\nCohort-Task: {index:03}\n")
}
