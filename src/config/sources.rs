//! Where settings come from, merged per key into one [`Config`], and which keys a
//! repository may set only with the user's say-so.
//!
//! Layers, highest first; a key set in a higher layer wins, unset keys fall through:
//! 1. flags (the commands apply them on top of the `Config` loaded here);
//! 2. `--config FILE` (the user named it, so it is trusted), else the repository's
//!    `cohort.toml`, whose [`SENSITIVE`] keys count only once the user trusted the file's
//!    exact content (`cohort trust`);
//! 3. user scope: `$XDG_CONFIG_HOME/cohort/config.toml` (or `~/.config/cohort/config.toml`);
//!    system scope (the system service): `/etc/cohort/config.toml`. Both are trusted: only
//!    their owner (the user, root) writes them.
//!
//! The repository's file is not the user's: origin's pushers and agents (whose changes are
//! merged) write it. So what runs programs, chooses where the key goes or widens the
//! sandbox is taken from it only once trusted; its other keys are harmless and honoured.

use std::path::{Path, PathBuf};

use super::{Config, ConfigError};
use crate::service::ServiceScope;
use crate::trust::{sha256_hex, TrustStore, Verdict};

/// `[section] key`s a repository's `cohort.toml` sets only once trusted: they run programs
/// (`kind`, `command`, `codex_path`, `programs`, `base`), choose where the key is sent
/// (`base_url`), widen the sandbox (`mounts`, `network`, `allow`) or write to origin with
/// the user's credentials (`push`, `push_tasks`), or run the project's check (`[verify]`).
pub const SENSITIVE: &[(&str, &str)] = &[
    ("agent", "kind"),
    ("agent", "command"),
    ("agent", "codex_path"),
    ("agent", "base_url"),
    ("planner", "base_url"),
    ("container", "mounts"),
    ("container", "network"),
    ("container", "allow"),
    ("image", "programs"),
    ("image", "base"),
    // `host` takes agents out of their containers.
    ("run", "runtime"),
    // Hosts get the user's ssh login and run the run's containers.
    ("run", "hosts"),
    // Listening opens the run's work queue (and its repository's trees) to the network.
    ("run", "listen"),
    // Pushing writes to origin with the user's credentials.
    ("run", "push"),
    ("run", "push_tasks"),
    // The verify command runs a program; a cache path on the host is a directory cohort
    // moves in and out of checkouts.
    ("verify", "command"),
    ("verify", "caches"),
    // gc removes old runs' branches and logs: how much, the user says.
    ("service", "retention"),
];

/// The system service's own settings (system scope's lowest layer).
pub const SYSTEM_CONFIG: &str = "/etc/cohort/config.toml";

/// The files one command's settings come from.
#[derive(Debug, Clone)]
pub struct Sources {
    /// Whose trusted files and trust store count.
    pub scope: ServiceScope,
    /// `--config FILE`: takes the repository file's place, trusted.
    pub explicit: Option<PathBuf>,
    /// The repository's `cohort.toml` (read if it exists).
    pub repo_file: Option<PathBuf>,
    /// The trusted layer below: the user's config.toml, or /etc/cohort/config.toml.
    pub base: Option<PathBuf>,
    /// The trust store that decides about the repository's file.
    pub trust_store: Option<PathBuf>,
}

/// The settings, and what the repository's file set without trust (left out of `config`).
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    pub untrusted: Option<Untrusted>,
}

/// A repository file whose sensitive keys are not trusted.
#[derive(Debug, Clone)]
pub struct Untrusted {
    /// Canonical path.
    pub path: PathBuf,
    /// `[section] key`, in [`SENSITIVE`] order.
    pub keys: Vec<String>,
    /// Trusted once, with other content.
    pub changed: bool,
    pub scope: ServiceScope,
}

/// `$XDG_CONFIG_HOME/cohort/config.toml`, else `~/.config/cohort/config.toml`.
pub fn user_config_file() -> Option<PathBuf> {
    let non_empty = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    non_empty("XDG_CONFIG_HOME")
        .filter(|p| p.is_absolute())
        .or_else(|| non_empty("HOME").map(|h| h.join(".config")))
        .map(|d| d.join("cohort/config.toml"))
}

