//! One task's life: checkout → agent → commit → merge, with a retry from
//! the new service tip after a conflict.

use std::io::Write;
use std::sync::Arc;

use anyhow::{Context, Result};

use super::state::{AttemptEnd, TaskRow, TaskStatus};
use super::{blocking, Engine, RunDir};
use crate::agent::{AgentEvent, TaskContext};
use crate::config::ConflictPolicy;
use crate::git::{self, commit, merge, pool::Pool, refs, Oid};
use crate::plan::Plan;
use crate::progress::Progress;
use crate::runtime::{Exit, Output, Spawn};

/// What the tasks of one run share.
pub(super) struct Shared {
    pub run_id: String,
    pub template: String,
    pub dir: RunDir,
    pub pool: Arc<Pool>,
    pub progress: Arc<Progress>,
    /// Merges are serialised in-process; the ref CAS guards against others.
    pub merge_lock: tokio::sync::Mutex<()>,
}

enum AttemptResult {
    Finished,
    Conflict(Vec<String>),
}

pub(super) async fn run_task(e: Arc<Engine>, s: Arc<Shared>, row: TaskRow) {
    let idx = row.index;
    if e.cancel.is_cancelled() {
        return; // stays pending; `resume` picks it up
    }
    if let Err(err) = drive(&e, &s, &row).await {
        let reason = format!("{err:#}");
        s.progress.task_finished(idx, "failed", &reason);
        let st = e.state.lock().unwrap();
        let _ = st.set_failure(
            &s.run_id,
            idx,
            row.task_commit.as_deref(),
            &row.files_changed,
            None,
            &reason,
        );
    }
    if !e.cancel.is_cancelled() {
        s.progress.advance();
    }
}

async fn drive(e: &Arc<Engine>, s: &Arc<Shared>, row: &TaskRow) -> Result<()> {
    let idx = row.index;
    // A task retries once after a conflict, even across a crash and `resume`:
    // an earlier conflicted attempt means the retry is under way or done.
    let earlier = e.state.lock().unwrap().last_conflict(&s.run_id, idx)?;
    let mut conflicted: Option<Vec<String>> = earlier.map(|r| r.split(", ").map(String::from).collect());
    let mut attempt = row.attempts + 1;
    // Resume after a crash between commit and merge: merge, don't re-run.
    if row.status == TaskStatus::Committed {
        if let Some(tip) = row.task_commit.as_deref().and_then(|c| c.parse::<Oid>().ok()) {
            match merge_task(e, s, row, tip).await? {
                AttemptResult::Finished => return Ok(()),
                AttemptResult::Conflict(paths) => {
                    record_conflict(e, s, idx, row.attempts, &paths)?;
                    if e.opts.on_conflict == ConflictPolicy::Keep || conflicted.is_some() {
                        return mark_conflict(e, s, idx, &paths);
                    }
                    conflicted = Some(paths);
                }
            }
        }
    }
    loop {
        match attempt_once(e, s, row, attempt, conflicted.as_deref()).await? {
            AttemptResult::Finished => return Ok(()),
            AttemptResult::Conflict(paths) => {
                record_conflict(e, s, idx, attempt, &paths)?;
                if e.opts.on_conflict == ConflictPolicy::Retry && conflicted.is_none() {
                    if e.cancel.is_cancelled() {
                        // Stopping: the retry is left to `resume`, which finds the conflict.
                        e.state.lock().unwrap().set_status(
                            &s.run_id,
                            idx,
                            TaskStatus::Pending,
                            None,
                            Some("interrupted before its retry after a conflict"),
                        )?;
                        return Ok(());
                    }
                    s.progress
                        .task_finished(idx, "conflicted, retrying from the new service tip", &paths.join(", "));
                    conflicted = Some(paths);
                    attempt += 1;
                    continue;
                }
                return mark_conflict(e, s, idx, &paths);
            }
        }
    }
}

/// Ends attempt `attempt` as a conflict, naming the paths.
fn record_conflict(e: &Engine, s: &Shared, idx: usize, attempt: u32, paths: &[String]) -> Result<()> {
    let end = AttemptEnd {
        status: "conflict",
        reason: Some(paths.join(", ")),
        ..Default::default()
    };
    e.state.lock().unwrap().end_attempt(&s.run_id, idx, attempt, &end)
}

fn mark_conflict(e: &Engine, s: &Shared, idx: usize, paths: &[String]) -> Result<()> {
    let reason = format!("conflicts in: {}", paths.join(", "));
    e.state
        .lock()
        .unwrap()
        .set_status(&s.run_id, idx, TaskStatus::Conflict, None, Some(&reason))?;
    s.progress.task_finished(idx, "conflict (branch kept)", &reason);
    Ok(())
}

