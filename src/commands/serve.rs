//! `cohort serve`: the service's main loop (what `cohort.service` runs).
//!
//! It takes requests from its inbox (`cohort submit`) one at a time, plans each and runs
//! it with the core flow, resumes the runs a restart interrupted, and tells systemd how
//! it is doing (`Type=notify`: READY, STATUS, WATCHDOG, STOPPING).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use cohort_systemd::Notifier;
use tokio_util::sync::CancellationToken;

use super::run::{api_key, build_engine, stored_options, EngineFlags};
use crate::cli::usage;
use crate::config::{Config, Sources};
use crate::git::RepoPaths;
use crate::run::{self, state::State, SyncSettings};
use crate::service::inbox::Outcome;
use crate::service::lock::ServeLock;
use crate::service::requests::{crash_point, Requests};
use crate::service::{state_dir, state_dir_from_env, Registration, ServiceScope};

#[derive(clap::Args, Debug)]
#[command(
    after_help = "systemd runs this (see `cohort service install`); it can also run in a terminal. \
                        Exit codes: 0 stopped by SIGTERM (or --once finished), 2 a setup problem that a \
                        restart will not fix (repository, config, key, another serve on the same \
                        state directory), 1 anything else."
)]
pub struct Args {
    /// The service's state directory (inbox, done, failed, serve.log). Default:
    /// $STATE_DIRECTORY, else /var/lib/cohort for root or ~/.local/state/cohort.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// How often to look into the inbox.
    #[arg(long, value_name = "DUR", default_value = "2s")]
    pub poll: String,
    /// Work off what is waiting (and unfinished runs), then exit.
    #[arg(long)]
    pub once: bool,
    #[command(flatten)]
    pub engine: EngineFlags,
}

/// The state directory `serve` uses for these arguments.
pub fn resolve_state_dir(args: &Args) -> Option<PathBuf> {
    args.state_dir
        .clone()
        .or_else(state_dir_from_env)
        .or_else(|| state_dir(ServiceScope::default_for_caller()))
}

pub async fn run(args: Args, config_path: Option<&Path>) -> Result<u8> {
    crate::progress::use_events();
    let notifier = Notifier::from_env().context("the systemd notify socket")?.map(Arc::new);
    let notify = |status: &str| {
        if let Some(n) = &notifier {
            let _ = n.status(status);
        }
    };
    match setup(&args, config_path).await {
        Ok(s) => {
            if let Some(n) = &notifier {
                n.ready().context("telling systemd we are ready")?;
            }
            let token = CancellationToken::new();
            spawn_watchdog(notifier.clone());
            super::run::handle_signals(token.clone());
            let code = serve_loop(&args, &s, token, &notify).await;
            if let Some(n) = &notifier {
                let _ = n.stopping();
            }
            code
        }
        Err(e) => {
            // The message systemd shows in `status` (StatusText) and `cohort service status`.
            let msg = format!("{e:#}");
            tracing::error!("cannot serve: {msg}");
            notify(&format!("cannot serve: {msg}"));
            Err(e)
        }
    }
}

struct Setup {
    paths: RepoPaths,
    /// The state directory's lock, held until the process ends (its last use is here).
    _lock: ServeLock,
    requests: Requests,
    poll: Duration,
    /// Where each request's settings come from; loaded anew per request, so a changed
    /// cohort.toml (pulled from origin, or merged from a task) is seen, and judged.
    sources: Sources,
    /// The git credentials for origin (token, deploy key), for every request.
    access: crate::git::remote::Access,
}

/// The system service is the one whose state directory is /var/lib/cohort
/// (`StateDirectory=cohort` in the system manager): its settings are
/// /etc/cohort/config.toml and its trust store /etc/cohort/trusted.toml, both root's. Any
/// other state directory is a user's service, with the user's settings and trust store.
fn serve_scope(state: &Path) -> ServiceScope {
    match state_dir(ServiceScope::System) {
        Some(system) if system == state => ServiceScope::System,
        _ => ServiceScope::User,
    }
}

