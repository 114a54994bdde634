//! `cohort run [INPUT | --tasks F --prompt F] …`

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use tokio_util::sync::CancellationToken;

use crate::agent::codex::{find_codex, CodexAgent};
use crate::agent::{command::CommandAgent, Agent};
use crate::cli::usage;
use crate::config::{parse_duration, Config, ConflictPolicy};
use crate::git::RepoPaths;
use crate::run::{self, state::State, Engine, RunOptions, SyncSettings};
use crate::runtime::{host::HostRuntime, Runtime};
use crate::secret::Secret;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A request document to plan and run in one go.
    #[arg(conflicts_with_all = ["tasks", "prompt"])]
    pub input: Option<PathBuf>,
    /// A task list, one task per line (as written by `cohort plan`).
    #[arg(long, value_name = "FILE", requires = "prompt")]
    pub tasks: Option<PathBuf>,
    /// A prompt template containing {task}.
    #[arg(long, value_name = "FILE", requires = "tasks")]
    pub prompt: Option<PathBuf>,
    #[command(flatten)]
    pub planner: super::plan::PlannerFlags,
    #[command(flatten)]
    pub engine: EngineFlags,
    /// Skip the sync step (snapshot commit of local changes and pull from origin).
    #[arg(long)]
    pub no_sync: bool,
    /// Let the secret scan pass this file (path relative to the repository root); repeatable.
    /// A path that matches no new or changed file gets a warning.
    #[arg(long, value_name = "PATH")]
    pub allow_file: Vec<String>,
}

/// Flags shared by `run`, `resume` and `serve`.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct EngineFlags {
    /// How many tasks run at once.
    #[arg(short = 'j', long, value_name = "N")]
    pub jobs: Option<usize>,
    /// The branch finished tasks are merged into.
    #[arg(long, value_name = "BRANCH")]
    pub service_branch: Option<String>,
    /// What to do when a task's merge conflicts.
    #[arg(long, value_enum, value_name = "POLICY")]
    pub on_conflict: Option<ConflictPolicy>,
    /// Stop an agent (and everything it started) after this long, e.g. 30m.
    #[arg(long, value_name = "DUR")]
    pub timeout: Option<String>,
    /// Which agent runs each task.
    #[arg(long, value_enum)]
    pub agent: Option<AgentKind>,
    /// The command agent's program and arguments, split like a shell would but never run through one;
    /// {prompt_file} and {task} are filled in.
    #[arg(long, value_name = "'PROG ARGS…'")]
    pub agent_command: Option<String>,
    /// Where agents run. On `resume`, given without --host or --listen, it also sets aside the
    /// hosts and listen address the run was started with: what is left runs here.
    #[arg(long, value_enum)]
    pub runtime: Option<RuntimeKind>,
    /// A podman host to run tasks on, SLOTS at a time (1-64, default 4); repeat for more hosts.
    /// URL as podman writes it: ssh://USER@HOST[:PORT]/run/user/UID/podman/podman.sock (logs
    /// in with ssh-agent or ~/.ssh/id_*, and the host key must already be in
    /// ~/.ssh/known_hosts), or tcp://HOST:PORT (plain, unauthenticated HTTP: trusted networks
    /// only). A bare NAME is one of podman's own connections (`podman system connection
    /// list`). Given here, these replace [run] hosts; `resume` reuses the run's own.
    #[arg(long = "host", value_name = "URL[=SLOTS]")]
    pub hosts: Vec<String>,
    /// The model the codex agent uses.
    #[arg(long, value_name = "MODEL")]
    pub model: Option<String>,
    /// An OpenAI-compatible endpoint for the codex agent (e.g. http://127.0.0.1:8080/v1).
    #[arg(long, value_name = "URL")]
    pub base_url: Option<String>,
    /// After the run, push the service branch to origin (as `git push --force-with-lease`
    /// would: only over the value cohort last fetched). Also `[run] push = true`.
    #[arg(long)]
    pub push: bool,
    /// The project's check, run after each agent and on each merge result before the service
    /// branch moves, e.g. --verify 'cargo test --quiet'. Split like a shell would, never run
    /// through one. A failure goes back to the agent ([verify] retries times, default 2);
    /// work that never passes ends `unverified`, kept on its branch. Also [verify] command.
    #[arg(long, value_name = "'PROG ARGS…'")]
    pub verify: Option<String>,
    /// Run task 1 alone first and fan out only if it merges: a bad prompt template then
    /// costs one task, not all of them. Also [run] calibrate = true.
    #[arg(long)]
    pub calibrate: bool,
    /// Serve workers on ADDR (e.g. 0.0.0.0:7443, TLS): agents and the verify command run on
    /// workers (`cohort worker`, on podman hosts with --host or on Kubernetes with `cohort k8s
    /// manifests`); the repository, the key and the merges stay here. The run's worker token
    /// is written to its directory (worker-token, mode 0600), never shown.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<std::net::SocketAddr>,
    /// A worker silent this long loses its task, which goes back to the queue (default 30s).
    #[arg(long, value_name = "DUR")]
    pub worker_timeout: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AgentKind {
    /// The Codex CLI (`codex exec`), with the key from OPENAI_API_KEY.
    Codex,
    /// Any program, from --agent-command or [agent] command.
    Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RuntimeKind {
    /// Run the agent directly on this machine, in its checkout.
    Host,
    /// Run each task's agent in its own container from the cohort image (`cohort image build`),
    /// through podman's REST socket. The default when a podman socket is found.
    Podman,
}

/// The API key named by `[agent] key`, found in the order of `keys::lookup`. It is only
/// handed on, never printed. A key that exists but cannot be decrypted is an error.
pub fn api_key(config: &Config) -> Result<Option<Secret>> {
    let name = config.agent.key.as_deref().unwrap_or(crate::keys::DEFAULT_KEY);
    crate::keys::validate_name(name).map_err(|e| usage(format!("[agent] key: {e}")))?;
    let found = tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(crate::keys::lookup(name)))
        .map_err(|e| anyhow::anyhow!(super::keys::explain_key(e)))?;
    if let Some((_, source)) = &found {
        tracing::debug!(key = name, %source, "API key found");
    }
    Ok(found.map(|(secret, _)| secret))
}