async fn attempt_once(
    e: &Arc<Engine>,
    s: &Arc<Shared>,
    row: &TaskRow,
    attempt: u32,
    conflicted: Option<&[String]>,
) -> Result<AttemptResult> {
    let idx = row.index;
    let branch_ref = format!("refs/heads/{}", row.branch);
    let service_ref = format!("refs/heads/{}", e.opts.service_branch);

    // A checkout at the current service tip, on a task branch reset to it.
    let t0 = std::time::Instant::now();
    let (checkout, base) = {
        let (paths, pool, branch_ref, run_id) = (e.paths.clone(), s.pool.clone(), branch_ref.clone(), s.run_id.clone());
        blocking(move || {
            let repo = paths.open()?;
            let base = refs::read(&repo, &service_ref)?.with_context(|| format!("{service_ref} is missing"))?;
            match refs::read(&repo, &branch_ref)? {
                None => refs::cas(&repo, &branch_ref, None, base, "cohort: task branch")?,
                Some(old) if old != base => {
                    // Keep the earlier attempt's work reachable before resetting.
                    let keep = format!("refs/cohort/attempts/{run_id}/{idx:03}-{}", attempt - 1);
                    if refs::read(&repo, &keep)?.is_none() {
                        refs::cas(&repo, &keep, None, old, "cohort: keep earlier attempt")?;
                    }
                    refs::cas(
                        &repo,
                        &branch_ref,
                        Some(old),
                        base,
                        "cohort: restart task from service tip",
                    )?;
                }
                Some(_) => {}
            }
            let checkout = pool.lease()?;
            checkout.prepare(&branch_ref, base)?;
            Ok((checkout, base))
        })
        .await?
    };
    e.state
        .lock()
        .unwrap()
        .start_attempt(&s.run_id, idx, attempt, &base.to_string())?;
    tracing::debug!(task = idx, ms = t0.elapsed().as_millis() as u64, "checkout prepared");
    let t0 = std::time::Instant::now();

    let mut prompt = Plan::prompt_for(&s.template, &row.text);
    if let Some(paths) = conflicted {
        prompt.push_str(&format!(
            "\n\nNote: an earlier attempt at this task conflicted with changes merged meanwhile (in: {}). \
             You are starting again from the current state of the project.\n",
            paths.join(", ")
        ));
    }
    let prompt_file = s.dir.sub("prompts")?.join(format!("{idx:03}-{attempt}.txt"));
    std::fs::write(&prompt_file, &prompt)?;
    let scratch = s.dir.sub("scratch")?.join(format!("{idx:03}-{attempt}"));
    std::fs::create_dir_all(&scratch)?;
    let ctx = TaskContext {
        run_id: s.run_id.clone(),
        index: idx,
        task: row.text.clone(),
        prompt: prompt.clone(),
        prompt_file,
        checkout: checkout.path.clone(),
        scratch,
        attempt,
    };
    let invocation = e.agent.invocation(&ctx)?;
    std::fs::create_dir_all(s.dir.0.join("logs"))?;
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(s.dir.log(idx))?;
    writeln!(
        log,
        "=== attempt {attempt} at {} (agent {}; runtime {})",
        super::state::now(),
        e.agent.describe(),
        e.runtime.name()
    )?;
    writeln!(log, "--- prompt\n{prompt}\n--- output")?;

    s.progress.task_started(idx, &row.text, attempt);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let spawn = Spawn {
        invocation,
        workdir: checkout.path.clone(),
        timeout: e.opts.timeout,
    };
    let runtime = e.runtime.clone();
    let cancel = e.cancel.child_token();
    let running = {
        let cancel = cancel.clone();
        tokio::spawn(async move { runtime.run(spawn, tx, cancel).await })
    };
    let mut events: Vec<AgentEvent> = Vec::new();
    // No early return while the agent runs: its checkout must not go back
    // to the pool under it. What cannot be recorded stops the agent.
    let mut trouble: Option<anyhow::Error> = None;
    while let Some(line) = rx.recv().await {
        if trouble.is_none() {
            if let Err(err) = record_line(e, s, row, attempt, &mut log, &line, &mut events) {
                cancel.cancel();
                trouble = Some(err.context("cannot record the agent's output; it was stopped"));
            }
        }
    }
    let exit = running.await.context("the agent runner panicked")??;
    if let Some(err) = trouble {
        return Err(err);
    }
    if let Some(AgentEvent::Message { text }) = events.iter().rev().find(|e| matches!(e, AgentEvent::Message { .. })) {
        writeln!(log, "--- final message\n{text}")?;
    }
    writeln!(log, "--- exit: {exit:?}")?;

    if exit == Exit::Cancelled {
        // Not committed: `resume` redoes the task from a clean checkout.
        drop(checkout);
        {
            let st = e.state.lock().unwrap();
            let end = AttemptEnd {
                status: "interrupted",
                reason: Some("interrupted".into()),
                ..Default::default()
            };
            st.end_attempt(&s.run_id, idx, attempt, &end)?;
            st.set_status(&s.run_id, idx, TaskStatus::Pending, None, Some("interrupted"))?;
        }
        s.progress.task_finished(idx, "interrupted", "");
        return Ok(AttemptResult::Finished);
    }

    // Whatever the agent did is committed on the task branch, even when it
    // failed, so no work is lost.
    let message = commit::task_message(&s.run_id, idx, &row.text);
    tracing::debug!(task = idx, ms = t0.elapsed().as_millis() as u64, "agent finished");
    let t0 = std::time::Instant::now();
    let committed = {
        let (co, br) = ((*checkout).clone(), branch_ref.clone());
        blocking(move || commit::commit_all(&co, &br, base, &message)).await
    };
    drop(checkout);
    let tc = committed?;
    tracing::debug!(task = idx, ms = t0.elapsed().as_millis() as u64, "committed");
    let tip = tc.tip.to_string();
    writeln!(
        log,
        "--- committed {} ({} files changed)",
        git::short(tc.tip),
        tc.files_changed.len()
    )?;

    let failure = match exit {
        Exit::Code(c) => e.agent.failure(c, &events),
        Exit::Signal(sig) => Some(format!("the agent was killed by signal {sig}")),
        Exit::TimedOut(d) => Some(format!("the agent timed out after {}", humantime::format_duration(d))),
        Exit::Cancelled => unreachable!(),
    };
    let end = |status, reason: Option<String>| AttemptEnd {
        status,
        tip_commit: Some(tip.clone()),
        exit_code: exit.code(),
        reason,
    };
    // Each outcome is one transaction: a crash between its writes would
    // leave, say, an unchanged task as committed, which resume would merge.
    {
        let st = e.state.lock().unwrap();
        if let Some(reason) = failure {
            st.atomically(|st| {
                st.end_attempt(&s.run_id, idx, attempt, &end("failed", Some(reason.clone())))?;
                let commit = (!tc.is_empty()).then_some(tip.as_str());
                st.set_failure(&s.run_id, idx, commit, &tc.files_changed, exit.code(), &reason)
            })?;
            s.progress.task_finished(idx, "failed", &reason);
            return Ok(AttemptResult::Finished);
        }
        if tc.is_empty() {
            st.atomically(|st| {
                st.end_attempt(&s.run_id, idx, attempt, &end("unchanged", None))?;
                st.set_committed(&s.run_id, idx, &tip, &[], exit.code())?;
                st.set_status(
                    &s.run_id,
                    idx,
                    TaskStatus::Unchanged,
                    None,
                    Some("the agent changed nothing"),
                )
            })?;
            s.progress.task_finished(idx, "unchanged", "the agent changed nothing");
            return Ok(AttemptResult::Finished);
        }
        st.atomically(|st| {
            st.end_attempt(&s.run_id, idx, attempt, &end("committed", None))?;
            st.set_committed(&s.run_id, idx, &tip, &tc.files_changed, exit.code())
        })?;
    }
    merge_task(e, s, row, tc.tip).await
}