impl Sources {
    pub fn new(scope: ServiceScope, explicit: Option<&Path>, repo_root: Option<&Path>) -> Sources {
        Sources {
            scope,
            explicit: explicit.map(Path::to_path_buf),
            repo_file: repo_root.map(|r| r.join("cohort.toml")),
            base: match scope {
                ServiceScope::User => user_config_file(),
                // The system service's HOME is its state directory: no user file there.
                ServiceScope::System => Some(PathBuf::from(SYSTEM_CONFIG)),
            },
            trust_store: TrustStore::default_path(scope),
        }
    }

    /// A command run by a user (every command but the system service's `serve`).
    pub fn user(explicit: Option<&Path>, repo_root: Option<&Path>) -> Sources {
        Sources::new(ServiceScope::User, explicit, repo_root)
    }

    /// Reads and merges the layers. Every file is checked on its own (unknown keys and
    /// bad values are errors naming it); untrusted sensitive keys are left out and
    /// reported in [`Loaded::untrusted`].
    pub fn load(&self) -> Result<Loaded, ConfigError> {
        let mut merged = toml::Table::new();
        if let Some(base) = self.base.as_deref().filter(|p| p.exists()) {
            merge(&mut merged, read_layer(base)?.table);
        }
        let mut untrusted = None;
        let repo_file = self.repo_file.as_deref().filter(|p| p.is_file());
        match (&self.explicit, repo_file) {
            (Some(explicit), _) => merge(&mut merged, read_layer(explicit)?.table),
            (None, Some(repo_file)) => {
                let mut layer = read_layer(repo_file)?;
                let keys = sensitive_keys(&layer.table);
                if !keys.is_empty() {
                    let canonical = std::fs::canonicalize(repo_file).map_err(|source| ConfigError::Read {
                        path: repo_file.to_path_buf(),
                        source,
                    })?;
                    let verdict = match &self.trust_store {
                        Some(store) => {
                            TrustStore::open(store, self.scope)?.verdict(&canonical, &sha256_hex(&layer.bytes))
                        }
                        None => Verdict::Unknown,
                    };
                    if verdict != Verdict::Trusted {
                        for (section, key) in &keys {
                            if let Some(toml::Value::Table(t)) = layer.table.get_mut(*section) {
                                t.remove(*key);
                            }
                        }
                        untrusted = Some(Untrusted {
                            path: canonical,
                            keys: keys.iter().map(|(s, k)| format!("[{s}] {k}")).collect(),
                            changed: verdict == Verdict::Changed,
                            scope: self.scope,
                        });
                    }
                }
                merge(&mut merged, layer.table);
            }
            (None, None) => {}
        }
        // Each layer was valid on its own and keys are replaced whole, so this holds.
        let config = toml::Value::Table(merged)
            .try_into::<Config>()
            .map_err(|e| ConfigError::Value {
                what: "the merged settings".into(),
                message: e.to_string(),
            })?;
        Ok(Loaded { config, untrusted })
    }
}

impl Loaded {
    /// For commands that run agents or programs, or send the key: untrusted sensitive
    /// keys are an error (exit 2) that names them and the command that trusts the file.
    pub fn trusted(self) -> Result<Config, ConfigError> {
        match self.untrusted {
            Some(u) => Err(u.into_error()),
            None => Ok(self.config),
        }
    }

    /// For commands that only read settings (report, keys, doctor, service install): the
    /// untrusted keys stay left out, with a note on stderr.
    pub fn lenient(self) -> Config {
        if let Some(u) = &self.untrusted {
            crate::progress::say(&format!(
                "cohort: note: {} sets {} without your trust; they are left out (`{}` trusts the file)",
                u.path.display(),
                u.keys.join(", "),
                u.command()
            ));
        }
        self.config
    }
}

impl Untrusted {
    /// The exact command that trusts this file for this scope.
    pub fn command(&self) -> String {
        let path = self.path.to_string_lossy();
        let quoted = shlex::try_quote(&path).map_or_else(|_| path.to_string(), |q| q.into_owned());
        match self.scope {
            ServiceScope::User => format!("cohort trust {quoted}"),
            ServiceScope::System => format!("sudo cohort trust --scope system {quoted}"),
        }
    }

