//! `cohort worker --controller https://HOST:PORT`: take jobs from a controller until its run
//! is over (see `remote::worker`). The token comes from COHORT_WORKER_TOKEN only, never from
//! the command line (argv is readable by every user of the host).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use tokio_util::sync::CancellationToken;

use crate::cli::usage;
use crate::remote::token::WorkerToken;
use crate::remote::worker::{self, WorkerEnd, WorkerSettings};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The controller, as https://HOST:PORT: the `url` in the run directory's
    /// controller.json, with an address this host reaches. The worker trusts only the
    /// certificate its token (COHORT_WORKER_TOKEN) names.
    #[arg(long, value_name = "URL", env = "COHORT_CONTROLLER")]
    pub controller: String,
    /// This worker's name in the controller's status and logs (default: host name and pid).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Where the worker keeps its checkout (between jobs), scratch directory and caches
    /// (default: a directory of its own under the cache directory, removed at exit).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Where agents reach the model gateway, through this worker and the controller.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    pub tunnel: SocketAddr,
    /// Read the token from this file instead of COHORT_WORKER_TOKEN (a podman or Kubernetes
    /// secret mounted as a file).
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// Started as root, become UID:GID once the token is read: the token file stays
    /// readable by root only, and agents run as this user.
    #[arg(long, value_name = "UID:GID")]
    pub user: Option<String>,
    /// Give up when the controller stays unreachable this long, e.g. 5m.
    #[arg(long, value_name = "DUR", default_value = "5m")]
    pub give_up: String,
}

/// Drops root for `UID:GID`, supplementary groups included, for good.
fn become_user(spec: &str) -> Result<()> {
    let parsed = spec
        .split_once(':')
        .and_then(|(u, g)| Some((u.parse::<u32>().ok()?, g.parse::<u32>().ok()?)));
    let Some((uid, gid)) = parsed else {
        return Err(usage(format!("--user {spec}: give it as UID:GID, e.g. 1000:1000")));
    };
    use nix::unistd::{setgid, setgroups, setuid, Gid, Uid};
    setgroups(&[Gid::from_raw(gid)]).map_err(|e| {
        usage(format!(
            "--user {spec}: cannot set groups ({e}); start the worker as root"
        ))
    })?;
    setgid(Gid::from_raw(gid)).map_err(|e| usage(format!("--user {spec}: {e}")))?;
    setuid(Uid::from_raw(uid)).map_err(|e| usage(format!("--user {spec}: {e}")))?;
    anyhow::ensure!(
        nix::unistd::geteuid().as_raw() == uid,
        "--user {spec}: still running as another user"
    );
    Ok(())
}

pub async fn run(args: Args) -> Result<u8> {
    let text = match &args.token_file {
        Some(path) => {
            std::fs::read_to_string(path).map_err(|e| usage(format!("--token-file {}: {e}", path.display())))?
        }
        None => std::env::var("COHORT_WORKER_TOKEN").map_err(|_| {
            usage(
                "COHORT_WORKER_TOKEN is not set: give the worker the run's token (the run directory's \
                 worker-token file) in its environment or as --token-file; it is never taken as an argument",
            )
        })?,
    };
    let token = WorkerToken::parse(&text).map_err(|e| usage(e.to_string()))?;
    if let Some(user) = &args.user {
        become_user(user)?;
    }
    let give_up = humantime::parse_duration(&args.give_up)
        .map_err(|e| usage(format!("--give-up {}: {e} (e.g. 5m)", args.give_up)))?;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "worker".into());
    let name = args.name.unwrap_or_else(|| format!("{host}-{}", std::process::id()));
    let (dir, temporary) = match args.dir {
        Some(d) => (d, false),
        None => {
            let base = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .unwrap_or_else(std::env::temp_dir);
            (base.join("cohort").join(format!("worker-{}", std::process::id())), true)
        }
    };
    let cancel = CancellationToken::new();
    {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            cancel.cancel();
        });
    }
    eprintln!("cohort worker {name}: taking jobs from {}", args.controller);
    let settings = WorkerSettings {
        controller: args.controller,
        token,
        name: name.clone(),
        dir: dir.clone(),
        tunnel: args.tunnel,
        give_up,
    };
    let ended = worker::run(settings, cancel).await;
    if temporary {
        let _ = crate::git::safefs::remove_path(&dir);
    }
    match ended? {
        WorkerEnd::RunOver => {
            eprintln!("cohort worker {name}: the run is over");
            Ok(0)
        }
        WorkerEnd::Cancelled => Ok(130),
    }
}
