//! The service: `cohort serve` (the loop systemd runs), its inbox (`cohort submit`), and
//! the unit `cohort service install` writes. It drives the same core flow as `cohort run`
//! and knows systemd only through the `cohort-systemd` crate.

pub mod host;
pub mod inbox;
pub mod lock;
pub mod logging;
pub mod requests;
pub mod subid;
pub mod unit;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What stops `cohort serve` from starting on a state directory (exit codes: `cli.rs`).
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Another instance holds the state directory's lock.
    #[error(
        "another cohort serve ({}) is serving {}; a state directory has one service at a time: \
         stop that one first, or give this one its own --state-dir",
        pid.map_or("PID unknown".to_string(), |p| format!("PID {p}")),
        state.display()
    )]
    AlreadyServing { state: PathBuf, pid: Option<u32> },
    #[error("cannot use the state directory {}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
}

/// Which service manager a service belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ServiceScope {
    /// The system manager: rootful podman, keys from /etc/credstore.encrypted, hardened unit.
    System,
    /// The user's manager: rootless podman, keys from the user's credential store.
    User,
}

impl ServiceScope {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceScope::System => "system",
            ServiceScope::User => "user",
        }
    }

    /// Root means the system manager, anyone else their own.
    pub fn default_for_caller() -> ServiceScope {
        if nix::unistd::geteuid().is_root() {
            ServiceScope::System
        } else {
            ServiceScope::User
        }
    }

    pub fn bus(self) -> cohort_systemd::Bus {
        match self {
            ServiceScope::System => cohort_systemd::Bus::System,
            ServiceScope::User => cohort_systemd::Bus::User,
        }
    }
}

/// The unit's name in either manager (the contract scripts depend on).
pub const UNIT: &str = "cohort.service";

/// The service's state directory: what systemd hands it in `$STATE_DIRECTORY`
/// (`StateDirectory=cohort`), or where that is for a scope when asked from outside.
pub fn state_dir(scope: ServiceScope) -> Option<PathBuf> {
    match scope {
        ServiceScope::System => Some(PathBuf::from("/var/lib/cohort")),
        ServiceScope::User => std::env::var_os("XDG_STATE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".local/state")))
            .map(|d| d.join("cohort")),
    }
}

/// `$STATE_DIRECTORY` (its first entry) when systemd set one.
pub fn state_dir_from_env() -> Option<PathBuf> {
    let v = std::env::var_os("STATE_DIRECTORY")?;
    let first = v.to_string_lossy().split(':').next()?.to_string();
    (!first.is_empty()).then(|| PathBuf::from(first))
}

/// What a running service says about itself in `STATE/serve.json`, so `cohort submit`
/// can find the service that serves a repository.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Registration {
    pub repo: PathBuf,
    pub pid: u32,
    pub started: String,
}

impl Registration {
    pub fn path(state: &Path) -> PathBuf {
        state.join("serve.json")
    }

    pub fn read(state: &Path) -> Option<Registration> {
        let text = std::fs::read_to_string(Self::path(state)).ok()?;
        serde_json::from_str(&text).ok()
    }

    pub fn write(&self, state: &Path) -> std::io::Result<()> {
        let tmp = state.join(".serve.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(tmp, Self::path(state))
    }
}

/// The state directories of the services that serve `repo`, user scope first.
pub fn services_for(repo: &Path) -> Vec<(ServiceScope, PathBuf)> {
    let want = std::fs::canonicalize(repo).unwrap_or_else(|_| repo.to_path_buf());
    let mut out = Vec::new();
    for scope in [ServiceScope::User, ServiceScope::System] {
        let Some(dir) = state_dir(scope) else { continue };
        if let Some(reg) = Registration::read(&dir) {
            let have = std::fs::canonicalize(&reg.repo).unwrap_or(reg.repo);
            if have == want {
                out.push((scope, dir));
            }
        }
    }
    out
}