async fn setup(args: &Args, config_path: Option<&Path>) -> Result<Setup> {
    let state = resolve_state_dir(args).ok_or_else(|| usage("no state directory: pass --state-dir, or set HOME"))?;
    // First of all: a second instance must not touch the inbox, serve.json or anything else.
    let lock = ServeLock::acquire(&state)?;
    let paths = RepoPaths::discover(&std::env::current_dir()?)?;
    let sources = Sources::new(serve_scope(&state), config_path, Some(&paths.workdir));
    // Untrusted repository settings stop each request (into failed/), not the service:
    // trusting the file, or a fix pushed to origin, must not need a restart.
    let config = sources.load()?.lenient();
    let poll = crate::config::parse_duration("--poll", &args.poll)?;
    // A bad name would fail every request; say so at start.
    super::run::service_branch(&args.engine, &config)?;
    // Find the key now, so a credential that cannot be decrypted here (a stolen file, a
    // cleared TPM) stops the service at start with that message, not at the first task.
    let needs_key = args.engine.agent_command.is_none()
        && args.engine.agent != Some(super::run::AgentKind::Command)
        && config.agent.kind.as_deref().unwrap_or("codex") == "codex";
    if needs_key && api_key(&config).map_err(|e| usage(format!("{e:#}")))?.is_none() {
        let name = config.agent.key.as_deref().unwrap_or(crate::keys::DEFAULT_KEY);
        return Err(usage(crate::keys::missing_help(name)));
    }
    // The git credentials, found (and the deploy key written for ssh) once at start.
    let access = super::run::git_access(true).map_err(|e| usage(format!("{e:#}")))?;
    let requests = Requests::open(&state)?;
    Registration {
        repo: paths.workdir.clone(),
        pid: std::process::id(),
        started: crate::run::state::now(),
    }
    .write(&state)
    .with_context(|| format!("cannot write into {}", state.display()))?;
    tracing::info!(repo = %paths.workdir.display(), state = %state.display(), scope = sources.scope.as_str(), "serving");
    Ok(Setup {
        paths,
        _lock: lock,
        requests,
        poll,
        sources,
        access,
    })
}

async fn serve_loop(args: &Args, s: &Setup, token: CancellationToken, notify: &dyn Fn(&str)) -> Result<u8> {
    // Moves a crash cut short are finished first, from what was recorded.
    for note in s.requests.reconcile()? {
        tracing::info!("after a crash: {note}");
    }
    // Then the requests a restart interrupted; they are still in processing/.
    resume_unfinished(args, s, &token, notify).await?;
    loop {
        if token.is_cancelled() {
            return Ok(0);
        }
        let waiting = s.requests.inbox.waiting("inbox")?;
        if waiting.is_empty() {
            if args.once {
                return Ok(0);
            }
            notify("idle: waiting for requests (cohort submit FILE)");
            tokio::select! {
                _ = token.cancelled() => return Ok(0),
                _ = tokio::time::sleep(s.poll) => continue,
            }
        }
        let claimed = s.requests.claim(&waiting[0])?;
        let name = claimed.file_name().unwrap_or_default().to_string_lossy().into_owned();
        notify(&format!("running request {name}"));
        let (run_id, result) = run_request(args, s, &claimed, &name, &token).await;
        // A run that failed after it was created still has an id: its record names it.
        let run_id = match run_id {
            Some(id) => Some(id),
            None => run_of_request(&s.paths, &name)?.map(|r| r.0),
        };
        if token.is_cancelled() && run_id.is_some() {
            // Interrupted mid-run: the request stays in processing/ and is resumed on restart.
            return Ok(0);
        }
        crash_point("ran");
        let outcome = match result {
            Ok(code) => Outcome {
                request: name.clone(),
                run_id,
                exit_code: code,
                error: None,
                finished: crate::run::state::now(),
            },
            Err(e) => {
                tracing::error!(request = %name, "request failed: {e:#}");
                Outcome {
                    request: name.clone(),
                    run_id,
                    exit_code: crate::cli::exit_code_for(&e),
                    error: Some(format!("{e:#}")),
                    finished: crate::run::state::now(),
                }
            }
        };
        tracing::info!(request = %name, run_id = outcome.run_id.as_deref().unwrap_or(""), exit_code = outcome.exit_code, "request finished");
        s.requests.finish(&claimed, &outcome)?;
        collect_garbage(s);
    }
}

