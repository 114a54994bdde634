//! What the service and its task containers need from this host, checked the same way by
//! `cohort doctor` (which lists every check) and `cohort service install` (which refuses,
//! or with `--setup` sets up, before it enables anything): the settings, the podman socket,
//! the image in that socket's storage, the id ranges of user namespaces, systemd and its
//! credentials, lingering, codex and the key. Each failed check says how to fix it.

use std::path::PathBuf;
use std::time::Duration;

use cohort_systemd::{Credentials, Systemd};

use super::subid::{self, SubidFiles, Verdict};
use super::unit::SYSTEM_PODMAN_SOCKET;
use super::ServiceScope;
use crate::config::{Config, Untrusted};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Ok,
    /// Worth knowing; the service works without it.
    Note,
    Fail,
}

/// What `service install --setup` can do about a failed check (safe and idempotent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setup {
    /// Add a `containers` range to /etc/subuid and /etc/subgid.
    ContainersRanges,
    /// Enable and start podman.socket.
    PodmanSocket,
}

#[derive(Debug, Clone)]
pub struct Check {
    pub what: &'static str,
    pub level: Level,
    pub detail: String,
    /// For a failed check: the fix, as a command or an instruction.
    pub fix: String,
    pub setup: Option<Setup>,
}

impl Check {
    fn ok(what: &'static str, detail: impl std::fmt::Display) -> Check {
        Check::new(what, Level::Ok, detail, "")
    }
    fn note(what: &'static str, detail: impl std::fmt::Display) -> Check {
        Check::new(what, Level::Note, detail, "")
    }
    fn fail(what: &'static str, detail: impl std::fmt::Display, fix: impl Into<String>) -> Check {
        Check::new(what, Level::Fail, detail, fix)
    }
    fn new(what: &'static str, level: Level, detail: impl std::fmt::Display, fix: impl Into<String>) -> Check {
        Check {
            what,
            level,
            detail: detail.to_string(),
            fix: fix.into(),
            setup: None,
        }
    }
    fn with_setup(mut self, s: Setup) -> Check {
        self.setup = Some(s);
        self
    }
}

/// What to check.
pub struct Host<'a> {
    pub scope: ServiceScope,
    /// The settings the service will see.
    pub config: &'a Config,
    /// What the repository's cohort.toml sets without trust (the service refuses every
    /// request then).
    pub untrusted: Option<&'a Untrusted>,
    pub subids: SubidFiles,
    /// Check lingering (user scope). `service install` turns it on itself.
    pub lingering: bool,
}

/// The rootful or the caller's rootless podman socket.
pub fn podman_socket(scope: ServiceScope) -> PathBuf {
    match scope {
        ServiceScope::System => PathBuf::from(SYSTEM_PODMAN_SOCKET),
        ServiceScope::User => PathBuf::from(
            std::env::var("XDG_RUNTIME_DIR").unwrap_or_else(|_| format!("/run/user/{}", nix::unistd::geteuid())),
        )
        .join("podman/podman.sock"),
    }
}

fn systemctl(scope: ServiceScope) -> &'static str {
    match scope {
        ServiceScope::System => "systemctl",
        ServiceScope::User => "systemctl --user",
    }
}

/// Every check, in the order `doctor` prints them.
pub async fn check(h: &Host<'_>) -> Vec<Check> {
    let mut out = Vec::new();
    let scope = h.scope;
    out.push(match h.untrusted {
        None => Check::ok("settings", "nothing untrusted"),
        Some(u) => Check::fail(
            "settings",
            format!(
                "{} sets {} without trust, and the service refuses every request until it is trusted",
                u.path.display(),
                u.keys.join(", ")
            ),
            u.command(),
        ),
    });
    podman(h, &mut out).await;
    out.push(id_ranges(h));
    systemd(scope, &mut out).await;
    if h.lingering && scope == ServiceScope::User {
        let uid = nix::unistd::getuid().as_raw();
        out.push(match cohort_systemd::logind::linger_enabled(uid).await {
            Ok(true) => Check::ok("lingering", "on: the service starts at boot"),
            Ok(false) => Check::fail(
                "lingering",
                "off: the service runs only while you are logged in",
                "loginctl enable-linger (`cohort service install` turns it on)",
            ),
            Err(e) => Check::note("lingering", format!("cannot ask logind: {e}")),
        });
    }
    let codex_agent = h.config.agent.kind.as_deref().unwrap_or("codex") == "codex";
    out.push(
        match crate::agent::codex::find_codex(h.config.agent.codex_path.as_deref()) {
            Ok(p) => Check::ok("codex", p.display()),
            Err(e) if codex_agent => Check::fail(
                "codex",
                e,
                "npm install -g @openai/codex@0.169.0 (the service runs it, and the image build needs it)",
            ),
            Err(_) => Check::note("codex", "not installed; the agent is not codex"),
        },
    );
    out.push(key(h, codex_agent).await);
    out
}

