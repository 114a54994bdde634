//! One task's life, as named phases, each one function:
//!
//! ```text
//! prepare → agent → collect → commit → merge
//! ```
//!
//! with a retry from the new service tip after a conflict. [`Record`] writes each outcome to
//! the state DB and the progress display.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};

use super::record::Record;
use super::state::{TaskRow, TaskStatus};
use super::{blocking, Engine, RunDir};
use crate::agent::{AgentEvent, ModelAccess, TaskContext};
use crate::config::ConflictPolicy;
use crate::gateway::TaskKey;
use crate::git::commit::{self, Collected, TaskCommit};
use crate::git::pool::{Lease, Pool};
use crate::git::{self, merge, refs, Oid};
use crate::plan::Plan;
use crate::progress::Progress;
use crate::runtime::{Bind, Exit, Output, Spawn};

/// What the tasks of one run share.
pub(super) struct Shared {
    pub run_id: String,
    pub template: String,
    pub dir: RunDir,
    pub pool: Arc<Pool>,
    pub progress: Arc<Progress>,
    /// Merges are serialised in-process; the ref CAS guards against others.
    pub merge_lock: tokio::sync::Mutex<()>,
    /// The run's model gateway, when it has one.
    pub gateway: Option<Arc<crate::gateway::Gateway>>,
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
    // A task retries once after a conflict, even across a crash and `resume`:
    // an earlier conflicted attempt means the retry is under way or done.
    let earlier = e.state()?.last_conflict(&s.run_id, idx)?;
    let mut conflicted: Option<Vec<String>> = earlier.map(|r| r.split(", ").map(String::from).collect());
    let mut attempt = row.attempts + 1;
    // Resume after a crash between commit and merge: merge, don't re-run.
    if row.status == TaskStatus::Committed {
        if let Some(tip) = row.task_commit.as_deref().and_then(|c| c.parse::<Oid>().ok()) {
            let rec = Record::new(e, s, idx, row.attempts);
            if let AttemptResult::Conflict(paths) = merge(e, s, row, tip, &rec).await? {
                rec.conflicted(&paths)?;
                if e.opts.on_conflict == ConflictPolicy::Keep || conflicted.is_some() {
                    return rec.conflict(&paths);
                }
                conflicted = Some(paths);
            } else {
                return Ok(());
            }
        }
    }
    loop {
        let rec = Record::new(e, s, idx, attempt);
        match attempt_once(e, s, row, &rec, conflicted.as_deref()).await? {
            AttemptResult::Finished => return Ok(()),
            AttemptResult::Conflict(paths) => {
                rec.conflicted(&paths)?;
                if e.opts.on_conflict == ConflictPolicy::Retry && conflicted.is_none() {
                    if e.cancel.is_cancelled() {
                        // Stopping: the retry is left to `resume`, which finds the conflict.
                        return rec.retry_left_to_resume();
                    }
                    rec.retrying(&paths);
                    conflicted = Some(paths);
                    attempt += 1;
                    continue;
                }
                return rec.conflict(&paths);
            }
        }
    }
}

async fn attempt_once(
    e: &Arc<Engine>,
    s: &Arc<Shared>,
    row: &TaskRow,
    rec: &Record<'_>,
    conflicted: Option<&[String]>,
) -> Result<AttemptResult> {
    let mut task = prepare(e, s, row, rec, conflicted).await?;
    let ran = agent(e, s, row, rec, &mut task).await?;
    if ran.exit == Exit::Cancelled {
        // Not committed: `resume` redoes the task from a clean checkout.
        drop(task);
        rec.interrupted()?;
        return Ok(AttemptResult::Finished);
    }
    let Prepared {
        checkout,
        base,
        branch_ref,
        mut log,
        ..
    } = task;
    let collected = collect(e, checkout, &branch_ref, base, &mut log).await?;
    match commit(e, s, row, rec, &ran, collected, &branch_ref, &mut log).await? {
        Some(tip) => merge(e, s, row, tip, rec).await,
        None => Ok(AttemptResult::Finished),
    }
}