/// `cohort gc` after a request, under `[service] retention` (trusted settings only). A
/// failure is a warning: the service goes on.
fn collect_garbage(s: &Setup) {
    let retention = match s.sources.load() {
        Ok(loaded) => loaded.lenient().service.retention,
        Err(e) => {
            tracing::warn!("gc skipped: {e:#}");
            return;
        }
    };
    let Some(r) = retention else { return };
    let result = (|| -> Result<(usize, u64, usize)> {
        let older_than = crate::config::parse_duration(
            "[service] retention older_than",
            r.older_than.as_deref().unwrap_or("30d"),
        )?;
        let opts = crate::run::gc::GcOptions {
            keep_runs: r.keep_runs.unwrap_or(10),
            older_than,
        };
        let state = crate::run::state::State::open(&crate::run::state_path(&s.paths))?;
        let plan = crate::run::gc::plan(&s.paths, &state, opts, std::time::SystemTime::now())?;
        let done = crate::run::gc::apply(&s.paths, &state, &plan)?;
        if let Some(e) = &done.objects_error {
            tracing::warn!("gc did not pack loose objects (nothing was lost): {e}");
        }
        let packed = done.objects.as_ref().map_or(0, |p| p.objects);
        Ok((done.removed.len(), done.bytes(), packed))
    })();
    match result {
        Ok((removed, bytes, packed_objects)) => tracing::info!(
            removed,
            bytes,
            packed_objects,
            "gc after the request ([service] retention)"
        ),
        Err(e) => tracing::warn!("gc after the request failed (the service goes on): {e:#}"),
    }
}

/// Plans and runs one request; returns the run id once the run exists.
async fn run_request(
    args: &Args,
    s: &Setup,
    path: &Path,
    name: &str,
    token: &CancellationToken,
) -> (Option<String>, Result<u8>) {
    // Untrusted sensitive keys fail this request (exit 2, into failed/ with the reason).
    let config = match s.sources.load().and_then(|l| l.trusted()) {
        Ok(c) => c,
        Err(e) => return (None, Err(e.into())),
    };
    let plan = match super::plan::make_plan(path, &super::plan::PlannerFlags::default(), &config).await {
        Ok(p) => p,
        Err(e) => return (None, Err(e)),
    };
    tracing::info!(request = %name, tasks = plan.tasks.len(), "request planned");
    let mut stored = stored_options(&args.engine, &config);
    stored["request"] = name.into();
    let flags = service_flags(&args.engine, &config);
    let engine = match build_engine(s.paths.clone(), &config, &flags, &stored) {
        Ok(mut e) => {
            e.cancel = token.child_token();
            e.access = s.access.clone();
            // The service's pool stays between requests: the next one moves its checkouts by
            // a tree diff rather than writing every file again.
            e.opts.keep_checkouts = true;
            Arc::new(e)
        }
        Err(e) => return (None, Err(e)),
    };
    stored["agent"] = engine.agent.name().into();
    let sync = match api_key(&config) {
        Ok(key) => (config.run.sync != Some(false)).then(|| SyncSettings {
            key,
            allow_files: Vec::new(),
        }),
        Err(e) => return (None, Err(e)),
    };
    match run::start(engine, &plan, sync, stored).await {
        Ok(summary) => {
            super::run::print_summary(&summary);
            (Some(summary.run_id.clone()), Ok(summary.exit_code()))
        }
        Err(e) => (None, Err(e)),
    }
}

