//! The state DB: runs, tasks, attempts and events, in SQLite (WAL) under
//! the repository's git dir.
//!
//! Every state change is its own committed write, made before the next step
//! starts, so a `kill -9` at any moment loses at most the step in flight.
//! Secrets never reach this file: nothing here takes a `Secret`.

use std::path::Path;

use anyhow::{Context, Result};
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    created_at TEXT NOT NULL,
    finished_at TEXT,
    status TEXT NOT NULL,
    service_branch TEXT NOT NULL,
    base_commit TEXT,
    template TEXT NOT NULL,
    options TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tasks (
    run_id TEXT NOT NULL REFERENCES runs(id),
    idx INTEGER NOT NULL,
    text TEXT NOT NULL,
    branch TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    base_commit TEXT,
    task_commit TEXT,
    merge_commit TEXT,
    files_changed TEXT,
    exit_code INTEGER,
    reason TEXT,
    started_at TEXT,
    ended_at TEXT,
    PRIMARY KEY (run_id, idx)
);
CREATE TABLE IF NOT EXISTS attempts (
    run_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    n INTEGER NOT NULL,
    status TEXT NOT NULL,
    base_commit TEXT,
    tip_commit TEXT,
    exit_code INTEGER,
    reason TEXT,
    started_at TEXT NOT NULL,
    ended_at TEXT,
    PRIMARY KEY (run_id, idx, n)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    at TEXT NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL
);
";

/// Where a task stands. `Committed` means its work is on the task branch
/// but not yet merged: a resume merges it without running the agent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskStatus {
    Pending,
    Running,
    Committed,
    Merged,
    Unchanged,
    Failed,
    Conflict,
    /// Its change held a secret: not committed, not merged.
    Secret,
    /// It ran into its budget (or the run's): committed on its branch, not merged.
    #[serde(rename = "over budget")]
    OverBudget,
    /// Its work never passed the verify command (alone, or merged): committed on its
    /// branch, not merged.
    Unverified,
}

impl TaskStatus {
    /// Every status, in display order.
    pub const ALL: [TaskStatus; 10] = [
        TaskStatus::Pending,
        TaskStatus::Running,
        TaskStatus::Committed,
        TaskStatus::Merged,
        TaskStatus::Unchanged,
        TaskStatus::Failed,
        TaskStatus::Conflict,
        TaskStatus::Secret,
        TaskStatus::OverBudget,
        TaskStatus::Unverified,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Pending => "pending",
            TaskStatus::Running => "running",
            TaskStatus::Committed => "committed",
            TaskStatus::Merged => "merged",
            TaskStatus::Unchanged => "unchanged",
            TaskStatus::Failed => "failed",
            TaskStatus::Conflict => "conflict",
            TaskStatus::Secret => "secret",
            TaskStatus::OverBudget => "over budget",
            TaskStatus::Unverified => "unverified",
        }
    }

    pub fn parse(s: &str) -> TaskStatus {
        match s {
            "running" => TaskStatus::Running,
            "committed" => TaskStatus::Committed,
            "merged" => TaskStatus::Merged,
            "unchanged" => TaskStatus::Unchanged,
            "failed" => TaskStatus::Failed,
            "conflict" => TaskStatus::Conflict,
            "secret" => TaskStatus::Secret,
            "over budget" => TaskStatus::OverBudget,
            "unverified" => TaskStatus::Unverified,
            _ => TaskStatus::Pending,
        }
    }

    /// Final states: a resume leaves these alone.
    pub fn is_done(self) -> bool {
        matches!(
            self,
            TaskStatus::Merged
                | TaskStatus::Unchanged
                | TaskStatus::Failed
                | TaskStatus::Conflict
                | TaskStatus::Secret
                | TaskStatus::Unverified
        )
    }

    pub fn is_success(self) -> bool {
        matches!(self, TaskStatus::Merged | TaskStatus::Unchanged)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RunRow {
    pub id: String,
    pub created_at: String,
    pub finished_at: Option<String>,
    pub status: String,
    pub service_branch: String,
    pub base_commit: Option<String>,
    #[serde(skip)]
    pub template: String,
    #[serde(skip)]
    pub options: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct TaskRow {
    pub index: usize,
    pub text: String,
    pub branch: String,
    pub status: TaskStatus,
    pub attempts: u32,
    pub base_commit: Option<String>,
    pub task_commit: Option<String>,
    pub merge_commit: Option<String>,
    pub files_changed: Vec<String>,
    pub exit_code: Option<i32>,
    pub reason: Option<String>,
    pub started_at: Option<String>,
    pub ended_at: Option<String>,
}

/// What the model gateway counted for a task: tokens, requests, refused destinations.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GatewayTotals {
    pub input: u64,
    pub cached_input: u64,
    pub output: u64,
    pub requests: u64,
    pub refused: u64,
}

/// What ended an attempt, as recorded.
#[derive(Debug, Clone, Default)]
pub struct AttemptEnd {
    pub status: &'static str,
    pub tip_commit: Option<String>,
    pub exit_code: Option<i32>,
    pub reason: Option<String>,
}

pub struct State {
    pub(super) conn: Connection,
}

/// What the agent of one task reported in total.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AgentTotals {
    pub thread_id: Option<String>,
    pub input: u64,
    pub cached_input: u64,
    pub output: u64,
}

