//! One task's life, as named phases, each one function:
//!
//! ```text
//! prepare → agent → collect → commit → verify → merge
//!             ↑________ failure ________↓
//! ```
//!
//! `verify` hands a failure back to the agent (`train::rounds`), and the merge is verified
//! before the service branch moves (`train::merge`). A conflict, or a merge result that
//! fails the verify command, restarts the task once from the new service tip. [`Record`]
//! writes each outcome to the state DB and the progress display.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};

use super::collect::{collect, commit};
use super::record::Record;
use super::state::{TaskRow, TaskStatus};
use super::train;
use super::{blocking, Engine, RunDir};
use crate::agent::{AgentEvent, Feedback, ModelAccess, TaskContext};
use crate::config::ConflictPolicy;
use crate::gateway::TaskKey;
use crate::git::checkout::MoveStats;
use crate::git::pool::{Checkout, Lease, Pool};
use crate::git::{refs, Oid};
use crate::plan::Plan;
use crate::progress::Progress;
use crate::runtime::{Bind, Exit, Output, Spawn};

/// What the tasks of one run share.
pub(super) struct Shared {
    pub run_id: String,
    /// The prompt template; calibration may revise it before the fan-out.
    pub template: std::sync::RwLock<String>,
    pub dir: RunDir,
    pub pool: Arc<Pool>,
    pub progress: Arc<Progress>,
    /// Merges are serialised in-process; the ref CAS guards against others.
    pub merge_lock: tokio::sync::Mutex<()>,
    /// The run's model gateway, when it has one.
    pub gateway: Option<Arc<crate::gateway::Gateway>>,
}