/// The run made for request `name`, if one was: its id and the options it was made with.
/// The run's record names its request (`request` in its options), written in the same
/// transaction that creates the run, so the run exists exactly when this finds it.
fn run_of_request(paths: &RepoPaths, name: &str) -> Result<Option<(String, serde_json::Value, String)>> {
    let db = run::state_path(paths);
    if !db.exists() {
        return Ok(None);
    }
    let state = State::open(&db)?;
    for row in state.runs()? {
        let stored: serde_json::Value = serde_json::from_str(&row.options).unwrap_or_default();
        if stored["request"].as_str() == Some(name) {
            return Ok(Some((row.id, stored, row.service_branch)));
        }
    }
    Ok(None)
}

/// Finishes the requests a stop or crash left in `processing/`. A request with a run gets
/// that run finished (`cohort resume`'s path: merged tasks are kept, a finished run runs
/// no agent again, only its outcome is worked out again) and is filed; a request without
/// one never started and goes back to the inbox. Runs of other services or of the command
/// line are not this service's business.
async fn resume_unfinished(args: &Args, s: &Setup, token: &CancellationToken, notify: &dyn Fn(&str)) -> Result<()> {
    for processing in s.requests.inbox.waiting("processing")? {
        if token.is_cancelled() {
            return Ok(());
        }
        let request = processing
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let Some((run_id, stored, service_branch)) = run_of_request(&s.paths, &request)? else {
            tracing::info!(request = %request, "queued again: it was claimed, but its run never started");
            s.requests.requeue(&processing)?;
            continue;
        };
        notify(&format!("resuming run {run_id}"));
        tracing::info!(run_id = %run_id, request = %request, "resuming an interrupted run");
        let config = match s.sources.load().and_then(|l| l.trusted()) {
            Ok(c) => c,
            Err(e) => {
                // Settings changed without trust while the run was stopped: its request
                // fails with the reason, and the service goes on with the others.
                tracing::error!(run_id = %run_id, request = %request, "cannot resume: {e}");
                let outcome = Outcome {
                    request: request.clone(),
                    run_id: Some(run_id.clone()),
                    exit_code: 2,
                    error: Some(e.to_string()),
                    finished: crate::run::state::now(),
                };
                s.requests.finish(&processing, &outcome)?;
                continue;
            }
        };
        let flags = EngineFlags {
            service_branch: Some(service_branch),
            ..service_flags(&args.engine, &config)
        };
        let mut engine = build_engine(s.paths.clone(), &config, &flags, &stored)?;
        engine.cancel = token.child_token();
        engine.access = s.access.clone();
        engine.opts.keep_checkouts = true;
        let engine = Arc::new(engine);
        let result = async {
            engine.agent.preflight().await?;
            run::execute(engine, &run_id).await
        }
        .await;
        if token.is_cancelled() {
            return Ok(());
        }
        crash_point("ran");
        if let Ok(summary) = &result {
            super::run::print_summary(summary);
        }
        let outcome = Outcome {
            request: request.clone(),
            run_id: Some(run_id.clone()),
            exit_code: result.as_ref().map_or(1, |r| r.exit_code()),
            error: result.as_ref().err().map(|e| format!("{e:#}")),
            finished: crate::run::state::now(),
        };
        s.requests.finish(&processing, &outcome)?;
    }
    Ok(())
}

/// The service runs agents in containers: unless told otherwise (`--runtime`, `[run]
/// runtime`), a podman socket it cannot reach is an error, never a quiet fall-back to
/// running agents on the host.
fn service_flags(flags: &EngineFlags, config: &Config) -> EngineFlags {
    let mut f = flags.clone();
    if f.runtime.is_none() && config.run.runtime.is_none() {
        f.runtime = Some(super::run::RuntimeKind::Podman);
    }
    f
}

/// Pings systemd's watchdog at half its period, for as long as the process lives.
fn spawn_watchdog(notifier: Option<Arc<Notifier>>) {
    let (Some(n), Some(period)) = (notifier, cohort_systemd::notify::watchdog_interval()) else {
        return;
    };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period / 2);
        loop {
            tick.tick().await;
            let _ = n.watchdog();
        }
    });
}
