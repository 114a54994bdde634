//! Settings, resolved once into [`Config`]: flags > `--config FILE` or the repository's
//! `cohort.toml` (its sensitive keys only once trusted) > the user's
//! `~/.config/cohort/config.toml` (system service: `/etc/cohort/config.toml`); see
//! [`sources`]. Unknown keys are an error in every file, so a typo is never ignored.

mod sources;

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use sources::{sensitive_settings, user_config_file, Loaded, Sources, Untrusted, SENSITIVE, SYSTEM_CONFIG};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid value in {what}: {message}")]
    Value { what: String, message: String },
    #[error(
        "{path} sets {keys}, which cohort takes from a repository's settings only once you trust \
         the file's exact content{changed}. Review the file, then run `{command}` (or set these \
         in {own}, or pass them as flags)",
        keys = keys.join(", "),
        changed = if *changed { " (it changed since you trusted it)" } else { "" }
    )]
    Untrusted {
        path: PathBuf,
        keys: Vec<String>,
        changed: bool,
        command: String,
        own: String,
    },
    #[error(transparent)]
    Trust(#[from] crate::trust::TrustError),
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub run: RunSection,
    #[serde(default)]
    pub planner: PlannerSection,
    #[serde(default)]
    pub agent: AgentSection,
    #[serde(default)]
    pub image: ImageSection,
    #[serde(default)]
    pub container: ContainerSection,
    #[serde(default)]
    pub verify: VerifySection,
    #[serde(default)]
    pub service: ServiceSection,
}

/// `[service]`: how the long-running service looks after itself.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSection {
    /// `cohort gc` after each request: `retention = { keep_runs = 10, older_than = "30d" }`.
    pub retention: Option<Retention>,
}

/// What gc keeps (see `cohort gc --help`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    pub keep_runs: Option<usize>,
    pub older_than: Option<String>,
}

/// `[verify]`: the project's check, run after each agent and on each merge.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifySection {
    /// The argv, e.g. `["cargo", "test", "--quiet"]` (never run through a shell).
    pub command: Option<Vec<String>>,
    /// A duration such as `10m`; the verify run is stopped and fails after it.
    pub timeout: Option<String>,
    /// How many times the agent gets a failure back to fix it (default 2).
    pub retries: Option<u32>,
    /// Verify each merge result before the service branch moves (default: true).
    pub merged: Option<bool>,
    /// Paths that persist between tasks and runs: relative to the checkout (`target`) or
    /// to the home directory (`~/.cargo/registry`).
    pub caches: Option<Vec<String>>,
}

/// `[image]`: what `cohort image build` puts in the image.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSection {
    /// Default `localhost/cohort:latest`.
    pub tag: Option<String>,
    /// Globs of repository files to copy into the image (under /opt/cohort/repo), tracked files only.
    pub include: Option<Vec<String>>,
    /// Host programs (files or directories) with their shared libraries; default: a shell,
    /// coreutils basics, git and CA certificates.
    pub programs: Option<Vec<PathBuf>>,
    /// An image in podman's storage to build on instead of scratch.
    pub base: Option<String>,
}

/// `[container]`: how containers are made (task containers and `cohort container run`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerSection {
    /// `private` (default), `none` or `host`.
    pub network: Option<crate::runtime::podman::NetworkMode>,
    /// Commands run with `sh -c` in a new `cohort container run` container before the shell.
    pub startup: Option<Vec<String>>,
    /// Extra bind mounts, `HOST:CONTAINER` or `HOST:CONTAINER:ro`.
    pub mounts: Option<Vec<String>>,
    /// Memory limit: bytes, or with a suffix `k`, `m`, `g` (e.g. `2g`).
    pub memory: Option<String>,
    /// Process limit.
    pub pids: Option<i64>,
    /// The egress allow-list: hosts agents may reach through cohort's gateway; default none.
    pub allow: Option<Vec<String>>,
}

impl ContainerSection {
    pub fn memory_bytes(&self) -> Result<Option<i64>, ConfigError> {
        let Some(m) = &self.memory else { return Ok(None) };
        parse_size("[container] memory", m).map(Some)
    }