impl Shared {
    pub fn template(&self) -> String {
        self.template.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

pub(super) enum AttemptResult {
    Finished,
    Conflict(Vec<String>),
    /// The merge result failed the verify command (the failure), though the task passed alone.
    MergeFailed(String),
}

/// Why an attempt starts again from the new service tip.
#[derive(Debug, Clone)]
pub(super) enum Restart {
    Conflict(Vec<String>),
    MergeFailed(String),
}

pub(super) async fn run_task(e: Arc<Engine>, s: Arc<Shared>, row: TaskRow) {
    let idx = row.index;
    if e.cancel.is_cancelled() {
        return; // stays pending; `resume` picks it up
    }
    if let Err(err) = drive(&e, &s, &row).await {
        let reason = format!("{err:#}");
        s.progress.task_finished(idx, "failed", &reason);
        if let Ok(st) = e.state() {
            let _ = st.set_failure(
                &s.run_id,
                idx,
                row.task_commit.as_deref(),
                &row.files_changed,
                None,
                &reason,
            );
        }
    }
    if !e.cancel.is_cancelled() {
        s.progress.advance();
    }
}

async fn drive(e: &Arc<Engine>, s: &Arc<Shared>, row: &TaskRow) -> Result<()> {
    let idx = row.index;
    // A task restarts once after a conflict or a failed merge result, even across a crash and
    // `resume`: an earlier restart means the new attempt is under way or done.
    let mut restart = e
        .state()?
        .last_restart(&s.run_id, idx)?
        .map(|(status, reason)| match status.as_str() {
            "conflict" => Restart::Conflict(reason.split(", ").map(String::from).collect()),
            _ => Restart::MergeFailed(reason),
        });
    let mut attempt = row.attempts + 1;
    // Resume after a crash between commit and merge: verify (what is left of it) and merge,
    // without running the agent again.
    if row.status == TaskStatus::Committed {
        if let Some(tip) = row.task_commit.as_deref().and_then(|c| c.parse::<Oid>().ok()) {
            let rec = Record::new(e, s, idx, row.attempts);
            let mut at = reopen_attempt(e, s, row, &rec)?;
            let result = match train::rounds(e, s, row, &rec, &mut at, None, tip).await? {
                Some(tip) => train::merge(e, s, row, tip, &rec).await?,
                None => AttemptResult::Finished,
            };
            if !restarts(e, &rec, result, &mut restart)? {
                return Ok(());
            }
            // The restart is attempt `row.attempts + 1`, as `attempt` already says.
        }
    }
    loop {
        let rec = Record::new(e, s, idx, attempt);
        let result = attempt_once(e, s, row, &rec, restart.as_ref()).await?;
        if !restarts(e, &rec, result, &mut restart)? {
            return Ok(());
        }
        attempt += 1;
    }
}

/// Records how an attempt ended; true when the task starts again from the new service tip
/// (once: after a conflict under `--on-conflict retry`, or after its merge result failed).
fn restarts(e: &Engine, rec: &Record<'_>, result: AttemptResult, restart: &mut Option<Restart>) -> Result<bool> {
    let next = match result {
        AttemptResult::Finished => return Ok(false),
        AttemptResult::Conflict(paths) => {
            rec.conflicted(&paths)?;
            if e.opts.on_conflict == ConflictPolicy::Keep || restart.is_some() {
                rec.conflict(&paths)?;
                return Ok(false);
            }
            Restart::Conflict(paths)
        }
        AttemptResult::MergeFailed(failure) => {
            rec.merge_failed(&failure)?;
            if restart.is_some() {
                rec.unverified(&format!(
                    "its merge with the service branch failed the verify command: {failure}"
                ))?;
                return Ok(false);
            }
            Restart::MergeFailed(failure)
        }
    };
    if e.cancel.is_cancelled() {
        // Stopping: the restart is left to `resume`, which finds why in the attempts.
        rec.retry_left_to_resume()?;
        return Ok(false);
    }
    rec.restarting(&next);
    *restart = Some(next);
    Ok(true)
}

async fn attempt_once(
    e: &Arc<Engine>,
    s: &Arc<Shared>,
    row: &TaskRow,
    rec: &Record<'_>,
    restart: Option<&Restart>,
) -> Result<AttemptResult> {
    let (checkout, mut at) = prepare(e, s, row, rec, restart).await?;
    let feedback = match restart {
        Some(Restart::MergeFailed(failure)) => Some(at.feedback(0, failure, None)?),
        _ => None,
    };
    let ran = agent(e, s, row, rec, &mut at, &checkout, feedback).await?;
    if ran.exit == Exit::Cancelled {
        // Not committed: `resume` redoes the task from a clean checkout.
        drop(checkout);
        rec.interrupted()?;
        return Ok(AttemptResult::Finished);
    }
    let collected = collect(e, checkout, &at.branch_ref, at.base, &mut at.log).await?;
    let Some((tip, checkout)) = commit(e, s, row, rec, &ran, collected, &at.branch_ref, &mut at.log).await? else {
        return Ok(AttemptResult::Finished);
    };
    at.thread = thread_of(&ran.events);
    match train::rounds(e, s, row, rec, &mut at, Some(checkout), tip).await? {
        Some(tip) => train::merge(e, s, row, tip, rec).await,
        None => Ok(AttemptResult::Finished),
    }
}

/// The conversation the agent reported, if it did.
pub(super) fn thread_of(events: &[AgentEvent]) -> Option<String> {
    events.iter().rev().find_map(|e| match e {
        AgentEvent::Thread { id } => Some(id.clone()),
        _ => None,
    })
}

/// One attempt of a task, as its phases share it (the checkout goes from phase to phase by
/// value, since it may be discarded on the way).
pub(super) struct AttemptCtx {
    pub base: Oid,
    pub branch_ref: String,
    pub prompt: String,
    /// The attempt's own directory: its prompt file, feedback files and scratch space.
    pub attempt_dir: PathBuf,
    pub log: std::fs::File,
    /// The agent's conversation, continued by a feedback round.
    pub thread: Option<String>,
}

impl AttemptCtx {
    /// A failure handed back to the agent, written to `feedback-<round>.txt` of the attempt.
    pub fn feedback(&self, round: u32, failure: &str, thread: Option<String>) -> Result<Feedback> {
        let file = self.attempt_dir.join(format!("feedback-{round}.txt"));
        std::fs::write(&file, failure).with_context(|| format!("cannot write {}", file.display()))?;
        let message = format!(
            "The project's check failed on your work on this task. Fix the code so that it passes; \
             stay within the task.\n\n{failure}\n"
        );
        Ok(Feedback { message, file, thread })
    }
}

/// The attempt of a task that committed before a crash, to go on with after `resume`.
fn reopen_attempt(e: &Engine, s: &Shared, row: &TaskRow, rec: &Record<'_>) -> Result<AttemptCtx> {
    let base = row
        .base_commit
        .as_deref()
        .and_then(|b| b.parse::<Oid>().ok())
        .with_context(|| format!("task {} has a commit but no base in the state", row.index))?;
    let attempt_dir = s.dir.sub("attempts")?.join(format!("{:03}-{}", row.index, rec.attempt));
    std::fs::create_dir_all(&attempt_dir)?;
    std::fs::create_dir_all(s.dir.0.join("logs"))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(s.dir.log(row.index))?;
    Ok(AttemptCtx {
        base,
        branch_ref: format!("refs/heads/{}", row.branch),
        prompt: Plan::prompt_for(&s.template(), &row.text),
        attempt_dir,
        log,
        thread: e.state()?.thread_of(&s.run_id, row.index, rec.attempt)?,
    })
}

/// A checkout of `commit` (on `branch_ref` in the agent's private git dir), from the pool.
pub(super) async fn lease_at(s: &Shared, branch_ref: &str, commit: Oid) -> Result<Lease> {
    let (pool, branch_ref) = (s.pool.clone(), branch_ref.to_string());
    blocking(move || {
        let checkout = pool.lease()?;
        let _: MoveStats = checkout.prepare(&branch_ref, commit)?;
        Ok(checkout)
    })
    .await
}

/// prepare: the task branch at the current service tip, a checkout of it with the agent's
/// private git dir, the prompt, the attempt's directory and the log.
async fn prepare(
    e: &Arc<Engine>,
    s: &Arc<Shared>,
    row: &TaskRow,
    rec: &Record<'_>,
    restart: Option<&Restart>,
) -> Result<(Lease, AttemptCtx)> {
    let (idx, attempt) = (row.index, rec.attempt);
    let branch_ref = format!("refs/heads/{}", row.branch);
    let t0 = std::time::Instant::now();
    let (checkout, base) = {
        let service_ref = format!("refs/heads/{}", e.opts.service_branch);
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
    tracing::debug!(task = idx, ms = t0.elapsed().as_millis() as u64, "checkout prepared");

    let mut prompt = Plan::prompt_for(&s.template(), &row.text);
    if let Some(Restart::Conflict(paths)) = restart {
        prompt.push_str(&format!(
            "\n\nNote: an earlier attempt at this task conflicted with changes merged meanwhile (in: {}). \
             You are starting again from the current state of the project.\n",
            paths.join(", ")
        ));
    }
    // One directory per attempt, the only one of the run's files its agent can reach.
    let attempt_dir = s.dir.sub("attempts")?.join(format!("{idx:03}-{attempt}"));
    std::fs::create_dir_all(&attempt_dir).with_context(|| format!("cannot create {}", attempt_dir.display()))?;
    std::fs::create_dir_all(s.dir.0.join("logs"))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(s.dir.log(idx))?;
    rec.started(&base.to_string(), &row.text)?;
    Ok((
        checkout,
        AttemptCtx {
            base,
            branch_ref,
            prompt,
            attempt_dir,
            log,
            thread: None,
        },
    ))
}

/// What the agent did: how it ended and what it reported.
pub(super) struct Ran {
    pub exit: Exit,
    pub events: Vec<AgentEvent>,
    /// The budget (the task's or the run's) it ran into at the gateway, said plainly.
    pub over_budget: Option<String>,
}

/// agent: runs the agent in its runtime, logging its output and recording its events. It
/// reaches the model through the run's gateway with a token of its own, which dies when the
/// agent ends. With `feedback`, it is a round to fix what the verify command found.
pub(super) async fn agent(
    e: &Arc<Engine>,
    s: &Arc<Shared>,
    row: &TaskRow,
    rec: &Record<'_>,
    task: &mut AttemptCtx,
    checkout: &Checkout,
    feedback: Option<Feedback>,
) -> Result<Ran> {
    let t0 = std::time::Instant::now();
    // From here the agent may change anything in the checkout: its files are not vouched for
    // until cohort has committed them (a feedback round follows a verify that marked it clean).
    let tree = checkout.tree()?;
    checkout.mark_unclean()?;
    let prompt_file = task.attempt_dir.join("prompt.txt");
    std::fs::write(&prompt_file, &task.prompt)?;
    let key = TaskKey {
        run_id: s.run_id.clone(),
        index: row.index,
        attempt: rec.attempt,
    };
    let access = s.gateway.as_ref().and_then(|gw| {
        let addr = e.runtime.gateway_addr(gw.addr()?);
        Some((gw.issue(key.clone()), addr))
    });
    let ctx = TaskContext {
        run_id: rec.run_id().to_string(),
        index: row.index,
        task: row.text.clone(),
        prompt: task.prompt.clone(),
        prompt_file,
        checkout: checkout.path.clone(),
        scratch: task.attempt_dir.clone(),
        attempt: rec.attempt,
        model: access.as_ref().map(|(token, addr)| ModelAccess {
            base_url: crate::gateway::base_url(*addr),
            token: token.expose().to_string(),
        }),
        feedback: feedback.clone(),
    };
    let mut invocation = e.agent.invocation(&ctx)?;
    if let (Some((token, addr)), Some(model)) = (&access, &ctx.model) {
        // Any agent: OpenAI clients find the gateway, and egress goes through its allow-list.
        invocation.env.push(("OPENAI_BASE_URL".into(), model.base_url.clone()));
        invocation.env.push(("OPENAI_API_KEY".into(), model.token.clone()));
        invocation
            .env
            .extend(token.proxy_env(*addr).into_iter().map(|(k, v)| (k.to_string(), v)));
    }
    let log = &mut task.log;
    let round = if feedback.is_some() { ", feedback round" } else { "" };
    writeln!(
        log,
        "=== attempt {}{round} at {} (agent {}; runtime {})",
        rec.attempt,
        super::state::now(),
        e.agent.describe(),
        e.runtime.name()
    )?;
    match &feedback {
        Some(f) => writeln!(log, "--- feedback\n{}\n--- output", f.message)?,
        None => writeln!(log, "--- prompt\n{}\n--- output", task.prompt)?,
    }

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let spawn = Spawn {
        invocation,
        workdir: checkout.path.clone(),
        binds: vec![
            Bind {
                path: checkout.git_dir.clone(),
                writable: true,
            },
            Bind {
                path: task.attempt_dir.clone(),
                writable: true,
            },
            Bind {
                path: checkout.common_dir.join("objects"),
                writable: false,
            },
        ],
        timeout: e.opts.timeout,
        run_id: ctx.run_id.clone(),
        task: row.index,
        gateway_socket: s.gateway.as_ref().and_then(|g| g.socket_path().map(Path::to_path_buf)),
        role: Default::default(),
        caches: Vec::new(),
        tree,
        scratch: Some(task.attempt_dir.clone()),
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
            if let Err(err) = record_line(e, rec, log, &line, &mut events) {
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
    // Over budget when a request of its was refused for it, not merely for crossing it.
    let over_budget = s.gateway.as_ref().and_then(|gw| gw.refused_for_budget(&key)).map(|scope| {
        format!("over budget: the {scope}'s budget ([run] budget {scope}) is spent, and the model refused its next request")
    });
    drop(access); // the token dies with the agent
    tracing::debug!(task = row.index, ms = t0.elapsed().as_millis() as u64, "agent finished");
    Ok(Ran {
        exit,
        events,
        over_budget,
    })
}

/// Writes one line of the agent's output to the task's log and, when the
/// agent makes an event of it, to the state DB and the progress display.
fn record_line(
    e: &Engine,
    rec: &Record<'_>,
    log: &mut std::fs::File,
    line: &Output,
    events: &mut Vec<AgentEvent>,
) -> Result<()> {
    let (tag, text) = match line {
        Output::Stdout(t) => ("out", t),
        Output::Stderr(t) => ("err", t),
        Output::Placed(worker) => {
            rec.placed(worker)?;
            ("on", worker)
        }
    };
    writeln!(log, "{tag}| {text}")?;
    if let Output::Stdout(t) = line {
        if let Some(ev) = e.agent.parse_line(t) {
            rec.event(&ev.summary(), &serde_json::to_string(&ev)?)?;
            events.push(ev);
        }
    }
    Ok(())
}
