//! Calibration (`--calibrate`, `[run] calibrate`): task 1 runs alone before the fan-out, so a
//! prompt template that does not work costs one task, not all of them. If task 1 does not
//! merge (it failed, ended unverified, changed nothing, …), cohort does not fan out: with the
//! rules planner it stops and shows why; with the model planner it asks the light model for
//! a revised template from task 1's log, runs task 1 once more with it, and fans out only if
//! that merges. The revised template is kept in the run's directory and the state.

use std::collections::VecDeque;
use std::sync::Arc;

use anyhow::Result;

use super::state::{TaskRow, TaskStatus};
use super::task::{run_task, Shared};
use super::Engine;

/// The light model's second look at a template that failed on task 1.
#[async_trait::async_trait]
pub trait TemplateReviser: Send + Sync {
    /// A revised template (with `{task}`), from task 1's text and what happened to it.
    async fn revise(&self, template: &str, task: &str, evidence: &str) -> Result<String>;
}

/// How much of task 1's log the user and the model see.
const EVIDENCE_BYTES: usize = 16 * 1024;

/// Runs task 1 alone when the run is fresh (task 1 first in `queue`, nothing else started).
/// `Some(why)`: calibration failed, and the rest of the queue must not run.
pub(super) async fn first(e: &Arc<Engine>, s: &Arc<Shared>, queue: &mut VecDeque<TaskRow>) -> Result<Option<String>> {
    let fresh = queue.front().is_some_and(|r| r.index == 1) && queue.iter().skip(1).all(|r| r.attempts == 0);
    if !fresh || queue.len() < 2 {
        return Ok(None);
    }
    let Some(row) = queue.pop_front() else {
        return Ok(None);
    };
    s.progress
        .note("calibration: task 1 runs alone first; the others start once it merges");
    run_task(e.clone(), s.clone(), row).await;
    let Some(t1) = task_one(e, s)? else { return Ok(None) };
    if e.cancel.is_cancelled() || t1.status == TaskStatus::Merged {
        return Ok(None);
    }
    let seen = evidence(s, &t1);
    let Some(reviser) = &e.reviser else {
        return Ok(Some(format!(
            "calibration: task 1 ended {}{}, so the other tasks were not started. Fix the prompt template \
             and start a new run (`cohort resume` would run them with this template). The end of task 1's \
             log (`cohort logs 1`):\n{seen}",
            t1.status.as_str(),
            reason(&t1)
        )));
    };
    let before = s.template();
    s.progress
        .note("calibration: task 1 did not merge; asking the planner's model for a revised prompt template");
    let after = match reviser.revise(&before, &t1.text, &seen).await {
        Ok(t) => t,
        Err(err) => {
            return Ok(Some(format!(
                "calibration: task 1 ended {}{}, and the model could not revise the template: {err:#}",
                t1.status.as_str(),
                reason(&t1)
            )))
        }
    };
    std::fs::write(s.dir.0.join("prompt.revised.txt"), &after)?;
    {
        let st = e.state()?;
        let change = serde_json::json!({"before": before, "after": after});
        st.atomically(|st| {
            st.event(&s.run_id, 1, t1.attempts, "calibration", &change.to_string())?;
            st.set_template(&s.run_id, &after)?;
            st.mark_retry(&s.run_id, 1)
        })?;
    }
    *s.template.write().unwrap_or_else(|e| e.into_inner()) = after;
    let Some(again) = task_one(e, s)? else { return Ok(None) };
    run_task(e.clone(), s.clone(), again).await;
    let Some(t1) = task_one(e, s)? else { return Ok(None) };
    if e.cancel.is_cancelled() || t1.status == TaskStatus::Merged {
        s.progress
            .note("calibration: task 1 merged with the revised template (prompt.revised.txt); fanning out");
        return Ok(None);
    }
    Ok(Some(format!(
        "calibration: task 1 still ended {}{} with the revised template (kept in the run's \
         prompt.revised.txt), so the other tasks were not started. The end of its log:\n{}",
        t1.status.as_str(),
        reason(&t1),
        evidence(s, &t1)
    )))
}

fn task_one(e: &Engine, s: &Shared) -> Result<Option<TaskRow>> {
    Ok(e.state()?.tasks(&s.run_id)?.into_iter().find(|t| t.index == 1))
}

fn reason(t: &TaskRow) -> String {
    match &t.reason {
        // Whole: it goes to the journal and serve.log as the run's error.
        Some(r) => format!(" ({r})"),
        None => String::new(),
    }
}

/// The end of task 1's log, escape sequences stripped: what it was told, did, and what the
/// verify command said.
fn evidence(s: &Shared, t: &TaskRow) -> String {
    let log = std::fs::read_to_string(s.dir.log(t.index)).unwrap_or_default();
    let mut cut = log.len().saturating_sub(EVIDENCE_BYTES);
    while !log.is_char_boundary(cut) {
        cut += 1;
    }
    log[cut..]
        .lines()
        .map(super::verify::strip_ansi)
        .collect::<Vec<_>>()
        .join("\n")
}
