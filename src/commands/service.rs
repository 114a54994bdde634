//! `cohort service install | status | logs | uninstall`: `cohort.service` in the system
//! manager (rootful, hardened) or the user's manager (rootless), all over D-Bus.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use cohort_systemd::{Systemd, UnitState};

use crate::cli::usage;
use crate::config::{Config, Untrusted};
use crate::git::RepoPaths;
use crate::service::host::{self, Check, Host, Level, Setup};
use crate::service::subid::SubidFiles;
use crate::service::unit::{self, UnitSpec};
use crate::service::{state_dir, ServiceScope, UNIT};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub command: Sub,
}

#[derive(clap::Subcommand, Debug)]
pub enum Sub {
    /// Write cohort.service, enable and start it (and podman.socket), wait until it is active.
    Install(InstallArgs),
    /// The unit's state and what the service last said, plus its recent runs.
    Status(ScopeArgs),
    /// The service's log (the same lines it sends to the journal).
    Logs(LogsArgs),
    /// Stop and disable the unit and remove its file (state, runs and keys stay).
    Uninstall(ScopeArgs),
}

#[derive(clap::Args, Debug)]
pub struct InstallArgs {
    /// system: rootful and hardened, for a server (needs root). user: rootless, your own manager.
    /// Default: system for root, user otherwise.
    #[arg(long, value_enum)]
    pub scope: Option<ServiceScope>,
    /// The repository the service works on (default: the one around the current directory).
    #[arg(long, value_name = "DIR")]
    pub repo: Option<PathBuf>,
    /// Replace an existing unit and restart the service.
    #[arg(long)]
    pub replace: bool,
    /// Write and enable the unit, but do not start it.
    #[arg(long)]
    pub no_start: bool,
    /// Set up what the checks find missing and can safely be set up, saying what changed: a
    /// `containers` range in /etc/subuid and /etc/subgid (system scope), podman.socket.
    /// Without it, install refuses (exit 2) and says how to fix each problem.
    #[arg(long)]
    pub setup: bool,
}

#[derive(clap::Args, Debug)]
pub struct ScopeArgs {
    #[arg(long, value_enum)]
    pub scope: Option<ServiceScope>,
}

#[derive(clap::Args, Debug)]
pub struct LogsArgs {
    #[arg(long, value_enum)]
    pub scope: Option<ServiceScope>,
    /// How many lines from the end.
    #[arg(short = 'n', long, default_value_t = 50)]
    pub lines: usize,
}

const JOB_TIMEOUT: Duration = Duration::from_secs(180);

pub async fn run(args: Args, config_path: Option<&Path>) -> Result<u8> {
    match args.command {
        Sub::Install(a) => install(a, config_path).await,
        Sub::Status(a) => status(a.scope.unwrap_or_else(ServiceScope::default_for_caller)).await,
        Sub::Logs(a) => logs(a),
        Sub::Uninstall(a) => uninstall(a.scope.unwrap_or_else(ServiceScope::default_for_caller)).await,
    }
}

fn unit_dir(scope: ServiceScope) -> Result<PathBuf> {
    Ok(match scope {
        ServiceScope::System => PathBuf::from("/etc/systemd/system"),
        ServiceScope::User => {
            let config = std::env::var_os("XDG_CONFIG_HOME")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".config")))
                .ok_or_else(|| usage("HOME is not set"))?;
            config.join("systemd/user")
        }
    })
}

fn dropin_path() -> PathBuf {
    PathBuf::from("/etc/systemd/system/podman.socket.d/cohort.conf")
}