/// The credentials for origin: a placed `git_token` (the credential store or systemd's
/// `$CREDENTIALS_DIRECTORY`, never an environment variable, which is too easily meant for
/// another host), and for the service (`with_ssh_key`) a placed deploy key, written for
/// ssh into the service's private runtime directory.
pub fn git_access(with_ssh_key: bool) -> Result<crate::git::remote::Access> {
    let stored = |name: &str| {
        tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(crate::keys::lookup_stored(name)))
            .map_err(|e| anyhow::anyhow!(super::keys::explain_key(e)))
    };
    let token = stored(crate::keys::GIT_TOKEN)?.map(|(s, _)| s);
    let ssh_identity = match with_ssh_key {
        true => match stored(crate::keys::GIT_SSH_KEY)? {
            Some((key, _)) => Some(crate::keys::identity_file(&key)?),
            None => None,
        },
        false => None,
    };
    // A terminal to ask on: your own run; the service never prompts.
    let prompt = !with_ssh_key && std::io::IsTerminal::is_terminal(&std::io::stdin());
    Ok(crate::git::remote::Access {
        token,
        ssh_identity,
        prompt,
    })
}

/// Builds the engine from flags over config over stored options (resume).
pub fn build_engine(
    paths: RepoPaths,
    config: &Config,
    flags: &EngineFlags,
    stored: &serde_json::Value,
) -> Result<Engine> {
    // With podman hosts, as many at once as they have slots.
    let host_slots = super::run_remote::given_hosts(flags, config)
        .map(|h| h.iter().map(|s| crate::remote::hosts::slots_of(s)).sum::<usize>())
        .filter(|n| *n > 0);
    let jobs = flags
        .jobs
        .or(config.run.jobs)
        .or(host_slots)
        .or(stored["jobs"].as_u64().map(|j| j as usize))
        .unwrap_or(4);
    if jobs == 0 || jobs > 256 {
        return Err(usage(format!(
            "-j {jobs}: the number of parallel tasks must be between 1 and 256"
        )));
    }
    let on_conflict = flags
        .on_conflict
        .or(config.run.on_conflict)
        .or(match stored["on_conflict"].as_str() {
            Some("keep") => Some(ConflictPolicy::Keep),
            _ => None,
        })
        .unwrap_or(ConflictPolicy::Retry);
    let timeout = match (&flags.timeout, &config.run.timeout) {
        (Some(t), _) => Some(parse_duration("--timeout", t)?),
        (None, Some(t)) => Some(parse_duration("[run] timeout", t)?),
        _ => stored["timeout_secs"].as_u64().map(std::time::Duration::from_secs),
    };
    let service_branch = service_branch(flags, config)?;
    let push = push_policy(&paths, flags, config, stored)?;

    // Looked for in what every task hands back (with token shapes, private keys, .env files),
    // and kept from every agent's environment.
    let scan_key = api_key(config).ok().flatten();
    let remote = super::run_remote::remote_runtime(&paths, flags, config, stored)?;
    let runtime: Arc<dyn Runtime> = match remote {
        Some(r) => Arc::new(r),
        None => local_runtime(flags, config, stored, &scan_key)?,
    };
    // In a container (a task's, or a worker's), the container is the sandbox (codex's own
    // one needs bubblewrap, which the image does not have).
    let sandbox = if matches!(runtime.name(), "podman" | "remote") {
        "danger-full-access"
    } else {
        "workspace-write"
    };
    let stored_command: Option<Vec<String>> = serde_json::from_value(stored["agent_command"].clone()).ok();
    let kind = match flags.agent {
        Some(AgentKind::Codex) => "codex",
        Some(AgentKind::Command) => "command",
        None if flags.agent_command.is_some() => "command",
        None => config
            .agent
            .kind
            .as_deref()
            .or(stored["agent"].as_str())
            .unwrap_or("codex"),
    };
    let agent: Arc<dyn Agent> = match kind {
        "codex" => Arc::new(codex_agent(config, flags, stored, sandbox)?),
        "command" => match (&flags.agent_command, &config.agent.command, &stored_command) {
            (Some(line), _, _) => Arc::new(CommandAgent::parse(line).map_err(|e| usage(e.to_string()))?),
            (None, Some(argv), _) => Arc::new(CommandAgent::new(argv.clone()).map_err(|e| usage(e.to_string()))?),
            (None, None, Some(argv)) => Arc::new(CommandAgent::new(argv.clone())?),
            (None, None, None) => {
                return Err(usage(
                    "--agent command needs --agent-command 'PROGRAM ARGS…' (or [agent] command in cohort.toml)",
                ))
            }
        },
        other => {
            return Err(usage(format!(
                "[agent] kind = {other:?} is unknown; use \"codex\" or \"command\""
            )))
        }
    };
    let gateway = gateway_settings(config, flags, stored, scan_key.clone())?;
    if runtime.name() == "podman" {
        if let Some(net) = config
            .container
            .network
            .filter(|n| *n != crate::runtime::podman::NetworkMode::None)
        {
            crate::progress::say(&format!(
                "cohort: warning: [container] network = {:?}: task containers have open egress (the allow-list \
                 does not apply); the API key stays with cohort",
                format!("{net:?}").to_lowercase()
            ));
        }
    }
    let verify = super::run_verify::verify_settings(flags.verify.as_deref(), config, stored)?;
    if let Some(v) = &verify {
        super::run_verify::warn_about_environment(v, runtime.name());
    }
    let state = State::open(&run::state_path(&paths))?;
    Ok(Engine {
        paths,
        state: Mutex::new(state),
        agent,
        runtime,
        opts: RunOptions {
            jobs,
            service_branch,
            on_conflict,
            timeout,
            limits: crate::git::commit::Limits {
                max_file_size: config.run.max_file_size()?,
                key: scan_key,
            },
            push,
            verify,
            calibrate: flags.calibrate
                || config.run.calibrate.unwrap_or(false)
                || stored["calibrate"].as_bool() == Some(true),
            keep_checkouts: config.run.keep_checkouts.unwrap_or(false),
        },
        cancel: CancellationToken::new(),
        gateway,
        // Found only by a caller that reaches origin (sync or push): see `git_access`.
        access: crate::git::remote::Access::default(),
        reviser: None,
    })
}

