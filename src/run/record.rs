//! Where one task attempt stands, written to the state DB and the progress display in one
//! place, so the phases of a task's life need not pass `(run_id, index)` to both at every
//! step. Each outcome is one transaction: a crash between its writes would leave, say, an
//! unchanged task as committed, which `resume` would then merge.

use std::sync::MutexGuard;

use anyhow::Result;

use super::state::{AttemptEnd, State, TaskStatus};
use super::task::Shared;
use super::Engine;

/// One attempt of one task.
pub(super) struct Record<'a> {
    e: &'a Engine,
    s: &'a Shared,
    pub idx: usize,
    pub attempt: u32,
}

impl<'a> Record<'a> {
    pub fn new(e: &'a Engine, s: &'a Shared, idx: usize, attempt: u32) -> Record<'a> {
        Record { e, s, idx, attempt }
    }

    fn state(&self) -> Result<MutexGuard<'a, State>> {
        self.e.state()
    }

    pub fn run_id(&self) -> &str {
        &self.s.run_id
    }

    pub fn started(&self, base: &str, task: &str) -> Result<()> {
        self.state()?
            .start_attempt(self.run_id(), self.idx, self.attempt, base)?;
        self.s.progress.task_started(self.idx, task, self.attempt);
        Ok(())
    }

    /// An event the agent reported (JSON), and its one-line summary for the display.
    pub fn event(&self, summary: &str, data: &str) -> Result<()> {
        self.s.progress.task_action(self.idx, summary);
        self.state()?
            .event(self.run_id(), self.idx, self.attempt, "agent", data)
    }

    /// The remote worker the attempt's agent runs on (`cohort status` shows it).
    pub fn placed(&self, worker: &str) -> Result<()> {
        self.s.progress.task_action(self.idx, &format!("on worker {worker}"));
        let data = serde_json::json!({ "worker": worker }).to_string();
        self.state()?
            .event(self.run_id(), self.idx, self.attempt, "placed", &data)
    }

    /// Stopped by Ctrl-C or SIGTERM before anything was committed: `resume` redoes it.
    pub fn interrupted(&self) -> Result<()> {
        self.state()?.atomically(|st| {
            let end = AttemptEnd {
                status: "interrupted",
                reason: Some("interrupted".into()),
                ..Default::default()
            };
            st.end_attempt(self.run_id(), self.idx, self.attempt, &end)?;
            st.set_status(self.run_id(), self.idx, TaskStatus::Pending, None, Some("interrupted"))
        })?;
        self.s.progress.task_finished(self.idx, "interrupted", "");
        Ok(())
    }

    /// Failed; what it changed is committed on its branch (`commit`, when it changed anything).
    pub fn failed(
        &self,
        tip: &str,
        commit: Option<&str>,
        files: &[String],
        code: Option<i32>,
        reason: &str,
    ) -> Result<()> {
        self.unmerged(TaskStatus::Failed, tip, commit, files, code, reason)
    }

    /// Its change held secrets: nothing of it was committed or merged.
    pub fn secret(&self, tip: &str, code: Option<i32>, reason: &str) -> Result<()> {
        self.unmerged(TaskStatus::Secret, tip, None, &[], code, reason)
    }

    /// It ran into its budget (or the run's): committed on its branch, not merged.
    pub fn over_budget(
        &self,
        tip: &str,
        commit: Option<&str>,
        files: &[String],
        code: Option<i32>,
        reason: &str,
    ) -> Result<()> {
        self.unmerged(TaskStatus::OverBudget, tip, commit, files, code, reason)
    }

    /// The task ends as `status` without a merge; its attempt with it.
    fn unmerged(
        &self,
        status: TaskStatus,
        tip: &str,
        commit: Option<&str>,
        files: &[String],
        code: Option<i32>,
        reason: &str,
    ) -> Result<()> {
        self.state()?.atomically(|st| {
            let end = AttemptEnd {
                status: status.as_str(),
                tip_commit: Some(tip.to_string()),
                exit_code: code,
                reason: Some(reason.to_string()),
            };
            st.end_attempt(self.run_id(), self.idx, self.attempt, &end)?;
            st.set_ended(self.run_id(), self.idx, status, commit, files, code, reason)
        })?;
        self.s.progress.task_finished(self.idx, status.as_str(), reason);
        Ok(())
    }

    pub fn unchanged(&self, tip: &str, code: Option<i32>) -> Result<()> {
        self.state()?.atomically(|st| {
            let end = AttemptEnd {
                status: "unchanged",
                tip_commit: Some(tip.to_string()),
                exit_code: code,
                reason: None,
            };
            st.end_attempt(self.run_id(), self.idx, self.attempt, &end)?;
            st.set_committed(self.run_id(), self.idx, tip, &[], code)?;
            st.set_status(
                self.run_id(),
                self.idx,
                TaskStatus::Unchanged,
                None,
                Some("the agent changed nothing"),
            )
        })?;
        self.s
            .progress
            .task_finished(self.idx, "unchanged", "the agent changed nothing");
        Ok(())
    }

    pub fn committed(&self, tip: &str, files: &[String], code: Option<i32>) -> Result<()> {
        self.state()?.atomically(|st| {
            let end = AttemptEnd {
                status: "committed",
                tip_commit: Some(tip.to_string()),
                exit_code: code,
                reason: None,
            };
            st.end_attempt(self.run_id(), self.idx, self.attempt, &end)?;
            st.set_committed(self.run_id(), self.idx, tip, files, code)
        })
    }

    /// Merged into the service branch (`merge`: the merge commit, when there is one).
    pub fn merged(&self, merge: Option<&str>, detail: &str) -> Result<()> {
        self.state()?
            .set_status(self.run_id(), self.idx, TaskStatus::Merged, merge, None)?;
        self.s.progress.task_finished(self.idx, "merged", detail);
        Ok(())
    }

    /// This attempt's merge conflicted in `paths`.
    pub fn conflicted(&self, paths: &[String]) -> Result<()> {
        let end = AttemptEnd {
            status: "conflict",
            reason: Some(paths.join(", ")),
            ..Default::default()
        };
        self.state()?.end_attempt(self.run_id(), self.idx, self.attempt, &end)
    }

    /// The task ends as a conflict; its branch is kept.
    pub fn conflict(&self, paths: &[String]) -> Result<()> {
        let reason = format!("conflicts in: {}", paths.join(", "));
        self.state()?
            .set_status(self.run_id(), self.idx, TaskStatus::Conflict, None, Some(&reason))?;
        self.s
            .progress
            .task_finished(self.idx, "conflict (branch kept)", &reason);
        Ok(())
    }

    /// The task starts again from the new service tip: the display says why.
    pub fn restarting(&self, why: &super::task::Restart) {
        let (status, detail) = match why {
            super::task::Restart::Conflict(paths) => {
                ("conflicted, retrying from the new service tip", paths.join(", "))
            }
            super::task::Restart::MergeFailed(_) => (
                "merge result failed verification, retrying from the new service tip",
                String::new(),
            ),
        };
        self.s.progress.task_finished(self.idx, status, &detail);
    }

    /// The verify command runs on the task's commit (`round` 0 is the agent's first result).
    pub fn verifying(&self, round: u32) {
        let what = match round {
            0 => "verifying".to_string(),
            n => format!("verifying again (round {n})"),
        };
        self.s.progress.task_action(self.idx, &what);
    }

    /// The verify command runs on the merge result before the service branch moves.
    pub fn verifying_merge(&self, commit: crate::git::Oid) {
        let what = format!("verifying the merge {}", crate::git::short(commit));
        self.s.progress.task_action(self.idx, &what);
    }

    /// The verify command failed; the agent gets the failure back (round `n` of `of`).
    pub fn feedback_round(&self, n: u32, of: u32) {
        let what = format!("verify failed; the agent gets the failure back (round {n} of {of})");
        self.s.progress.task_action(self.idx, &what);
    }

    /// The task ends unverified: its work stays committed on its branch, not merged.
    pub fn unverified(&self, reason: &str) -> Result<()> {
        self.state()?.atomically(|st| {
            let end = AttemptEnd {
                status: "unverified",
                reason: Some(reason.to_string()),
                ..Default::default()
            };
            st.end_attempt(self.run_id(), self.idx, self.attempt, &end)?;
            st.set_status(self.run_id(), self.idx, TaskStatus::Unverified, None, Some(reason))
        })?;
        self.s
            .progress
            .task_finished(self.idx, "unverified (branch kept)", reason);
        Ok(())
    }

    /// This attempt's merge result failed the verify command (the task alone passed).
    pub fn merge_failed(&self, failure: &str) -> Result<()> {
        let end = AttemptEnd {
            status: "merge-failed",
            reason: Some(failure.to_string()),
            ..Default::default()
        };
        self.state()?.end_attempt(self.run_id(), self.idx, self.attempt, &end)
    }

    /// Stopping between a conflict (or a failed merge result) and the task's restart: the
    /// restart is left to `resume`.
    pub fn retry_left_to_resume(&self) -> Result<()> {
        self.state()?.set_status(
            self.run_id(),
            self.idx,
            TaskStatus::Pending,
            None,
            Some("interrupted before its restart from the new service tip"),
        )
    }
}
