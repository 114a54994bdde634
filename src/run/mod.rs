//! The run: sync and service branch, then every task through
//! checkout → agent → commit → merge, N at a time.

mod caches;
pub mod calibrate;
mod collect;
mod gateway;
pub mod gc;
mod push;
mod record;
mod restarts;
pub mod state;
mod task;
mod train;
pub mod verifies;
pub mod verify;

pub use caches::CacheSpec;
pub use gateway::GatewaySettings;
pub use push::PushResult;
pub use verify::VerifySettings;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;

use crate::agent::Agent;
use crate::config::ConflictPolicy;
use crate::git::{self, names, pool::Pool, sync, RepoPaths};
use crate::lockfile::whole_file_lock;
use crate::plan::Plan;
use crate::progress::Progress;
use crate::runtime::Runtime;
use crate::secret::Secret;
use state::{State, TaskRow};

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub jobs: usize,
    pub service_branch: String,
    pub on_conflict: ConflictPolicy,
    pub timeout: Option<Duration>,
    /// What one task may hand back (`[run] max_file_size`).
    pub limits: crate::git::commit::Limits,
    /// Push to origin after the run (`--push`, `[run] push`), and which task branches too.
    pub push: Option<crate::config::PushTasks>,
    /// The verify gate (`[verify]`, `--verify`); none: tasks merge unchecked.
    pub verify: Option<VerifySettings>,
    /// Run task 1 alone first, and fan out only if it passes (`--calibrate`).
    pub calibrate: bool,
    /// Keep the checkouts for the next run (`[run] keep_checkouts`; always for the service).
    pub keep_checkouts: bool,
}

/// The outside systems and settings a run works with.
pub struct Engine {
    pub paths: RepoPaths,
    pub state: Mutex<State>,
    pub agent: Arc<dyn Agent>,
    pub runtime: Arc<dyn Runtime>,
    pub opts: RunOptions,
    pub cancel: CancellationToken,
    /// The model gateway each run starts for its agents (none: agents reach no model and,
    /// in containers, nothing at all).
    pub gateway: Option<GatewaySettings>,
    /// The credentials for origin, for the pull and the push.
    pub access: crate::git::remote::Access,
    /// Calibration's second chance with the model planner (none with the rules planner).
    pub reviser: Option<Arc<dyn calibrate::TemplateReviser>>,
}

impl Engine {
    /// The state DB. A task that panicked while holding it leaves it poisoned: then the
    /// run stops with this error rather than a second panic.
    pub fn state(&self) -> Result<std::sync::MutexGuard<'_, State>> {
        self.state.lock().map_err(|_| {
            anyhow::anyhow!(
                "the state database was left mid-update by a task that crashed; the run stops here \
                 (`cohort resume` continues it)"
            )
        })
    }
}

/// Settings of the sync step (absent with `--no-sync`).
pub struct SyncSettings {
    pub key: Option<Secret>,
    pub allow_files: Vec<String>,
}

/// Files of one run, in the git dir: plan copy, prompts, logs, checkouts.
pub struct RunDir(pub PathBuf);

impl RunDir {
    pub fn new(paths: &RepoPaths, run_id: &str) -> RunDir {
        RunDir(paths.cohort_dir().join("runs").join(run_id))
    }
    pub fn log(&self, idx: usize) -> PathBuf {
        self.0.join("logs").join(format!("{idx:03}.log"))
    }
    fn sub(&self, name: &str) -> Result<PathBuf> {
        let p = self.0.join(name);
        std::fs::create_dir_all(&p).with_context(|| format!("cannot create {}", p.display()))?;
        Ok(p)
    }
}

pub fn state_path(paths: &RepoPaths) -> PathBuf {
    paths.cohort_dir().join("state.db")
}