/// The runtime for agents on this machine: `--runtime`, config, what the run stored, or
/// what is found.
fn local_runtime(
    flags: &EngineFlags,
    config: &Config,
    stored: &serde_json::Value,
    scan_key: &Option<Secret>,
) -> Result<Arc<dyn Runtime>> {
    Ok(match select_runtime(flags, config, stored)? {
        RuntimeKind::Host => Arc::new(HostRuntime::new(scan_key.iter().cloned().collect())?),
        RuntimeKind::Podman => {
            let settings = crate::commands::container::podman_settings(config)?;
            tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(async {
                    let podman = crate::runtime::podman::Podman::connect().await?;
                    anyhow::Ok(crate::runtime::podman::PodmanRuntime::new(podman, settings).await?)
                })
            })
            // Before anything changed (no socket, no image): a setup error, exit 2.
            .map_err(|e| usage(format!("--runtime podman: {e:#}")))
            .map(Arc::new)?
        }
    })
}

/// Whether (and what) to push after the run: `--push`, `[run] push`, or what the run was
/// started with. Without an origin to push to, that is a usage error now, before the run.
fn push_policy(
    paths: &RepoPaths,
    flags: &EngineFlags,
    config: &Config,
    stored: &serde_json::Value,
) -> Result<Option<crate::config::PushTasks>> {
    let wanted = flags.push || config.run.push.unwrap_or(false) || stored["push"].as_bool() == Some(true);
    if !wanted {
        return Ok(None);
    }
    let repo = paths.open()?;
    if crate::git::remote::origin_url(&repo, gix::remote::Direction::Push).is_none() {
        return Err(usage(
            "--push (or [run] push): this repository has no remote 'origin' to push to; add one with \
             `git remote add origin URL`, or drop --push",
        ));
    }
    Ok(Some(config.run.push_tasks.unwrap_or_default()))
}