async fn install(a: InstallArgs, config_path: Option<&Path>) -> Result<u8> {
    let scope = a.scope.unwrap_or_else(ServiceScope::default_for_caller);
    let root = nix::unistd::geteuid().is_root();
    if scope == ServiceScope::System && !root {
        return Err(usage(
            "--scope system installs into the system manager and needs root (sudo)",
        ));
    }
    let start_dir = match &a.repo {
        Some(r) => r.clone(),
        None => std::env::current_dir()?,
    };
    let paths = RepoPaths::discover(&start_dir).map_err(|e| usage(format!("--repo: {e:#}")))?;
    let repo = std::fs::canonicalize(&paths.workdir)?;
    // The settings the service will see; the host checks refuse untrusted keys (the service
    // would refuse every request).
    let loaded = crate::config::Sources::new(scope, config_path, Some(&repo)).load()?;
    let config = loaded.config;
    let key = config
        .agent
        .key
        .clone()
        .unwrap_or_else(|| crate::keys::DEFAULT_KEY.into());
    let exe = std::fs::canonicalize(std::env::current_exe()?)?;
    let owner = match scope {
        ServiceScope::System => Some(repo_owner(&repo)?),
        ServiceScope::User => None,
    };
    ensure_host(scope, &config, loaded.untrusted.as_ref(), a.setup).await?;

    let spec = UnitSpec {
        scope,
        exe,
        repo: repo.clone(),
        owner: owner.clone(),
        key,
        extra_keys: placed_git_keys(scope)?,
        config: config_path.map(std::fs::canonicalize).transpose()?,
    };
    let text = unit::render(&spec)?;
    let dir = unit_dir(scope)?;
    let path = dir.join(UNIT);
    let existed = path.exists();
    if existed && !a.replace {
        return Err(usage(format!(
            "{} already exists; pass --replace to rewrite it and restart the service",
            path.display()
        )));
    }
    write_atomic(&path, text.as_bytes())?;
    eprintln!("wrote {}", path.display());

    let sd = Systemd::connect(scope.bus()).await?;
    if let (ServiceScope::System, Some((_, group))) = (scope, &owner) {
        write_atomic(&dropin_path(), unit::podman_socket_dropin(group)?.as_bytes())?;
        eprintln!(
            "wrote {} (the service's group may use the rootful podman socket)",
            dropin_path().display()
        );
    }
    sd.reload().await?;
    sd.enable(&["podman.socket", UNIT]).await?;
    let sock = if scope == ServiceScope::System {
        // A listening socket keeps its old group until restarted, and systemd will not
        // restart it while the API service it activated still runs (containers keep running).
        sd.stop("podman.service", JOB_TIMEOUT).await?;
        sd.restart("podman.socket", JOB_TIMEOUT).await?
    } else {
        sd.start("podman.socket", JOB_TIMEOUT).await?
    };
    eprintln!("podman.socket: {}", sock.active_state);
    if scope == ServiceScope::User {
        linger_note().await;
    }
    if a.no_start {
        eprintln!("enabled {UNIT} ({} scope); not started (--no-start)", scope.as_str());
        return Ok(0);
    }
    let started = if existed {
        sd.restart(UNIT, JOB_TIMEOUT).await
    } else {
        sd.start(UNIT, JOB_TIMEOUT).await
    };
    let state = match started {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{UNIT} did not start: {e}");
            sd.unit_state(UNIT).await?
        }
    };
    print_state(scope, &state);
    Ok(if state.is_active() { 0 } else { 1 })
}