async fn podman(h: &Host<'_>, out: &mut Vec<Check>) {
    let scope = h.scope;
    let socket = podman_socket(scope);
    let tag = h
        .config
        .image
        .tag
        .clone()
        .unwrap_or_else(|| crate::runtime::podman::DEFAULT_IMAGE.into());
    let p = match crate::runtime::podman::Podman::connect_to(socket.clone()).await {
        Ok(p) => p,
        Err(e) => {
            out.push(
                Check::fail(
                    "podman socket",
                    format!("{e:#}"),
                    format!("{} enable --now podman.socket", systemctl(scope)),
                )
                .with_setup(Setup::PodmanSocket),
            );
            return;
        }
    };
    out.push(Check::ok(
        "podman socket",
        format!(
            "{} (podman {}, API {})",
            socket.display(),
            p.version().version,
            p.version().api_version
        ),
    ));
    out.push(match p.image_exists(&tag).await {
        Ok(true) => Check::ok("image", format!("{tag} is in this storage")),
        Ok(false) => Check::fail(
            "image",
            format!("{tag} is not in {}'s storage", socket.display()),
            match scope {
                ServiceScope::System => "build it and copy it into root's storage: cohort image build --copy-system",
                ServiceScope::User => "build it: cohort image build",
            },
        ),
        Err(e) => Check::fail("image", e, "check the podman service's log"),
    });
}

/// System scope: rootful `userns=auto` takes each task container's ids from the
/// `containers` ranges. User scope: rootless podman maps the image's users onto the
/// user's own ranges.
fn id_ranges(h: &Host<'_>) -> Check {
    let (owner, why) = match h.scope {
        ServiceScope::System => (
            subid::CONTAINERS.to_string(),
            "rootful task containers use userns=auto, which takes their ids from it",
        ),
        ServiceScope::User => match nix::unistd::User::from_uid(nix::unistd::getuid()) {
            Ok(Some(u)) => (u.name, "rootless podman maps the image's users onto it"),
            _ => return Check::note("user namespaces", "this user has no name to look up in /etc/subuid"),
        },
    };
    let files = &h.subids;
    match subid::check(files, &owner) {
        Ok(Verdict::Present { ids }) if ids < subid::ONE_CONTAINER => Check::note(
            "user namespaces",
            format!(
                "{owner} has only {ids} ids in {}; a task container may need up to 65536",
                files.subuid.display()
            ),
        ),
        Ok(Verdict::Present { ids }) => Check::ok(
            "user namespaces",
            format!(
                "{owner} has {ids} ids in {} and {}",
                files.subuid.display(),
                files.subgid.display()
            ),
        ),
        Ok(Verdict::Missing(missing)) => {
            let names: Vec<String> = missing.iter().map(|p| p.display().to_string()).collect();
            let detail = format!("no `{owner}` range in {}; {why}", names.join(" or "));
            match h.scope {
                ServiceScope::System => {
                    // The same free range --setup would take, for those who edit by hand.
                    let fix = match subid::free_range(files) {
                        Ok(Some(r)) => format!(
                            "cohort service install --setup adds one that overlaps no other (or by hand: \
                             echo {}:{r} | tee -a {})",
                            subid::CONTAINERS,
                            names.join(" ")
                        ),
                        _ => format!(
                            "free a stretch of at least {} ids in {} and {}, and give it to `{}`",
                            subid::ONE_CONTAINER,
                            files.subuid.display(),
                            files.subgid.display(),
                            subid::CONTAINERS
                        ),
                    };
                    Check::fail("user namespaces", detail, fix).with_setup(Setup::ContainersRanges)
                }
                ServiceScope::User => Check::fail(
                    "user namespaces",
                    detail,
                    format!(
                        "sudo usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {owner} (a free range)"
                    ),
                ),
            }
        }
        Err(e) => Check::fail(
            "user namespaces",
            format!(
                "cannot read {} or {}: {e}",
                files.subuid.display(),
                files.subgid.display()
            ),
            "make them readable",
        ),
    }
}

async fn systemd(scope: ServiceScope, out: &mut Vec<Check>) {
    out.push(match Systemd::connect(scope.bus()).await {
        Ok(sd) => match sd.version().await {
            Ok(v) => {
                let major: u32 = v
                    .split(|c: char| !c.is_ascii_digit())
                    .next()
                    .and_then(|m| m.parse().ok())
                    .unwrap_or(0);
                if major >= 257 {
                    Check::ok("systemd", format!("version {v}"))
                } else {
                    Check::fail(
                        "systemd",
                        format!("version {v}"),
                        "cohort's service needs systemd >= 257 (Debian 13)",
                    )
                }
            }
            Err(e) => Check::fail("systemd", e, "is systemd running as the service manager?"),
        },
        Err(e) => Check::fail("systemd", e, "cohort's service needs systemd and D-Bus"),
    });
    out.push(match Credentials::new().check().await {
        Ok(info) if scope == ServiceScope::User && !info.user_scope => Check::fail(
            "credentials",
            "io.systemd.Credentials has no user scope",
            "user-scope credentials need systemd >= 257",
        ),
        Ok(_) => Check::ok("credentials", "io.systemd.Credentials answers over Varlink"),
        Err(e) => Check::fail(
            "credentials",
            e,
            "systemctl enable --now systemd-creds.socket (systemd >= 256)",
        ),
    });
    out.push(if std::path::Path::new("/dev/tpmrm0").exists() {
        Check::ok("TPM2", "/dev/tpmrm0 is present; keys are bound to it")
    } else {
        Check::note(
            "TPM2",
            "no /dev/tpmrm0: keys are sealed with the host key only (a copied disk carries it)",
        )
    });
}