    /// `[container] mounts` as (host, container, read_only).
    pub fn bind_mounts(&self) -> Result<Vec<(String, String, bool)>, ConfigError> {
        let mut out = Vec::new();
        for m in self.mounts.iter().flatten() {
            let parts: Vec<&str> = m.split(':').collect();
            let bad = || ConfigError::Value {
                what: "[container] mounts".into(),
                message: format!("{m:?}: write HOST:CONTAINER or HOST:CONTAINER:ro with absolute paths"),
            };
            let (src, dst, ro) = match parts.as_slice() {
                [s, d] => (*s, *d, false),
                [s, d, "ro"] => (*s, *d, true),
                [s, d, "rw"] => (*s, *d, false),
                _ => return Err(bad()),
            };
            if !src.starts_with('/') || !dst.starts_with('/') {
                return Err(bad());
            }
            out.push((src.to_string(), dst.to_string(), ro));
        }
        Ok(out)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ConflictPolicy {
    /// Run the task once more from the new service tip.
    Retry,
    /// Mark the task `conflict` and keep its branch.
    Keep,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    pub jobs: Option<usize>,
    pub service_branch: Option<String>,
    pub on_conflict: Option<ConflictPolicy>,
    /// A duration such as `30m` or `90s`.
    pub timeout: Option<String>,
    pub runtime: Option<String>,
    /// podman hosts to run tasks on, as `--host`: `["ssh://USER@HOST/path/podman.sock=8",
    /// "NAME"]` (a NAME is one of podman's connections). `--host` flags replace the list.
    pub hosts: Option<Vec<String>>,
    /// Where the run listens for workers, as `--listen`: `"0.0.0.0:7443"`.
    pub listen: Option<String>,
    /// A worker silent this long loses its task, as `--worker-timeout` (default `30s`).
    pub worker_timeout: Option<String>,
    pub sync: Option<bool>,
    /// The largest file a task may commit (bytes, or with a suffix `k`, `m`, `g`; default
    /// 100m). A task that leaves a larger one fails, naming it; the rest of its work is kept
    /// on its branch.
    pub max_file_size: Option<String>,
    /// Tokens or dollars a task and the whole run may spend at the model, e.g.
    /// `budget = { task = "300k", run = "$5" }` (dollars use `[agent] price`).
    pub budget: Option<crate::gateway::BudgetSpec>,
    /// Push the service branch to origin after each run (and each request of the
    /// service), as a compare-and-swap on origin's value at the last fetch.
    pub push: Option<bool>,
    /// Which task branches to push as well: `"none"` (the default) or `"failed"` (those
    /// of tasks that did not merge, for review).
    pub push_tasks: Option<PushTasks>,
    /// Run task 1 alone first, and fan out only if it passes (`--calibrate`).
    pub calibrate: Option<bool>,
    /// Keep the pool's checkouts in `.git/cohort/pool` after the run, so the next run moves
    /// them by a tree diff instead of writing every file again (default false; the service
    /// always keeps them). `cohort gc --checkouts` removes them.
    pub keep_checkouts: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PushTasks {
    #[default]
    None,
    Failed,
}

impl RunSection {
    pub fn max_file_size(&self) -> Result<u64, ConfigError> {
        match &self.max_file_size {
            None => Ok(crate::git::commit::Limits::default().max_file_size),
            Some(v) => parse_size("[run] max_file_size", v).map(|n| n as u64),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlannerSection {
    pub backend: Option<String>,
    pub model: Option<String>,
    pub base_url: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    pub kind: Option<String>,
    pub model: Option<String>,
    pub base_url: Option<String>,
    pub codex_path: Option<PathBuf>,
    /// The command agent's argv; `{prompt_file}` and `{task}` are filled in.
    pub command: Option<Vec<String>>,
    /// The API key's name: the credential `cohort.NAME`, the environment variable NAME in
    /// upper case. Default `openai_api_key`.
    pub key: Option<String>,
    /// The model's price, for the cost estimate in `cohort report`.
    pub price: Option<Price>,
}

/// US dollars per million tokens.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input: f64,
    pub output: f64,
    /// Cached input tokens; the input price when absent.
    pub cached_input: Option<f64>,
}

impl Price {
    pub fn cost(&self, input: u64, cached_input: u64, output: u64) -> f64 {
        let cached = cached_input.min(input);
        let m = 1_000_000.0;
        (input - cached) as f64 * self.input / m
            + cached as f64 * self.cached_input.unwrap_or(self.input) / m
            + output as f64 * self.output / m
    }
}

impl Config {
    /// The user's settings for a command that runs agents or programs, or sends the key
    /// (`run`, `resume`, `image build`, `container run`, the LLM planner): `explicit`
    /// (`--config`, which must exist) or `<repo_root>/cohort.toml` over the user's
    /// config.toml. A sensitive key the repository's file sets without trust is an error
    /// ([`ConfigError::Untrusted`], exit 2). The system service uses [`Sources::new`].
    pub fn load(explicit: Option<&Path>, repo_root: Option<&Path>) -> Result<Config, ConfigError> {
        Sources::user(explicit, repo_root).load()?.trusted()
    }

    /// Like [`Config::load`], for commands that run nothing and send no key (`report`,
    /// `keys`, `doctor`, `service install`, the rules planner): untrusted sensitive keys
    /// are left out, with a note, instead of refused.
    pub fn load_lenient(explicit: Option<&Path>, repo_root: Option<&Path>) -> Result<Config, ConfigError> {
        Ok(Sources::user(explicit, repo_root).load()?.lenient())
    }
}

/// Parses a size: bytes, or with a suffix `k`, `m`, `g` (`2g`, `512m`).
pub fn parse_size(what: &str, v: &str) -> Result<i64, ConfigError> {
    let t = v.trim().to_ascii_lowercase();
    let t = t.strip_suffix('b').unwrap_or(&t);
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1i64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    match num.trim().parse::<i64>() {
        Ok(n) if n > 0 => n.checked_mul(mult).ok_or_else(|| ConfigError::Value {
            what: what.into(),
            message: format!("{v:?} is too large"),
        }),
        _ => Err(ConfigError::Value {
            what: what.into(),
            message: format!("{v:?} is not a size; write e.g. 2g or 512m"),
        }),
    }
}

/// Parses a duration like `90s`, `30m`, `1h 30m`.
pub fn parse_duration(what: &str, s: &str) -> Result<std::time::Duration, ConfigError> {
    humantime::parse_duration(s).map_err(|e| ConfigError::Value {
        what: what.into(),
        message: format!("{s:?} is not a duration ({e}); write e.g. 90s, 30m or 1h"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One explicit file and nothing else (never the developer's own settings).
    fn load_file(p: &Path) -> Result<Config, ConfigError> {
        Sources {
            scope: crate::service::ServiceScope::User,
            explicit: Some(p.to_path_buf()),
            repo_file: None,
            base: None,
            trust_store: None,
        }
        .load()?
        .trusted()
    }

    #[test]
    fn unknown_keys_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "[run]\njobs = 3\njbos = 4\n").unwrap();
        let e = load_file(&p).unwrap_err().to_string();
        assert!(e.contains("jbos"), "{e}");
        std::fs::write(
            &p,
            "[run]\njobs = 3\non_conflict = \"keep\"\n[agent]\ncommand = [\"a\", \"{task}\"]\n",
        )
        .unwrap();
        let c = load_file(&p).unwrap();
        assert_eq!(c.run.jobs, Some(3));
        assert_eq!(c.run.on_conflict, Some(ConflictPolicy::Keep));
        std::fs::write(&p, "[run]\nhosts = [\"ssh://u@h/run/podman/podman.sock=8\", \"w1\"]\n").unwrap();
        let c = load_file(&p).unwrap();
        assert_eq!(
            c.run.hosts.as_deref(),
            Some(&["ssh://u@h/run/podman/podman.sock=8".to_owned(), "w1".to_owned()][..])
        );
        assert!(parse_duration("--timeout", "soon").is_err());
        let price = Price {
            input: 2.0,
            output: 10.0,
            cached_input: Some(0.5),
        };
        // 1M input of which 0.5M cached, 0.1M output: 1.0 + 0.25 + 1.0 dollars.
        assert!((price.cost(1_000_000, 500_000, 100_000) - 2.25).abs() < 1e-9);
        assert_eq!(parse_duration("--timeout", "2m").unwrap().as_secs(), 120);
    }

    #[test]
    fn image_and_container_sections() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "[image]\ntag = \"localhost/x:1\"\ninclude = [\"docs/**\"]\nprograms = [\"/bin/sh\"]\n\
             [container]\nnetwork = \"none\"\nstartup = [\"echo hi\"]\nmounts = [\"/a:/b:ro\"]\nmemory = \"2g\"\npids = 100\n",
        )
        .unwrap();
        let c = load_file(&p).unwrap();
        assert_eq!(c.image.tag.as_deref(), Some("localhost/x:1"));
        assert_eq!(c.container.network, Some(crate::runtime::podman::NetworkMode::None));
        assert_eq!(c.container.memory_bytes().unwrap(), Some(2 << 30));
        assert_eq!(
            c.container.bind_mounts().unwrap(),
            vec![("/a".into(), "/b".into(), true)]
        );
        std::fs::write(&p, "[container]\nnetwork = \"bridge\"\n").unwrap();
        assert!(load_file(&p).is_err());
        std::fs::write(&p, "[image]\ntags = \"x\"\n").unwrap();
        assert!(load_file(&p).unwrap_err().to_string().contains("tags"));
    }
}
