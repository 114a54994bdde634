//! The command line: parsing, dispatch, and turning errors into one clear
//! message and a meaningful exit code.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::commands;

const EXIT_CODES: &str = "\
Exit codes:
  0    every task merged into the service branch (or had nothing to change)
  1    some task failed, conflicted, held a secret, went over budget or ended unverified
       (`cohort report` says which), the run's budget or calibration stopped it, or an
       unexpected error
  2    usage, config or input error (bad flag, bad cohort.toml, untrusted settings in the
       repository's cohort.toml (see `cohort trust`), bad request document, secrets found in
       files to commit, diverged branch, unfinished merge or rebase, service branch that
       conflicts with HEAD); nothing was changed
  130  interrupted (Ctrl-C / SIGTERM); `cohort resume` finishes the run";

#[derive(Parser, Debug)]
#[command(
    name = "cohort",
    version,
    about = "Run a backlog of coding tasks with AI agents, each on its own branch and checkout, merged into a service branch.",
    long_about = "cohort turns a request document into a list of tasks, then runs one agent per task, each on its own \
                  branch (cohort/task/<run>/<NNN>-<slug>) in its own checkout outside your working tree, and merges \
                  every finished task into a service branch (default cohort/service). Your own branch is only \
                  touched by the sync step: local changes are committed and origin is pulled.\n\n\
                  Typical use:\n  cohort plan requests.md -o plan/     # review plan/tasks.txt and plan/prompt.txt\n  \
                  cohort run --tasks plan/tasks.txt --prompt plan/prompt.txt -j 4\n  \
                  cohort status; cohort report; cohort resume\n  \
                  cohort gc --dry-run                  # what old runs would go, and the space freed",
    after_help = EXIT_CODES
)]
pub struct Cli {
    /// Run as if cohort was started in REPO (like git -C); relative paths are taken from there.
    #[arg(short = 'C', global = true, value_name = "REPO")]
    pub repo: Option<PathBuf>,
    /// Settings file, trusted, in the place of the repository's cohort.toml (default: cohort.toml
    /// at the repository root, whose settings that run programs, choose where the key goes or
    /// widen the sandbox count only once trusted: see `cohort trust --help`). Under both:
    /// ~/.config/cohort/config.toml.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Turn a request document into tasks.txt (one task per line) and prompt.txt (a template with {task}).
    Plan(commands::plan::Args),
    /// Run every task: sync, then one agent per task on its own branch, merged into the service branch.
    Run(commands::run::Args),
    /// Finish an interrupted or crashed run: merged tasks are kept, unfinished ones are redone.
    Resume(commands::resume::Args),
    /// Re-run tasks of a finished run that ended failed, conflict, unverified or over budget,
    /// each from the current service tip as a new attempt (not a new run).
    Retry(commands::retry::Args),
    /// Show where the tasks of a run stand.
    Status(commands::status::Args),
    /// Per task: status, branch, merge commit, files changed, duration and exit code.
    Report(commands::report::Args),
    /// Remove old runs: their task branches and attempt refs, run directories and state rows
    /// (kept: the newest --keep-runs runs and those younger than --older-than; unmerged work
    /// until it is past both; anything a running cohort holds), codex homes of finished runs;
    /// then pack cohort's refs. --dry-run lists it all and the bytes it frees.
    Gc(commands::gc::Args),
    /// Show a task's log: the prompt sent and everything the agent printed.
    Logs(commands::logs::Args),
    /// The agent image: `cohort image build` makes it from scratch and loads it into podman.
    Image(commands::image::Args),
    /// Kubernetes: `k8s manifests` prints the Secret, Job and NetworkPolicy for a run's workers.
    K8s(commands::k8s::Args),
    /// Development containers from the image: `container run` makes one, `container enter` re-enters it.
    Container(commands::container::Args),
    /// API keys: place them encrypted (TPM2-bound) in systemd's credential store, list, check, remove.
    Keys(commands::keys::Args),
    /// The service's main loop (what cohort.service runs): take requests from the inbox, run them.
    Serve(commands::serve::Args),
    /// Hand a request document to the running service that serves this repository.
    Submit(commands::submit::Args),
    /// cohort.service: install (user or hardened system scope), status, logs, uninstall.
    Service(commands::service::Args),
    /// Check this host for what cohort's service needs, and say how to fix each problem.
    Doctor(commands::doctor::Args),
    /// Trust a cohort.toml's exact content, so its settings that run programs, choose where the
    /// key goes or widen the sandbox are honoured (like `direnv allow`); --list, --revoke.
    Trust(commands::trust::Args),
    /// Take tasks from a controller (a `cohort run --listen` or `--host` elsewhere) and run
    /// their agents here, until its run is over. The token comes from COHORT_WORKER_TOKEN.
    Worker(commands::worker::Args),
    /// Inside a task container: carry a loopback port to the model gateway's unix socket.
    #[command(name = "__bridge", hide = true)]
    Bridge(commands::bridge::Args),
}