#[derive(Debug)]
pub struct Summary {
    pub run_id: String,
    pub tasks: Vec<TaskRow>,
    pub interrupted: bool,
    /// The push to origin, when the run was asked to push.
    pub push: Option<PushResult>,
    /// Why calibration stopped the run before the fan-out.
    pub calibration: Option<String>,
}

impl Summary {
    /// 0 when every task merged (or had nothing to merge), 1 when any
    /// failed or conflicted, 130 when the run was interrupted.
    /// A push that failed or was refused makes it 1 (2 for refused credentials).
    pub fn exit_code(&self) -> u8 {
        let tasks = if self.interrupted {
            130
        } else if self.calibration.is_some() {
            1
        } else if self.tasks.iter().all(|t| t.status.is_success()) {
            0
        } else {
            1
        };
        match (&self.push, tasks) {
            (Some(p), 0) => p.exit_code(),
            _ => tasks,
        }
    }
}

pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .context("a background step panicked")?
}

/// Starts a new run of `plan`: sync, service branch, then the tasks.
/// `extra` is saved with the run's options (what `resume` needs to rebuild
/// the agent).
pub async fn start(
    engine: Arc<Engine>,
    plan: &Plan,
    sync_settings: Option<SyncSettings>,
    extra: serde_json::Value,
) -> Result<Summary> {
    engine.agent.preflight().await?;
    let run_id = names::new_run_id();
    let progress = Progress::new(0, &run_id);
    let paths = engine.paths.clone();
    let service = engine.opts.service_branch.clone();
    let id = run_id.clone();
    let engine_access = engine.access.clone();
    let notes = blocking(move || {
        let repo = paths.open()?;
        let mut notes = Vec::new();
        let (branch, _) = sync::current_branch(&repo)?;
        if branch == format!("refs/heads/{service}") {
            return Err(crate::git::GitError::ServiceCheckedOut {
                service: service.clone(),
            }
            .into());
        }
        let prepared = match &sync_settings {
            Some(s) => {
                let opts = sync::SyncOptions {
                    run_id: &id,
                    key: s.key.as_ref(),
                    allow_files: &s.allow_files,
                    access: &engine_access,
                };
                Some(sync::prepare(&repo, &opts)?)
            }
            None => None,
        };
        let head = match &prepared {
            Some(p) => p.head(),
            None => sync::current_branch(&repo)?.1,
        };
        // Both outcomes are decided before either ref moves: a service branch
        // that conflicts with HEAD leaves the user's branch and files as they were.
        let service_update = sync::plan_service_branch(&repo, &service, head)?;
        if let Some(p) = prepared {
            let report = p.apply(&repo)?;
            notes.push(describe_sync(&report));
            for a in &report.unmatched_allow {
                notes.push(format!(
                    "warning: --allow-file {a} matches no new or changed file, so it has no effect \
                     (paths are relative to the repository root)"
                ));
            }
        }
        let (how, tip) = service_update.apply(&repo)?;
        notes.push(format!("service branch {service}: {how:?} at {}", git::short(tip)).to_lowercase());
        Ok((notes, tip))
    })
    .await?;
    let (notes, base) = notes;
    for n in &notes {
        progress.note(n);
    }

    let tasks: Vec<(String, String)> = plan
        .tasks
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), names::task_branch(&run_id, i + 1, t)))
        .collect();
    let mut options = serde_json::json!({
        "jobs": engine.opts.jobs,
        "on_conflict": format!("{:?}", engine.opts.on_conflict).to_lowercase(),
        "timeout_secs": engine.opts.timeout.map(|d| d.as_secs()),
        "agent": engine.agent.name(),
        "runtime": engine.runtime.name(),
        "verify": engine.opts.verify.as_ref().map(VerifySettings::to_stored),
        "calibrate": engine.opts.calibrate,
    });
    if let (Some(o), serde_json::Value::Object(x)) = (options.as_object_mut(), extra) {
        o.extend(x);
    }
    {
        let st = engine.state()?;
        st.create_run(
            &run_id,
            &engine.opts.service_branch,
            &plan.template,
            &options.to_string(),
            &tasks,
        )?;
        st.set_run_base(&run_id, &base.to_string())?;
    }
    let dir = RunDir::new(&engine.paths, &run_id);
    std::fs::create_dir_all(&dir.0)?;
    std::fs::write(dir.0.join("tasks.txt"), plan.tasks.join("\n") + "\n")?;
    std::fs::write(dir.0.join("prompt.txt"), &plan.template)?;
    progress.note(&format!(
        "run {run_id}: {} tasks, {} at a time",
        plan.tasks.len(),
        engine.opts.jobs
    ));
    progress.finish();
    execute(engine, &run_id).await
}