/// A task attempt, ready for its agent.
struct Prepared {
    checkout: Lease,
    base: Oid,
    branch_ref: String,
    prompt: String,
    /// The attempt's own directory: its prompt file and scratch space.
    attempt_dir: PathBuf,
    log: std::fs::File,
}

/// prepare: the task branch at the current service tip, a checkout of it with the agent's
/// private git dir, the prompt, the attempt's directory and the log.
async fn prepare(
    e: &Arc<Engine>,
    s: &Arc<Shared>,
    row: &TaskRow,
    rec: &Record<'_>,
    conflicted: Option<&[String]>,
) -> Result<Prepared> {
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

    let mut prompt = Plan::prompt_for(&s.template, &row.text);
    if let Some(paths) = conflicted {
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
    Ok(Prepared {
        checkout,
        base,
        branch_ref,
        prompt,
        attempt_dir,
        log,
    })
}

/// What the agent did: how it ended and what it reported.
struct Ran {
    exit: Exit,
    events: Vec<AgentEvent>,
    /// The budget (the task's or the run's) it ran into at the gateway, said plainly.
    over_budget: Option<String>,
}

/// agent: runs the agent in its runtime, logging its output and recording its events. It
/// reaches the model through the run's gateway with a token of its own, which dies when the
/// agent ends.
async fn agent(e: &Arc<Engine>, s: &Arc<Shared>, row: &TaskRow, rec: &Record<'_>, task: &mut Prepared) -> Result<Ran> {
    let t0 = std::time::Instant::now();
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
        checkout: task.checkout.path.clone(),
        scratch: task.attempt_dir.clone(),
        attempt: rec.attempt,
        model: access.as_ref().map(|(token, addr)| ModelAccess {
            base_url: crate::gateway::base_url(*addr),
            token: token.expose().to_string(),
        }),
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
    writeln!(
        log,
        "=== attempt {} at {} (agent {}; runtime {})",
        rec.attempt,
        super::state::now(),
        e.agent.describe(),
        e.runtime.name()
    )?;
    writeln!(log, "--- prompt\n{}\n--- output", task.prompt)?;

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let spawn = Spawn {
        invocation,
        workdir: task.checkout.path.clone(),
        binds: vec![
            Bind {
                path: task.checkout.git_dir.clone(),
                writable: true,
            },
            Bind {
                path: task.attempt_dir.clone(),
                writable: true,
            },
            Bind {
                path: task.checkout.common_dir.join("objects"),
                writable: false,
            },
        ],
        timeout: e.opts.timeout,
        run_id: ctx.run_id.clone(),
        task: row.index,
        gateway_socket: s.gateway.as_ref().and_then(|g| g.socket_path().map(Path::to_path_buf)),
        role: Default::default(),
        caches: Vec::new(),
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

/// collect: takes the result from the checkout and the agent's private git dir, trusting
/// neither (see `git::commit::collect`). A checkout whose result cannot be taken is removed,
/// not reused.
async fn collect(
    e: &Arc<Engine>,
    checkout: Lease,
    branch_ref: &str,
    base: Oid,
    log: &mut std::fs::File,
) -> Result<(Lease, Collected)> {
    let t0 = std::time::Instant::now();
    let (limits, br) = (e.opts.limits.clone(), branch_ref.to_string());
    let (checkout, collected) = blocking(move || {
        let c = commit::collect(&checkout, &br, base, &limits);
        Ok((checkout, c))
    })
    .await?;
    tracing::debug!(ms = t0.elapsed().as_millis() as u64, "collected");
    let collected = match collected {
        Ok(c) => c,
        Err(err) => {
            discard(checkout).await;
            return Err(err);
        }
    };
    for (path, why) in &collected.dropped {
        writeln!(log, "--- removed {path}: {why}")?;
    }
    if let Some(why) = &collected.commits_refused {
        writeln!(
            log,
            "--- the agent's own commits were not kept (their files were): {why}"
        )?;
    }
    Ok((checkout, collected))
}

/// Removes a checkout that must not be used again.
async fn discard(checkout: Lease) {
    if let Err(e) = blocking(move || checkout.discard()).await {
        tracing::warn!("cannot remove a checkout: {e:#}");
    }
}

/// commit: what was collected becomes the task commit on its branch (compare-and-swap), and
/// the outcome is recorded: failed, unchanged, or committed (then the tip to merge).
#[allow(clippy::too_many_arguments)]
async fn commit(
    e: &Arc<Engine>,
    s: &Arc<Shared>,
    row: &TaskRow,
    rec: &Record<'_>,
    ran: &Ran,
    (checkout, collected): (Lease, Collected),
    branch_ref: &str,
    log: &mut std::fs::File,
) -> Result<Option<Oid>> {
    if let Some(reason) = collected.secret_reason() {
        // Not committed, not merged; the checkout holds the secret, so it goes.
        discard(checkout).await;
        writeln!(log, "--- not committed: {reason}")?;
        rec.secret(&collected.tip.to_string(), ran.exit.code(), &reason)?;
        return Ok(None);
    }
    let message = commit::task_message(&s.run_id, row.index, &row.text);
    let oversized = collected.oversized.clone();
    let br = branch_ref.to_string();
    let (checkout, tc) = blocking(move || {
        let tc = commit::commit(&checkout, &br, collected, &message);
        Ok((checkout, tc))
    })
    .await?;
    if tc.is_err() || !oversized.is_empty() {
        discard(checkout).await; // it holds files its tree does not
    } else {
        drop(checkout); // back to the pool
    }
    let tc: TaskCommit = tc?;
    let tip = tc.tip.to_string();
    writeln!(
        log,
        "--- committed {} ({} files changed)",
        git::short(tc.tip),
        tc.files_changed.len()
    )?;
    if let Some(reason) = &ran.over_budget {
        // What it changed stays committed on its branch; it is not merged.
        let commit = (!tc.is_empty()).then_some(tip.as_str());
        rec.over_budget(&tip, commit, &tc.files_changed, ran.exit.code(), reason)?;
        return Ok(None);
    }
    let failure = if !oversized.is_empty() {
        let list: Vec<String> = oversized.iter().map(|(p, n)| format!("{p} ({n} bytes)")).collect();
        Some(format!(
            "files over [run] max_file_size ({} bytes) were not committed: {}",
            e.opts.limits.max_file_size,
            list.join(", ")
        ))
    } else {
        match ran.exit {
            Exit::Code(c) => e.agent.failure(c, &ran.events),
            Exit::Signal(sig) => Some(format!("the agent was killed by signal {sig}")),
            Exit::TimedOut(d) => Some(format!("the agent timed out after {}", humantime::format_duration(d))),
            Exit::Cancelled => Some("interrupted".into()),
        }
    };
    if let Some(reason) = failure {
        let commit = (!tc.is_empty()).then_some(tip.as_str());
        rec.failed(&tip, commit, &tc.files_changed, ran.exit.code(), &reason)?;
        return Ok(None);
    }
    if tc.is_empty() {
        rec.unchanged(&tip, ran.exit.code())?;
        return Ok(None);
    }
    rec.committed(&tip, &tc.files_changed, ran.exit.code())?;
    Ok(Some(tc.tip))
}

/// merge: the task's tip into the service branch (a merge commit; compare-and-swap).
async fn merge(e: &Arc<Engine>, s: &Arc<Shared>, row: &TaskRow, tip: Oid, rec: &Record<'_>) -> Result<AttemptResult> {
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
            rec.merged(Some(&commit.to_string()), &format!("as {}", git::short(commit)))?;
            Ok(AttemptResult::Finished)
        }
        merge::MergeOutcome::AlreadyContained { merge } => {
            let merge = merge.map(|c| c.to_string());
            rec.merged(merge.as_deref(), "already in the service branch")?;
            Ok(AttemptResult::Finished)
        }
        merge::MergeOutcome::Conflict { paths } => Ok(AttemptResult::Conflict(paths)),
    }
}