/// Writes one line of the agent's output to the task's log and, when the
/// agent makes an event of it, to the state DB and the progress display.
fn record_line(
    e: &Engine,
    s: &Shared,
    row: &TaskRow,
    attempt: u32,
    log: &mut std::fs::File,
    line: &Output,
    events: &mut Vec<AgentEvent>,
) -> Result<()> {
    let (tag, text) = match line {
        Output::Stdout(t) => ("out", t),
        Output::Stderr(t) => ("err", t),
    };
    writeln!(log, "{tag}| {text}")?;
    if let Output::Stdout(t) = line {
        if let Some(ev) = e.agent.parse_line(t) {
            s.progress.task_action(row.index, &ev.summary());
            let data = serde_json::to_string(&ev)?;
            e.state
                .lock()
                .unwrap()
                .event(&s.run_id, row.index, attempt, "agent", &data)?;
            events.push(ev);
        }
    }
    Ok(())
}

async fn merge_task(e: &Arc<Engine>, s: &Arc<Shared>, row: &TaskRow, tip: Oid) -> Result<AttemptResult> {
    let idx = row.index;
    let _merging = s.merge_lock.lock().await;
    let (paths, service_ref) = (e.paths.clone(), format!("refs/heads/{}", e.opts.service_branch));
    let message = format!(
        "Merge task {idx:03}: {}\n\nCohort-Run: {}\nCohort-Task: {idx:03}\n",
        row.text, s.run_id
    );
    let t0 = std::time::Instant::now();
    let outcome = blocking(move || merge::merge_into(&paths.open()?, &service_ref, tip, &message)).await?;
    tracing::debug!(task = idx, ms = t0.elapsed().as_millis() as u64, "merged");
    match outcome {
        merge::MergeOutcome::Merged { commit } => {
            let c = commit.to_string();
            e.state
                .lock()
                .unwrap()
                .set_status(&s.run_id, idx, TaskStatus::Merged, Some(&c), None)?;
            s.progress
                .task_finished(idx, "merged", &format!("as {}", git::short(commit)));
            Ok(AttemptResult::Finished)
        }
        merge::MergeOutcome::AlreadyContained { merge } => {
            let merge = merge.map(|c| c.to_string());
            e.state
                .lock()
                .unwrap()
                .set_status(&s.run_id, idx, TaskStatus::Merged, merge.as_deref(), None)?;
            s.progress.task_finished(idx, "merged", "already in the service branch");
            Ok(AttemptResult::Finished)
        }
        merge::MergeOutcome::Conflict { paths } => Ok(AttemptResult::Conflict(paths)),
    }
}