fn describe_sync(r: &sync::SyncReport) -> String {
    let branch = r.branch.trim_start_matches("refs/heads/");
    let snap = match r.snapshot {
        Some(c) => format!("committed {} local change(s) as {}", r.snapshot_files, git::short(c)),
        None => "no local changes".into(),
    };
    let pull = match &r.upstream {
        sync::Upstream::NoRemote => "no remote 'origin', not pulling".to_string(),
        sync::Upstream::NoUpstream => format!("{branch} has no upstream on origin, not pulling"),
        sync::Upstream::UpToDate => "up to date with origin".into(),
        sync::Upstream::FastForwarded { to } => {
            format!("fast-forwarded to origin at {}", git::short(*to))
        }
        sync::Upstream::Merged { commit } => format!("merged origin as {}", git::short(*commit)),
    };
    format!("sync {branch}: {snap}; {pull}")
}

/// Runs (or finishes) every task of `run_id` that is not done yet.
pub async fn execute(engine: Arc<Engine>, run_id: &str) -> Result<Summary> {
    let dir = RunDir::new(&engine.paths, run_id);
    std::fs::create_dir_all(&dir.0)?;
    let _lock = lock_run(&dir)?;
    // Holding the run's lock, no other process writes its task refs: lock files there were
    // left by a killed one.
    for ns in [
        format!("refs/heads/cohort/task/{run_id}"),
        format!("refs/cohort/attempts/{run_id}"),
    ] {
        let stale = git::refs::clear_stale_locks(&engine.paths.common_dir.join(&ns))?;
        if stale > 0 {
            tracing::debug!(stale, ns, "removed lock files left by a killed process");
        }
    }
    engine.runtime.cleanup_run(run_id).await?;
    engine.runtime.start_run(run_id, &dir.0).await?;
    let (run, rows) = {
        let st = engine.state()?;
        let run = st.run(Some(run_id))?.with_context(|| format!("no run {run_id}"))?;
        (run, st.tasks(run_id)?)
    };
    let progress = Arc::new(Progress::new(rows.len(), run_id));
    let pool = Arc::new(match engine.opts.keep_checkouts {
        true => Pool::kept(&engine.paths.common_dir, run_id, &engine.paths.cohort_dir()),
        false => Pool::new(&engine.paths.common_dir, run_id, dir.0.clone()),
    });
    let gateway = match &engine.gateway {
        Some(settings) => Some(gateway::RunGateway::start(&engine, settings, run_id, &dir)?),
        None => None,
    };
    let shared = Arc::new(task::Shared {
        run_id: run_id.to_string(),
        template: std::sync::RwLock::new(run.template.clone()),
        dir,
        pool: pool.clone(),
        progress: progress.clone(),
        merge_lock: tokio::sync::Mutex::new(()),
        gateway: gateway.as_ref().map(|g| g.gateway.clone()),
    });
    // N workers take tasks in document order from one queue.
    let mut queue = std::collections::VecDeque::new();
    for row in rows {
        if row.status.is_done() {
            progress.advance();
        } else {
            queue.push_back(row);
        }
    }
    let calibration = match engine.opts.calibrate && !engine.cancel.is_cancelled() {
        true => calibrate::first(&engine, &shared, &mut queue).await?,
        false => None,
    };
    if calibration.is_some() {
        queue.clear(); // the rest stays pending
    }
    let workers = engine.opts.jobs.max(1).min(queue.len());
    let queue = Arc::new(Mutex::new(queue));
    let over_budget = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let (engine, shared, queue, over_budget) = (engine.clone(), shared.clone(), queue.clone(), over_budget.clone());
        set.spawn(async move {
            loop {
                // A run whose budget is spent starts no new task; they stay pending.
                if shared.gateway.as_ref().is_some_and(|g| g.run_over_budget()) {
                    over_budget.store(true, std::sync::atomic::Ordering::Relaxed);
                    break;
                }
                let Some(row) = queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front() else {
                    break;
                };
                task::run_task(engine.clone(), shared.clone(), row).await;
            }
        });
    }
    while let Some(res) = set.join_next().await {
        res.context("a task panicked")?;
    }
    progress.finish();
    let left = queue.lock().unwrap_or_else(|e| e.into_inner()).len();
    if over_budget.load(std::sync::atomic::Ordering::Relaxed) && left > 0 {
        progress.note(&format!(
            "the run's budget ([run] budget) is spent: {left} task(s) were not started"
        ));
    }
    drop(shared); // its handle on the gateway, which stops only once it holds the last
    if let Some(g) = gateway {
        g.stop().await;
    }
    let t0 = std::time::Instant::now();
    blocking(move || pool.finish()).await?;
    tracing::debug!(ms = t0.elapsed().as_millis() as u64, "checkouts removed or kept");
    engine.runtime.cleanup_run(run_id).await?;

    let interrupted = engine.cancel.is_cancelled();
    let tasks = engine.state()?.tasks(run_id)?;
    let status = if interrupted {
        "interrupted"
    } else if calibration.is_some() {
        "calibration failed"
    } else if over_budget.load(std::sync::atomic::Ordering::Relaxed) && left > 0 {
        "over budget"
    } else if tasks.iter().all(|t| t.status.is_success()) {
        "done"
    } else {
        "done-with-failures"
    };
    engine.state()?.finish_run(run_id, status)?;
    let push = match engine.opts.push {
        Some(policy) if !interrupted && calibration.is_none() => {
            Some(push::push_run(&engine, run_id, policy, &tasks).await)
        }
        _ => None,
    };
    Ok(Summary {
        run_id: run_id.to_string(),
        tasks,
        interrupted,
        push,
        calibration,
    })
}

