//! The run's last step when asked (`--push`, `[run] push`): the service branch, and with
//! `[run] push_tasks = "failed"` the branches of tasks that did not merge, go to origin.
//! What happened is recorded in the state (`report` shows it); a refusal or a failure
//! loses nothing local, and the next run pushes again.

use std::sync::Arc;

use anyhow::Result;

use super::state::{TaskRow, TaskStatus};
use super::{blocking, Engine};
use crate::config::PushTasks;
use crate::git::publish::{self, Published};

/// The push's outcome, for the summary and the exit code.
#[derive(Debug, Clone)]
pub enum PushResult {
    Done(Published),
    /// The push failed as a whole: the message, and its exit code (2: credentials).
    Failed {
        message: String,
        code: u8,
    },
}

impl PushResult {
    pub fn exit_code(&self) -> u8 {
        match self {
            PushResult::Done(p) if p.rejected().next().is_some() => 1,
            PushResult::Done(_) => 0,
            PushResult::Failed { code, .. } => *code,
        }
    }

    /// Lines for the terminal and the service's log.
    pub fn describe(&self) -> Vec<String> {
        match self {
            PushResult::Failed { message, .. } => vec![format!("push failed: {message}")],
            PushResult::Done(p) => {
                let mut out: Vec<String> = p
                    .refs
                    .iter()
                    .map(|r| match (r.status.as_str(), &r.reason) {
                        ("rejected", Some(why)) => format!("push of {} to {} rejected: {why}", r.branch, p.url),
                        (status, _) => format!("{} {status} at {} on {}", r.branch, short(&r.commit), p.url),
                    })
                    .collect();
                if let Some(c) = &p.compare_url {
                    out.push(format!("compare: {c}"));
                }
                out
            }
        }
    }
}

impl PushResult {
    /// A push as the state recorded it (see [`push_run`]).
    pub fn from_record(v: &serde_json::Value) -> Option<PushResult> {
        if let Some(message) = v["error"].as_str() {
            let code = v["exit_code"].as_u64().and_then(|c| u8::try_from(c).ok()).unwrap_or(1);
            return Some(PushResult::Failed {
                message: message.to_string(),
                code,
            });
        }
        serde_json::from_value(v.clone()).ok().map(PushResult::Done)
    }

    fn record(&self) -> serde_json::Value {
        match self {
            PushResult::Done(p) => serde_json::to_value(p).unwrap_or_default(),
            PushResult::Failed { message, code } => serde_json::json!({ "error": message, "exit_code": code }),
        }
    }
}

fn short(c: &str) -> &str {
    &c[..10.min(c.len())]
}

/// Pushes the run's branches and records the outcome (kind `push` in the state).
pub(super) async fn push_run(engine: &Arc<Engine>, run_id: &str, policy: PushTasks, tasks: &[TaskRow]) -> PushResult {
    let failed: Vec<String> = match policy {
        PushTasks::None => Vec::new(),
        // Not `secret`: that work was refused because it holds a secret.
        PushTasks::Failed => tasks
            .iter()
            .filter(|t| {
                matches!(
                    t.status,
                    TaskStatus::Failed | TaskStatus::Conflict | TaskStatus::OverBudget | TaskStatus::Unverified
                ) && t.task_commit.is_some()
            })
            .map(|t| t.branch.clone())
            .collect(),
    };
    let base = engine
        .state()
        .ok()
        .and_then(|st| st.run(Some(run_id)).ok().flatten())
        .and_then(|r| r.base_commit);
    let (paths, access, service) = (
        engine.paths.clone(),
        engine.access.clone(),
        engine.opts.service_branch.clone(),
    );
    let outcome: Result<Published> = blocking(move || {
        let repo = paths.open()?;
        publish::publish(&repo, &access, &service, &failed, base.as_deref())
    })
    .await;
    let result = match outcome {
        Ok(p) => PushResult::Done(p),
        Err(e) => PushResult::Failed {
            message: format!("{e:#}"),
            code: e
                .downcast_ref::<crate::git::remote::RemoteError>()
                .map_or(1, |r| r.exit_code()),
        },
    };
    let data = result.record();
    for line in result.describe() {
        tracing::info!(run_id, "{line}");
    }
    if let Ok(st) = engine.state() {
        if let Err(e) = st.event(run_id, 0, 0, "push", &data.to_string()) {
            tracing::warn!("cannot record the push: {e:#}");
        }
    }
    result
}