pub fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

impl State {
    pub fn open(path: &Path) -> Result<State> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let conn = Connection::open(path).with_context(|| format!("cannot open state DB {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.execute_batch(SCHEMA)?;
        conn.execute_batch(super::verifies::SCHEMA)?;
        Ok(State { conn })
    }

    pub fn create_run(
        &self,
        id: &str,
        service_branch: &str,
        template: &str,
        options: &str,
        tasks: &[(String, String)],
    ) -> Result<()> {
        let tx = self.conn.unchecked_transaction()?;
        tx.execute(
            "INSERT INTO runs (id, created_at, status, service_branch, template, options) VALUES (?1, ?2, 'running', ?3, ?4, ?5)",
            params![id, now(), service_branch, template, options],
        )?;
        for (i, (text, branch)) in tasks.iter().enumerate() {
            tx.execute(
                "INSERT INTO tasks (run_id, idx, text, branch, status) VALUES (?1, ?2, ?3, ?4, 'pending')",
                params![id, i + 1, text, branch],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn set_run_base(&self, id: &str, base: &str) -> Result<()> {
        self.conn
            .execute("UPDATE runs SET base_commit = ?2 WHERE id = ?1", params![id, base])?;
        Ok(())
    }

    pub fn finish_run(&self, id: &str, status: &str) -> Result<()> {
        self.conn.execute(
            "UPDATE runs SET status = ?2, finished_at = ?3 WHERE id = ?1",
            params![id, status, now()],
        )?;
        Ok(())
    }

    pub fn run(&self, id: Option<&str>) -> Result<Option<RunRow>> {
        let sql =
            "SELECT id, created_at, finished_at, status, service_branch, base_commit, template, options FROM runs";
        let map = |r: &rusqlite::Row<'_>| {
            Ok(RunRow {
                id: r.get(0)?,
                created_at: r.get(1)?,
                finished_at: r.get(2)?,
                status: r.get(3)?,
                service_branch: r.get(4)?,
                base_commit: r.get(5)?,
                template: r.get(6)?,
                options: r.get(7)?,
            })
        };
        Ok(match id {
            Some(id) => self
                .conn
                .query_row(&format!("{sql} WHERE id = ?1"), [id], map)
                .optional()?,
            None => self
                .conn
                .query_row(&format!("{sql} ORDER BY created_at DESC, id DESC LIMIT 1"), [], map)
                .optional()?,
        })
    }

    /// Every run, newest first.
    pub fn runs(&self) -> Result<Vec<RunRow>> {
        let ids: Vec<String> = self
            .conn
            .prepare("SELECT id FROM runs ORDER BY created_at DESC, id DESC")?
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        let mut out = Vec::new();
        for id in ids {
            out.extend(self.run(Some(&id))?);
        }
        Ok(out)
    }

    pub fn tasks(&self, run_id: &str) -> Result<Vec<TaskRow>> {
        let mut stmt = self.conn.prepare(
            "SELECT idx, text, branch, status, attempts, base_commit, task_commit, merge_commit, files_changed, \
             exit_code, reason, started_at, ended_at FROM tasks WHERE run_id = ?1 ORDER BY idx",
        )?;
        let rows = stmt.query_map([run_id], |r| {
            let files: Option<String> = r.get(8)?;
            Ok(TaskRow {
                index: r.get::<_, i64>(0)? as usize,
                text: r.get(1)?,
                branch: r.get(2)?,
                status: TaskStatus::parse(&r.get::<_, String>(3)?),
                attempts: r.get(4)?,
                base_commit: r.get(5)?,
                task_commit: r.get(6)?,
                merge_commit: r.get(7)?,
                files_changed: files.and_then(|f| serde_json::from_str(&f).ok()).unwrap_or_default(),
                exit_code: r.get(9)?,
                reason: r.get(10)?,
                started_at: r.get(11)?,
                ended_at: r.get(12)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Runs `f`'s writes as one transaction: all of them, or none after a crash.
    pub fn atomically<T>(&self, f: impl FnOnce(&State) -> Result<T>) -> Result<T> {
        let tx = self.conn.unchecked_transaction()?;
        let out = f(self)?;
        tx.commit()?;
        Ok(out)
    }

    /// Starts attempt `n` of a task and marks the task running.
    pub fn start_attempt(&self, run_id: &str, idx: usize, n: u32, base: &str) -> Result<()> {
        let tx = self.conn.unchecked_transaction()?;
        let at = now();
        tx.execute(
            "INSERT OR REPLACE INTO attempts (run_id, idx, n, status, base_commit, started_at) VALUES (?1, ?2, ?3, 'running', ?4, ?5)",
            params![run_id, idx, n, base, at],
        )?;
        tx.execute(
            "UPDATE tasks SET status = 'running', attempts = ?3, base_commit = ?4, started_at = COALESCE(started_at, ?5), \
             task_commit = NULL, reason = NULL, exit_code = NULL WHERE run_id = ?1 AND idx = ?2",
            params![run_id, idx, n, base, at],
        )?;
        tx.commit()?;
        Ok(())
    }

    pub fn end_attempt(&self, run_id: &str, idx: usize, n: u32, end: &AttemptEnd) -> Result<()> {
        self.conn.execute(
            "UPDATE attempts SET status = ?4, tip_commit = ?5, exit_code = ?6, reason = ?7, ended_at = ?8 \
             WHERE run_id = ?1 AND idx = ?2 AND n = ?3",
            params![
                run_id,
                idx,
                n,
                end.status,
                end.tip_commit,
                end.exit_code,
                end.reason,
                now()
            ],
        )?;
        Ok(())
    }

    /// Records the task's commit on its branch (status `committed`), before
    /// the merge is attempted.
    pub fn set_committed(
        &self,
        run_id: &str,
        idx: usize,
        commit: &str,
        files: &[String],
        exit_code: Option<i32>,
    ) -> Result<()> {
        self.conn.execute(
            "UPDATE tasks SET status = 'committed', task_commit = ?3, files_changed = ?4, exit_code = ?5 WHERE run_id = ?1 AND idx = ?2",
            params![run_id, idx, commit, serde_json::to_string(files)?, exit_code],
        )?;
        Ok(())
    }

    /// Sets a task's final (or reset) status.
    pub fn set_status(
        &self,
        run_id: &str,
        idx: usize,
        status: TaskStatus,
        merge: Option<&str>,
        reason: Option<&str>,
    ) -> Result<()> {
        let ended = status.is_done().then(now);
        self.conn.execute(
            "UPDATE tasks SET status = ?3, merge_commit = COALESCE(?4, merge_commit), reason = ?5, ended_at = ?6 \
             WHERE run_id = ?1 AND idx = ?2",
            params![run_id, idx, status.as_str(), merge, reason, ended],
        )?;
        Ok(())
    }

    pub fn set_failure(
        &self,
        run_id: &str,
        idx: usize,
        commit: Option<&str>,
        files: &[String],
        exit_code: Option<i32>,
        reason: &str,
    ) -> Result<()> {
        self.set_ended(run_id, idx, TaskStatus::Failed, commit, files, exit_code, reason)
    }

    /// A task ended unmerged (`status`), with what it committed on its branch, if anything.
    #[allow(clippy::too_many_arguments)]
    pub fn set_ended(
        &self,
        run_id: &str,
        idx: usize,
        status: TaskStatus,
        commit: Option<&str>,
        files: &[String],
        exit_code: Option<i32>,
        reason: &str,
    ) -> Result<()> {
        self.conn.execute(
            "UPDATE tasks SET status = ?8, task_commit = ?3, files_changed = ?4, exit_code = ?5, reason = ?6, ended_at = ?7 \
             WHERE run_id = ?1 AND idx = ?2",
            params![run_id, idx, commit, serde_json::to_string(files)?, exit_code, reason, now(), status.as_str()],
        )?;
        Ok(())
    }

    pub fn event(&self, run_id: &str, idx: usize, attempt: u32, kind: &str, data: &str) -> Result<()> {
        self.conn.execute(
            "INSERT INTO events (run_id, idx, attempt, at, kind, data) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![run_id, idx, attempt, now(), kind, data],
        )?;
        Ok(())
    }

    /// Per task: the remote worker its latest agent ran on (kind `placed` events).
    pub fn placements(&self, run_id: &str) -> Result<std::collections::BTreeMap<usize, String>> {
        let mut out = std::collections::BTreeMap::new();
        for (idx, v) in self.events_of(run_id, "placed")? {
            if let Some(w) = v["worker"].as_str() {
                out.insert(idx, w.to_string());
            }
        }
        Ok(out)
    }

    /// Per task: the agent's thread id and summed token usage, from events.
    /// Tokens per task as the model gateway counted them (kind `gateway` events).
    pub fn gateway_totals(&self, run_id: &str) -> Result<std::collections::BTreeMap<usize, GatewayTotals>> {
        let mut out = std::collections::BTreeMap::<usize, GatewayTotals>::new();
        for (idx, v) in self.events_of(run_id, "gateway")? {
            let t = out.entry(idx).or_default();
            match v["kind"].as_str() {
                Some("usage") => {
                    t.input += v["input"].as_u64().unwrap_or(0);
                    t.cached_input += v["cached_input"].as_u64().unwrap_or(0);
                    t.output += v["output"].as_u64().unwrap_or(0);
                    t.requests += v["requests"].as_u64().unwrap_or(0);
                }
                Some("refused") => t.refused += 1,
                _ => {}
            }
        }
        Ok(out)
    }

    /// The run's pushes to origin (kind `push` events), oldest first.
    pub fn pushes(&self, run_id: &str) -> Result<Vec<serde_json::Value>> {
        Ok(self.events_of(run_id, "push")?.into_iter().map(|(_, v)| v).collect())
    }

    /// The events of one kind of a run, in order: task index and JSON data.
    pub(super) fn events_of(&self, run_id: &str, kind: &str) -> Result<Vec<(usize, serde_json::Value)>> {
        let mut stmt = self
            .conn
            .prepare("SELECT idx, data FROM events WHERE run_id = ?1 AND kind = ?2 ORDER BY id")?;
        let rows = stmt.query_map(params![run_id, kind], |r| {
            Ok((r.get::<_, i64>(0)? as usize, r.get::<_, String>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (idx, data) = row?;
            out.push((idx, serde_json::from_str(&data).unwrap_or_default()));
        }
        Ok(out)
    }

    pub fn agent_totals(&self, run_id: &str) -> Result<std::collections::BTreeMap<usize, AgentTotals>> {
        let mut out = std::collections::BTreeMap::<usize, AgentTotals>::new();
        for (idx, v) in self.events_of(run_id, "agent")? {
            let t = out.entry(idx).or_default();
            match v["kind"].as_str() {
                Some("thread") => t.thread_id = v["id"].as_str().map(String::from),
                Some("usage") => {
                    t.input += v["input_tokens"].as_u64().unwrap_or(0);
                    t.cached_input += v["cached_input_tokens"].as_u64().unwrap_or(0);
                    t.output += v["output_tokens"].as_u64().unwrap_or(0);
                }
                _ => {}
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomically_keeps_all_writes_or_none() {
        let dir = tempfile::tempdir().unwrap();
        let st = State::open(&dir.path().join("state.db")).unwrap();
        st.create_run("r", "cohort/service", "{task}", "{}", &[("t".into(), "b".into())])
            .unwrap();
        let failed: Result<()> = st.atomically(|st| {
            st.set_committed("r", 1, "abc", &[], Some(0))?;
            anyhow::bail!("a crash between the writes")
        });
        assert!(failed.is_err());
        assert_eq!(st.tasks("r").unwrap()[0].status, TaskStatus::Pending, "rolled back");
        st.atomically(|st| {
            st.set_committed("r", 1, "abc", &[], Some(0))?;
            st.set_status("r", 1, TaskStatus::Unchanged, None, None)
        })
        .unwrap();
        assert_eq!(st.tasks("r").unwrap()[0].status, TaskStatus::Unchanged);
    }
}