/// The git credentials placed in the system store, for the unit to load (the user
/// service decrypts its own store, as for the API key).
fn placed_git_keys(scope: ServiceScope) -> Result<Vec<String>> {
    if scope != ServiceScope::System {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for name in [crate::keys::GIT_TOKEN, crate::keys::GIT_SSH_KEY] {
        if crate::keys::store::path(cohort_systemd::Scope::System, name)?.exists() {
            out.push(name.to_string());
        }
    }
    Ok(out)
}

/// The host checks `doctor` makes, before anything is written or enabled: each failed one
/// refuses the install (exit 2) with its fix, unless `--setup` could set it up.
async fn ensure_host(scope: ServiceScope, config: &Config, untrusted: Option<&Untrusted>, setup: bool) -> Result<()> {
    let host = Host {
        scope,
        config,
        untrusted,
        subids: SubidFiles::etc(),
        // Lingering is turned on below.
        lingering: false,
    };
    let mut checks = host::check(&host).await;
    let mut todo: Vec<Setup> = Vec::new();
    for s in checks.iter().filter(|c| c.level == Level::Fail).filter_map(|c| c.setup) {
        if !todo.contains(&s) {
            todo.push(s);
        }
    }
    if setup && !todo.is_empty() {
        for s in todo.drain(..) {
            let said = host::setup(scope, s, &host.subids)
                .await
                .map_err(|e| usage(format!("--setup could not finish: {e:#}")))?;
            eprintln!("setup: {said}");
        }
        checks = host::check(&host).await;
    }
    for c in checks.iter().filter(|c| c.level == Level::Note) {
        eprintln!("note: {}: {}", c.what, c.detail);
    }
    let failed: Vec<&Check> = checks.iter().filter(|c| c.level == Level::Fail).collect();
    if failed.is_empty() {
        let ok: Vec<&str> = checks.iter().filter(|c| c.level == Level::Ok).map(|c| c.what).collect();
        eprintln!("host checks passed: {}", ok.join(", "));
        return Ok(());
    }
    let mut msg = format!(
        "not installing {UNIT}: {} problem(s) on this host would stop the service or fail its tasks \
         (`cohort doctor --scope {}` lists every check):",
        failed.len(),
        scope.as_str()
    );
    for c in &failed {
        msg.push_str(&format!("\n  {}: {}\n    fix: {}", c.what, c.detail, c.fix));
    }
    let can: Vec<&str> = failed.iter().filter(|c| c.setup.is_some()).map(|c| c.what).collect();
    if !can.is_empty() && !setup {
        msg.push_str(&format!(
            "\n`cohort service install --setup` sets up: {} (and says what it changed).",
            can.join(", ")
        ));
    }
    Err(usage(msg))
}

/// The static user (and group) that owns the repository; the system service runs as them.
fn repo_owner(repo: &Path) -> Result<(String, String)> {
    let meta = std::fs::metadata(repo)?;
    if meta.uid() == 0 {
        return Err(usage(format!(
            "{} is owned by root; the system service runs as the repository's owner, never as root. \
             Give it to a service user, e.g. `useradd --system --create-home cohort && chown -R cohort: {}`",
            repo.display(),
            repo.display()
        )));
    }
    let user = nix::unistd::User::from_uid(meta.uid().into())?.ok_or_else(|| {
        usage(format!(
            "the owner (uid {}) of {} has no user entry",
            meta.uid(),
            repo.display()
        ))
    })?;
    let group = nix::unistd::Group::from_gid(meta.gid().into())?.ok_or_else(|| {
        usage(format!(
            "the group (gid {}) of {} has no entry",
            meta.gid(),
            repo.display()
        ))
    })?;
    Ok((user.name, group.name))
}

async fn linger_note() {
    let uid = nix::unistd::getuid().as_raw();
    match cohort_systemd::logind::linger_enabled(uid).await {
        Ok(true) => eprintln!("lingering is on: the service starts at boot"),
        Ok(false) => match cohort_systemd::logind::set_linger(uid, true).await {
            Ok(()) => eprintln!("turned lingering on (logind): the service starts at boot, without a login"),
            Err(e) => eprintln!(
                "note: lingering is off, so the service runs only while you are logged in, and turning it on \
                 failed ({e}); run `loginctl enable-linger` (may need sudo)"
            ),
        },
        Err(e) => eprintln!("note: cannot ask logind about lingering ({e})"),
    }
}

fn print_state(scope: ServiceScope, s: &UnitState) {
    println!(
        "{UNIT} ({} scope): {} ({}){}",
        scope.as_str(),
        s.active_state,
        s.sub_state,
        if s.result.is_empty() || s.result == "success" {
            String::new()
        } else {
            format!(", result {}", s.result)
        }
    );
    if !s.status_text.is_empty() {
        println!("  status: {}", s.status_text);
    }
    if s.exec_main_status == 243 {
        // EXIT_CREDENTIALS: systemd itself could not decrypt LoadCredentialEncrypted=.
        println!(
            "  systemd could not decrypt the service's credential: a stolen file on another machine, or this \
             machine's TPM was cleared. Place the key again: cohort keys place NAME --scope system"
        );
    } else if !s.is_active() && s.load_state == "loaded" {
        println!("  see `cohort service logs` for why");
    }
}

async fn status(scope: ServiceScope) -> Result<u8> {
    let sd = Systemd::connect(scope.bus()).await?;
    let state = sd.unit_state(UNIT).await?;
    if state.load_state == "not-found" {
        println!(
            "{UNIT} is not installed in the {} manager (cohort service install)",
            scope.as_str()
        );
        return Ok(1);
    }
    print_state(scope, &state);
    if let Some(reg) = state_dir(scope).and_then(|d| crate::service::Registration::read(&d)) {
        println!(
            "  repository: {} (pid {}, since {})",
            reg.repo.display(),
            reg.pid,
            reg.started
        );
    }
    Ok(if state.is_active() { 0 } else { 1 })
}

fn logs(a: LogsArgs) -> Result<u8> {
    let scope = a.scope.unwrap_or_else(ServiceScope::default_for_caller);
    let dir = state_dir(scope).ok_or_else(|| usage("HOME is not set"))?;
    let path = dir.join("serve.log");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read {} (has the {} service run yet?)",
            path.display(),
            scope.as_str()
        )
    })?;
    let lines: Vec<&str> = text.lines().collect();
    let mut out = std::io::stdout().lock();
    for l in &lines[lines.len().saturating_sub(a.lines)..] {
        writeln!(out, "{l}")?;
    }
    Ok(0)
}

async fn uninstall(scope: ServiceScope) -> Result<u8> {
    let sd = Systemd::connect(scope.bus()).await?;
    let path = unit_dir(scope)?.join(UNIT);
    if !path.exists() {
        eprintln!("{UNIT} is not installed in the {} manager", scope.as_str());
        return Ok(1);
    }
    let state = sd.stop(UNIT, JOB_TIMEOUT).await?;
    sd.disable(&[UNIT]).await?;
    std::fs::remove_file(&path)?;
    if scope == ServiceScope::System && dropin_path().exists() {
        std::fs::remove_file(dropin_path())?;
    }
    sd.reload().await?;
    eprintln!(
        "{UNIT} stopped ({}) and removed; its state, runs, branches and keys are kept",
        state.active_state
    );
    Ok(0)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().context("a unit path has a parent")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
