//! Committing what an agent left in its checkout onto the task branch.

use anyhow::{Context, Result};

use super::checkout;
use super::pool::{Checkout, CLEAN_MARK};
use super::{refs, snapshot, tree_of, write_commit, Oid};

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
    let repo = checkout.open()?;
    // The agent may have switched branches; the task branch is what counts.
    refs::set_head_symbolic(&repo, branch_ref)?;
    let tip = refs::read(&repo, branch_ref)?.with_context(|| format!("task branch {branch_ref} is missing"))?;
    let tip_tree = tree_of(&repo, tip)?;
    let snap = snapshot::snapshot(&repo, tip_tree)?;
    let tip = if snap.tree != tip_tree {
        let commit = write_commit(&repo, snap.tree, &[tip], message)?;
        refs::cas(&repo, branch_ref, Some(tip), commit, "cohort: commit task")?;
        commit
    } else {
        tip
    };
    // The checkout now holds exactly the snapshot's tree: record that in
    // its index and mark it clean, so the next task moves it by a tree diff.
    let old = repo.index().ok();
    checkout::write_index(&repo, repo.index_from_tree(&snap.tree)?, old.as_ref().map(|i| &***i))?;
    std::fs::write(checkout.admin.join(CLEAN_MARK), snap.tree.to_string())?;
    let files_changed = snapshot::diff_paths(&repo, tree_of(&repo, base)?, tree_of(&repo, tip)?)?
        .into_iter()
        .map(|c| super::rela_path(c.path.as_ref()).display().to_string())
        .collect();
    Ok(TaskCommit { tip, files_changed })
}

/// The commit message for a task: subject plus trailers that tie the commit
/// to its run and task.
pub fn task_message(run_id: &str, index: usize, task: &str) -> String {
    format!("task {index:03}: {task}\n\nCohort-Run: {run_id}\nCohort-Task: {index:03}\n")
}