/// The run's model gateway: the agent's endpoint (`--base-url`, `[agent] base_url`, what the
/// run stored, else OpenAI's) with the key, the egress allow-list and the budgets. None when
/// there is neither a key nor an allow-list: agents then reach nothing.
fn gateway_settings(
    config: &Config,
    flags: &EngineFlags,
    stored: &serde_json::Value,
    key: Option<Secret>,
) -> Result<Option<run::GatewaySettings>> {
    let allow = config.container.allow.clone().unwrap_or_default();
    if key.is_none() && allow.is_empty() {
        return Ok(None);
    }
    let upstream = flags
        .base_url
        .clone()
        .or(config.agent.base_url.clone())
        .or(stored["base_url"].as_str().map(String::from))
        .unwrap_or_else(|| crate::agent::codex_events::OPENAI_BASE_URL.to_string());
    let budget = config.run.budget.unwrap_or_default();
    let dollars = |b: Option<crate::gateway::Budget>| matches!(b, Some(crate::gateway::Budget::Dollars(_)));
    if (dollars(budget.task) || dollars(budget.run)) && config.agent.price.is_none() {
        return Err(usage(
            "[run] budget in dollars needs the model's price: set [agent] price = { input = …, output = … }",
        ));
    }
    Ok(Some(run::GatewaySettings {
        upstream,
        key: key.unwrap_or_else(|| Secret::new(String::new())),
        allow,
        budget,
        price: config.agent.price,
    }))
}

