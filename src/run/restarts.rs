//! Restarts, retries and calibration in the state DB: why a task started again from the
//! service tip, where `cohort retry` began its new attempts, the agent's conversation to
//! continue, and the template calibration revised.

use anyhow::Result;
use rusqlite::{params, OptionalExtension};

use super::state::State;

impl State {
    /// Why the task's latest attempt was restarted from the service tip, if one was: its merge
    /// conflicted (`conflict`, the paths) or its merge result failed the verify command
    /// (`merge-failed`, the failure). The restart happens once, also across a crash and
    /// `resume`; `cohort retry` starts the count anew (attempts before its `retry` event
    /// do not count).
    pub fn last_restart(&self, run_id: &str, idx: usize) -> Result<Option<(String, String)>> {
        Ok(self
            .conn
            .query_row(
                "SELECT status, COALESCE(reason, '') FROM attempts WHERE run_id = ?1 AND idx = ?2 \
                 AND status IN ('conflict', 'merge-failed') AND n > COALESCE((SELECT MAX(attempt) FROM events \
                 WHERE run_id = ?1 AND idx = ?2 AND kind = 'retry'), 0) ORDER BY n DESC LIMIT 1",
                params![run_id, idx],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }

    /// `cohort retry`: the task is pending again, and its earlier restarts no longer count
    /// (the `retry` event marks where its new attempts begin).
    pub fn mark_retry(&self, run_id: &str, idx: usize) -> Result<()> {
        let attempts: u32 = self.conn.query_row(
            "SELECT attempts FROM tasks WHERE run_id = ?1 AND idx = ?2",
            params![run_id, idx],
            |r| r.get(0),
        )?;
        self.event(run_id, idx, attempts, "retry", "{}")?;
        self.conn.execute(
            "UPDATE tasks SET status = 'pending', reason = 'retried', merge_commit = NULL, ended_at = NULL \
             WHERE run_id = ?1 AND idx = ?2",
            params![run_id, idx],
        )?;
        Ok(())
    }

    /// The run's prompt template from now on (calibration revised it).
    pub fn set_template(&self, id: &str, template: &str) -> Result<()> {
        self.conn
            .execute("UPDATE runs SET template = ?2 WHERE id = ?1", params![id, template])?;
        Ok(())
    }

    /// The run's calibration, if its template was revised: `{before, after}`.
    pub fn calibration(&self, run_id: &str) -> Result<Option<serde_json::Value>> {
        Ok(self
            .events_of(run_id, "calibration")?
            .into_iter()
            .map(|(_, v)| v)
            .next_back())
    }

    /// A finished run is worked on again (`cohort retry`).
    pub fn reopen_run(&self, id: &str) -> Result<()> {
        self.conn.execute(
            "UPDATE runs SET status = 'running', finished_at = NULL WHERE id = ?1",
            params![id],
        )?;
        Ok(())
    }

    /// The conversation the agent of one attempt reported (codex's thread id), if any.
    pub fn thread_of(&self, run_id: &str, idx: usize, attempt: u32) -> Result<Option<String>> {
        let mut stmt = self.conn.prepare(
            "SELECT data FROM events WHERE run_id = ?1 AND idx = ?2 AND attempt = ?3 AND kind = 'agent' ORDER BY id",
        )?;
        let mut thread = None;
        for data in stmt.query_map(params![run_id, idx, attempt], |r| r.get::<_, String>(0))? {
            let v: serde_json::Value = serde_json::from_str(&data?).unwrap_or_default();
            if v["kind"] == "thread" {
                thread = v["id"].as_str().map(String::from);
            }
        }
        Ok(thread)
    }
}