    pub fn into_error(self) -> ConfigError {
        let command = self.command();
        let own = match self.scope {
            ServiceScope::User => user_config_file().map_or_else(
                || "your own ~/.config/cohort/config.toml".into(),
                |p| format!("your own {}", p.display()),
            ),
            ServiceScope::System => SYSTEM_CONFIG.into(),
        };
        ConfigError::Untrusted {
            path: self.path,
            keys: self.keys,
            changed: self.changed,
            command,
            own,
        }
    }
}

/// A file's settings, read once: the bytes that are hashed are the bytes that are parsed.
struct Layer {
    bytes: Vec<u8>,
    table: toml::Table,
}

fn read_layer(path: &Path) -> Result<Layer, ConfigError> {
    let bytes = std::fs::read(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let parse_err = |message: String| ConfigError::Parse {
        path: path.to_path_buf(),
        message,
    };
    let text = std::str::from_utf8(&bytes).map_err(|e| parse_err(format!("not UTF-8: {e}")))?;
    // Typed first, so unknown keys and bad values are reported against this file.
    toml::from_str::<Config>(text).map_err(|e| parse_err(e.to_string()))?;
    let table = toml::from_str::<toml::Table>(text).map_err(|e| parse_err(e.to_string()))?;
    Ok(Layer { bytes, table })
}

/// The [`SENSITIVE`] keys a file's table sets.
pub fn sensitive_keys(table: &toml::Table) -> Vec<(&'static str, &'static str)> {
    SENSITIVE
        .iter()
        .filter(|(s, k)| {
            table
                .get(*s)
                .and_then(|v| v.as_table())
                .is_some_and(|t| t.contains_key(*k))
        })
        .copied()
        .collect()
}

/// The sensitive keys a file sets with their values, as `[section] key = value`, for
/// `cohort trust` to show what it is about to trust. The file must be valid settings.
pub fn sensitive_settings(path: &Path) -> Result<(Vec<u8>, Vec<String>), ConfigError> {
    let layer = read_layer(path)?;
    let lines = sensitive_keys(&layer.table)
        .into_iter()
        .filter_map(|(s, k)| {
            let v = layer.table.get(s)?.as_table()?.get(k)?;
            Some(format!("[{s}] {k} = {v}"))
        })
        .collect();
    Ok((layer.bytes, lines))
}

/// Per key within each section: a key of `layer` replaces the same key in `into`.
fn merge(into: &mut toml::Table, layer: toml::Table) {
    for (section, value) in layer {
        match (into.get_mut(&section), value) {
            (Some(toml::Value::Table(have)), toml::Value::Table(new)) => have.extend(new),
            (_, value) => {
                into.insert(section, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn sources(dir: &Path) -> Sources {
        Sources {
            scope: ServiceScope::User,
            explicit: None,
            repo_file: Some(dir.join("cohort.toml")),
            base: Some(dir.join("user.toml")),
            trust_store: Some(dir.join("state/trusted.toml")),
        }
    }

    #[test]
    fn every_sensitive_key_is_a_setting() {
        // The list names real fields: a file setting all of them is valid settings.
        let mut t = toml::Table::new();
        for (s, k) in SENSITIVE {
            let v = match (*s, *k) {
                ("agent", "command")
                | ("container", "mounts")
                | ("container", "allow")
                | ("image", "programs")
                | ("run", "hosts")
                | ("verify", "command")
                | ("verify", "caches") => toml::Value::Array(vec!["/x:/y".into()]),
                ("container", "network") => "none".into(),
                ("run", "push") => true.into(),
                ("run", "push_tasks") => "failed".into(),
                ("service", "retention") => {
                    let mut r = toml::Table::new();
                    r.insert("keep_runs".into(), 3.into());
                    toml::Value::Table(r)
                }
                _ => "x".into(),
            };
            t.entry(s.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .unwrap()
                .insert(k.to_string(), v);
        }
        let c: Config = toml::Value::Table(t.clone()).try_into().unwrap();
        assert_eq!(c.container.allow.as_deref(), Some(&["/x:/y".to_string()][..]));
        assert_eq!(sensitive_keys(&t).len(), SENSITIVE.len());
    }

    #[test]
    fn layers_merge_per_key_and_untrusted_keys_are_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(
            d,
            "user.toml",
            "[run]\njobs = 2\nservice_branch = \"from-user\"\n[agent]\nkind = \"command\"\ncommand = [\"user-agent\"]\nmodel = \"m-user\"\n",
        );
        let repo = write(
            d,
            "cohort.toml",
            "[run]\nservice_branch = \"from-repo\"\n[agent]\ncommand = [\"repo-agent\"]\nbase_url = \"http://evil/v1\"\n",
        );
        let loaded = sources(d).load().unwrap();
        let u = loaded.untrusted.clone().unwrap();
        assert_eq!(u.keys, ["[agent] command", "[agent] base_url"]);
        assert!(!u.changed);
        let c = loaded.config;
        assert_eq!(c.run.jobs, Some(2), "unset in the repository: the user's");
        assert_eq!(
            c.run.service_branch.as_deref(),
            Some("from-repo"),
            "not sensitive: honoured"
        );
        assert_eq!(
            c.agent.command,
            Some(vec!["user-agent".to_string()]),
            "untrusted: the user's"
        );
        assert_eq!(c.agent.base_url, None);
        assert_eq!(c.agent.kind.as_deref(), Some("command"));
        let e = sources(d).load().unwrap().trusted().unwrap_err();
        assert!(matches!(e, ConfigError::Untrusted { .. }));
        let msg = e.to_string();
        assert!(
            msg.contains("[agent] command") && msg.contains("[agent] base_url") && msg.contains("cohort trust "),
            "{msg}"
        );

        // Trusted: the repository's sensitive keys win over the user's.
        let canonical = std::fs::canonicalize(&repo).unwrap();
        let mut store = TrustStore::open(&d.join("state/trusted.toml"), ServiceScope::User).unwrap();
        store.trust(&canonical, &sha256_hex(&std::fs::read(&repo).unwrap()));
        store.save().unwrap();
        let c = sources(d).load().unwrap().trusted().unwrap();
        assert_eq!(c.agent.command, Some(vec!["repo-agent".to_string()]));
        assert_eq!(c.agent.base_url.as_deref(), Some("http://evil/v1"));
        assert_eq!(c.agent.model.as_deref(), Some("m-user"));

        // One byte more and it is untrusted again, and said to have changed.
        std::fs::write(&repo, format!("{}\n", std::fs::read_to_string(&repo).unwrap())).unwrap();
        let u = sources(d).load().unwrap().untrusted.unwrap();
        assert!(u.changed);
        assert!(u.into_error().to_string().contains("changed"));
    }

    #[test]
    fn a_repository_without_sensitive_keys_needs_no_trust_store() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(d, "cohort.toml", "[run]\njobs = 7\n[agent]\nmodel = \"m\"\n");
        // A damaged store is never read when nothing needs trust.
        std::fs::create_dir_all(d.join("state")).unwrap();
        write(&d.join("state"), "trusted.toml", "not toml [");
        let c = sources(d).load().unwrap().trusted().unwrap();
        assert_eq!(c.run.jobs, Some(7));
    }

    #[test]
    fn explicit_file_is_trusted_and_unknown_keys_name_their_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(d, "cohort.toml", "[agent]\ncommand = [\"repo\"]\n");
        let mine = write(d, "mine.toml", "[container]\nnetwork = \"host\"\n");
        let mut s = sources(d);
        s.explicit = Some(mine);
        let c = s.load().unwrap().trusted().unwrap();
        assert_eq!(c.container.network, Some(crate::runtime::podman::NetworkMode::Host));
        assert_eq!(c.agent.command, None, "--config takes the repository file's place");

        write(d, "user.toml", "[run]\njbos = 1\n");
        let e = sources(d).load().unwrap_err().to_string();
        assert!(e.contains("user.toml") && e.contains("jbos"), "{e}");
    }
}