/// The service branch from `--service-branch`, else `[run] service_branch`, else
/// `cohort/service`; a name git would refuse is a usage error here, before the
/// sync changes anything.
pub fn service_branch(flags: &EngineFlags, config: &Config) -> Result<String> {
    let (name, source) = match (&flags.service_branch, &config.run.service_branch) {
        (Some(n), _) => (n.clone(), "--service-branch"),
        (None, Some(n)) => (n.clone(), "[run] service_branch"),
        (None, None) => return Ok("cohort/service".into()),
    };
    crate::git::names::check_service_branch(&name).map_err(|why| {
        usage(format!(
            "{source} {name:?} is not a usable branch name: {why}; pick another"
        ))
    })?;
    Ok(name)
}

/// `--runtime`, else `[run] runtime`, else podman when a podman socket is found (see
/// `socket_candidates`), else host. The automatic choice is said on stderr.
fn select_runtime(flags: &EngineFlags, config: &Config, stored: &serde_json::Value) -> Result<RuntimeKind> {
    if let Some(kind) = flags.runtime {
        return Ok(kind);
    }
    // A resumed run keeps the runtime it started with, unless config says otherwise.
    if config.run.runtime.is_none() {
        match stored["runtime"].as_str() {
            Some("podman") => return Ok(RuntimeKind::Podman),
            Some("host") => return Ok(RuntimeKind::Host),
            _ => {}
        }
    }
    match config.run.runtime.as_deref() {
        Some("host") => return Ok(RuntimeKind::Host),
        Some("podman") => return Ok(RuntimeKind::Podman),
        Some(other) => {
            return Err(usage(format!(
                "[run] runtime = {other:?} is unknown; use \"podman\" or \"host\""
            )))
        }
        None => {}
    }
    let candidates = crate::runtime::podman::socket_candidates(
        std::env::var("CONTAINER_HOST").ok().as_deref(),
        std::env::var("XDG_RUNTIME_DIR").ok().as_deref(),
    )
    .map_err(|e| usage(e.to_string()))?;
    match candidates.iter().find(|p| p.exists()) {
        Some(sock) => {
            crate::progress::say(&format!(
                "cohort: runtime podman (socket {}); agents run in containers (--runtime host runs them here)",
                sock.display()
            ));
            Ok(RuntimeKind::Podman)
        }
        None => {
            crate::progress::say("cohort: runtime host (no podman socket found); agents run directly on this machine");
            Ok(RuntimeKind::Host)
        }
    }
}

fn codex_agent(
    config: &Config,
    flags: &EngineFlags,
    stored: &serde_json::Value,
    sandbox: &'static str,
) -> Result<CodexAgent> {
    let model = flags
        .model
        .clone()
        .or(config.agent.model.clone())
        .or(stored["model"].as_str().map(String::from))
        .unwrap_or_else(|| DEFAULT_CODEX_MODEL.into());
    if model.trim().is_empty() {
        return Err(usage(
            "the codex model name is empty; pass --model or set [agent] model",
        ));
    }
    let base_url = flags
        .base_url
        .clone()
        .or(config.agent.base_url.clone())
        .or(stored["base_url"].as_str().map(String::from));
    let key_name = config.agent.key.as_deref().unwrap_or(crate::keys::DEFAULT_KEY);
    let key = api_key(config)?.ok_or_else(|| {
        usage(format!(
            "the codex agent needs an API key. {} (or use --agent command)",
            crate::keys::missing_help(key_name)
        ))
    })?;
    let codex = find_codex(config.agent.codex_path.as_deref()).map_err(|e| usage(e.to_string()))?;
    Ok(CodexAgent {
        codex,
        model,
        base_url,
        key,
        sandbox,
    })
}

/// The codex agent's model when none is configured.
pub const DEFAULT_CODEX_MODEL: &str = "gpt-5-codex";