async fn key(h: &Host<'_>, codex_agent: bool) -> Check {
    let scope = h.scope;
    let key = h
        .config
        .agent
        .key
        .clone()
        .unwrap_or_else(|| crate::keys::DEFAULT_KEY.into());
    let creds_scope = match scope {
        ServiceScope::System => cohort_systemd::Scope::System,
        ServiceScope::User => cohort_systemd::Scope::User,
    };
    let place = format!("cohort keys place {key} --scope {}", scope.as_str());
    let path = match crate::keys::store::path(creds_scope, &key) {
        Ok(p) => p,
        Err(e) => return Check::fail("key", e, place),
    };
    if !path.exists() {
        if scope == ServiceScope::User && crate::keys::keyring::get(&key).await.ok().flatten().is_some() {
            return Check::ok("key", format!("{key} is in the desktop keyring"));
        }
        let detail = format!("{} is missing", path.display());
        return if codex_agent {
            Check::fail("key", detail, place)
        } else {
            Check::note("key", format!("{detail}; the agent is not codex"))
        };
    }
    // Only root may decrypt the system scope's credentials.
    if scope == ServiceScope::System && !nix::unistd::geteuid().is_root() {
        return Check::ok("key", format!("{} is placed", path.display()));
    }
    match crate::keys::decrypt_file(&Credentials::new(), &path, &key, creds_scope).await {
        Ok(_) => Check::ok("key", format!("{} decrypts here", path.display())),
        Err(e) => Check::fail("key", crate::keys::explain_key(e), place),
    }
}

/// Does what `setup` says; returns what it changed, for the user to read.
pub async fn setup(scope: ServiceScope, what: Setup, subids: &SubidFiles) -> anyhow::Result<String> {
    match what {
        Setup::ContainersRanges => {
            let added = subid::setup_containers(subids)?;
            Ok(if added.is_empty() {
                "the `containers` ranges were already there".into()
            } else {
                let files: Vec<String> = added.iter().map(|(f, _)| f.display().to_string()).collect();
                format!(
                    "added {}:{} to {} (the ids of rootful task containers under userns=auto; \
                     it overlaps no other range)",
                    subid::CONTAINERS,
                    added[0].1,
                    files.join(" and ")
                )
            })
        }
        Setup::PodmanSocket => {
            let sd = Systemd::connect(scope.bus()).await?;
            sd.enable(&["podman.socket"]).await?;
            let state = sd.start("podman.socket", Duration::from_secs(60)).await?;
            Ok(format!(
                "enabled and started podman.socket ({} manager): {}",
                scope.as_str(),
                state.active_state
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_system_scope_needs_a_containers_range_and_setup_can_add_it() {
        let d = tempfile::tempdir().unwrap();
        let subids = SubidFiles {
            subuid: d.path().join("subuid"),
            subgid: d.path().join("subgid"),
        };
        // podman's suggested range is taken by someone: the fix names a free one.
        std::fs::write(&subids.subuid, "alice:100000:65536\nother:2147483647:10\n").unwrap();
        std::fs::write(&subids.subgid, "alice:100000:65536\n").unwrap();
        let config = Config::default();
        let host = Host {
            scope: ServiceScope::System,
            config: &config,
            untrusted: None,
            subids: subids.clone(),
            lingering: false,
        };
        let c = id_ranges(&host);
        assert_eq!(
            (c.level, c.setup),
            (Level::Fail, Some(Setup::ContainersRanges)),
            "{c:?}"
        );
        assert!(c.detail.contains("no `containers` range"), "{c:?}");
        assert!(c.fix.contains("cohort service install --setup"), "{c:?}");
        assert!(
            c.fix.contains("echo containers:2147483657:2147483638 | tee -a"),
            "{c:?}"
        );

        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let said = rt
            .block_on(setup(ServiceScope::System, Setup::ContainersRanges, &subids))
            .unwrap();
        assert!(said.starts_with("added containers:2147483657:2147483638 to "), "{said}");
        let c = id_ranges(&host);
        assert_eq!(c.level, Level::Ok, "{c:?}");
        let said = rt
            .block_on(setup(ServiceScope::System, Setup::ContainersRanges, &subids))
            .unwrap();
        assert_eq!(said, "the `containers` ranges were already there");
    }
}