/// One process per run at a time: a second `resume` of a run that is still
/// going would fight over its checkouts. An open-file-description lock
/// (whole file, write), so that [`is_active`] can test for it without
/// taking it; it goes when the file is closed, by the process's death too.
fn lock_run(dir: &RunDir) -> Result<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.0.join("lock"))?;
    let lock = whole_file_lock(libc::F_WRLCK);
    nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_OFD_SETLK(&lock))
        .map_err(|_| anyhow::anyhow!("run {} is being worked on by another cohort process", dir.0.display()))?;
    Ok(file)
}

/// Whether a cohort process is working on the run now (holds its lock).
/// A run whose state says `running` but that no process holds was stopped
/// by a crash or `kill -9`; `resume` finishes it.
pub fn is_active(paths: &RepoPaths, run_id: &str) -> bool {
    let file = match std::fs::File::open(RunDir::new(paths, run_id).0.join("lock")) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return false,
        Err(_) => return true, // cannot tell (another user's run): do not call it stopped
    };
    let mut lock = whole_file_lock(libc::F_WRLCK);
    nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_OFD_GETLK(&mut lock)).is_ok()
        && lock.l_type != libc::F_UNLCK as i16
}

/// Unfinished tasks of a run, for `resume` to report.
pub fn unfinished(tasks: &[TaskRow]) -> usize {
    tasks.iter().filter(|t| !t.status.is_done()).count()
}