/// The options saved with a run so `resume` can rebuild its engine.
pub fn stored_options(flags: &EngineFlags, config: &Config) -> serde_json::Value {
    let argv: Option<Vec<String>> = flags
        .agent_command
        .as_deref()
        .and_then(shlex::split)
        .or_else(|| config.agent.command.clone());
    let mut stored = serde_json::json!({
        "push": flags.push || config.run.push.unwrap_or(false),
        "agent_command": argv,
        "model": flags.model.clone().or(config.agent.model.clone()),
        "base_url": flags.base_url.clone().or(config.agent.base_url.clone()),
    });
    if let (Some(o), serde_json::Value::Object(remote)) =
        (stored.as_object_mut(), super::run_remote::stored_options(flags, config))
    {
        o.extend(remote.into_iter().filter(|(_, v)| !v.is_null()));
    }
    stored
}

/// Ctrl-C or SIGTERM stops the agents and saves state; a second Ctrl-C exits at once.
pub fn handle_signals(cancel: CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
            return;
        };
        let mut times = 0;
        loop {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            times += 1;
            if times > 1 {
                crate::progress::say("cohort: interrupted again, exiting now");
                std::process::exit(130);
            }
            crate::progress::say(
                "cohort: interrupted; stopping agents and saving state (`cohort resume` continues the run)",
            );
            cancel.cancel();
        }
    });
}

pub fn print_summary(summary: &run::Summary) {
    let count = |s: run::state::TaskStatus| summary.tasks.iter().filter(|t| t.status == s).count();
    use run::state::TaskStatus::*;
    crate::progress::say(&format!(
        "run {}: {} merged, {} unchanged, {} failed, {} conflict, {} unverified, {} not finished",
        summary.run_id,
        count(Merged),
        count(Unchanged),
        count(Failed),
        count(Conflict),
        count(Unverified),
        run::unfinished(&summary.tasks)
    ));
    if let Some(why) = &summary.calibration {
        crate::progress::say(why);
    }
    if let Some(p) = &summary.push {
        for line in p.describe() {
            crate::progress::say(&line);
        }
    }
    if summary.exit_code() != 0 {
        crate::progress::say(&format!("see `cohort report {}` for details", summary.run_id));
    }
}

pub async fn run(args: Args, config_path: Option<&Path>) -> Result<u8> {
    tracing::debug!("cohort run: starting");
    let paths = RepoPaths::discover(&std::env::current_dir()?)?;
    let config = Config::load(config_path, Some(&paths.workdir))?;
    let plan = match (&args.input, &args.tasks, &args.prompt) {
        (Some(input), _, _) => super::plan::make_plan(input, &args.planner, &config).await?,
        (None, Some(t), Some(p)) => super::plan::read_plan_files(t, p)?,
        _ => return Err(usage("give a request document, or --tasks FILE and --prompt FILE")),
    };
    let mut stored = stored_options(&args.engine, &config);
    let mut engine = build_engine(paths, &config, &args.engine, &stored)?;
    // Calibration's revision asks the model that planned the document (none with the rules
    // planner, or for given task and prompt files).
    if engine.opts.calibrate && args.input.is_some() {
        if let Some(planner) = super::plan::model_planner(&args.planner, &config)? {
            engine.reviser = Some(Arc::new(planner));
        }
    }
    let syncing = !args.no_sync && config.run.sync != Some(false);
    if syncing || engine.opts.push.is_some() {
        engine.access = git_access(false)?;
    }
    let engine = Arc::new(engine);
    stored["agent"] = engine.agent.name().into();
    handle_signals(engine.cancel.clone());
    let key = api_key(&config)?;
    if !syncing && !args.allow_file.is_empty() {
        crate::progress::say(
            "cohort: warning: --allow-file has no effect without the sync step (--no-sync or [run] sync = false)",
        );
    }
    let sync = syncing.then(|| SyncSettings {
        key,
        allow_files: args.allow_file.clone(),
    });
    let summary = run::start(engine, &plan, sync, stored).await?;
    print_summary(&summary);
    Ok(summary.exit_code())
}