/// An error the user caused and can fix (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    UsageError(msg.into()).into()
}

pub(crate) fn exit_code_for(err: &anyhow::Error) -> u8 {
    use crate::git::GitError;
    for cause in err.chain() {
        if cause.is::<UsageError>()
            || cause.is::<crate::config::ConfigError>()
            || cause.is::<crate::trust::TrustError>()
            || cause.is::<crate::plan::PlanError>()
            || cause.is::<crate::models::ModelError>()
            || cause.is::<crate::k8s::K8sError>()
        {
            return 2;
        }
        // A second service on one state directory: starting it again will not help.
        if let Some(crate::service::ServiceError::AlreadyServing { .. }) = cause.downcast_ref() {
            return 2;
        }
        if let Some(r) = cause.downcast_ref::<crate::remote::RemoteError>() {
            use crate::remote::RemoteError as R;
            if matches!(r, R::Usage(_) | R::Token(_) | R::Refused(_) | R::Listen { .. }) {
                return 2;
            }
        }
        if let Some(r) = cause.downcast_ref::<crate::git::remote::RemoteError>() {
            return r.exit_code();
        }
        if let Some(g) = cause.downcast_ref::<GitError>() {
            return match g {
                GitError::RefMoved { .. } => 1,
                _ => 2,
            };
        }
    }
    1
}

pub fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    let cli = match Cli::try_parse_from(&args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    if let Some(dir) = &cli.repo {
        if let Err(e) = std::env::set_current_dir(dir) {
            eprintln!("error: cannot change to {}: {e}", dir.display());
            return ExitCode::from(2);
        }
    }
    match &cli.command {
        // The service logs to the journal (with fields) and to its state directory.
        Command::Serve(a) => crate::service::logging::init(commands::serve::resolve_state_dir(a).as_deref()),
        _ => tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_env("COHORT_LOG"))
            .with_writer(std::io::stderr)
            .init(),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Plan(a) => commands::plan::run(a, cli.config.as_deref()).await,
            Command::Run(a) => commands::run::run(a, cli.config.as_deref()).await,
            Command::Resume(a) => commands::resume::run(a, cli.config.as_deref()).await,
            Command::Retry(a) => commands::retry::run(a, cli.config.as_deref()).await,
            Command::Status(a) => commands::status::run(a),
            Command::Report(a) => commands::report::run(a, cli.config.as_deref()),
            Command::Logs(a) => commands::logs::run(a),
            Command::Gc(a) => commands::gc::run(a),
            Command::Image(a) => commands::image::run(a, cli.config.as_deref()).await,
            Command::K8s(a) => commands::k8s::run(a, cli.config.as_deref()),
            Command::Container(a) => commands::container::run(a, cli.config.as_deref()).await,
            Command::Keys(a) => commands::keys::run(a, cli.config.as_deref()).await,
            Command::Serve(a) => commands::serve::run(a, cli.config.as_deref()).await,
            Command::Submit(a) => commands::submit::run(a),
            Command::Service(a) => commands::service::run(a, cli.config.as_deref()).await,
            Command::Doctor(a) => commands::doctor::run(a, cli.config.as_deref()).await,
            Command::Trust(a) => commands::trust::run(a),
            Command::Bridge(a) => commands::bridge::run(a).await,
            Command::Worker(a) => commands::worker::run(a).await,
        }
    });
    match result {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(exit_code_for(&err))
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
