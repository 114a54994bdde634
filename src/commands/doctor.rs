//! `cohort doctor [--scope user|system]`: checks what the service needs on this host and
//! says how to fix each problem. Exit 0 when everything needed is there, 1 otherwise.

use std::path::{Path, PathBuf};

use anyhow::Result;
use cohort_systemd::{Credentials, Systemd};

use crate::service::unit::SYSTEM_PODMAN_SOCKET;
use crate::service::ServiceScope;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Which service to check for (default: system for root, user otherwise).
    #[arg(long, value_enum)]
    pub scope: Option<ServiceScope>,
}

struct Report {
    failed: usize,
}

impl Report {
    fn ok(&mut self, what: &str, detail: impl std::fmt::Display) {
        println!("ok    {what}: {detail}");
    }
    fn warn(&mut self, what: &str, detail: impl std::fmt::Display) {
        println!("note  {what}: {detail}");
    }
    fn fail(&mut self, what: &str, detail: impl std::fmt::Display, fix: &str) {
        self.failed += 1;
        println!("FAIL  {what}: {detail}\n      fix: {fix}");
    }
}

pub async fn run(args: Args, config_path: Option<&Path>) -> Result<u8> {
    let scope = args.scope.unwrap_or_else(ServiceScope::default_for_caller);
    let root = crate::git::RepoPaths::discover(&std::env::current_dir()?)
        .ok()
        .map(|p| p.workdir);
    let loaded = crate::config::Sources::new(scope, config_path, root.as_deref()).load()?;
    let mut r = Report { failed: 0 };
    println!("checking for the {} service", scope.as_str());

    // settings: the service refuses every request while the repository's are untrusted.
    match &loaded.untrusted {
        None => r.ok("settings", "nothing untrusted"),
        Some(u) => r.fail(
            "settings",
            format!("{} sets {} without trust", u.path.display(), u.keys.join(", ")),
            &u.command(),
        ),
    }
    let config = loaded.config;

    // podman
    let socket = match scope {
        ServiceScope::System => PathBuf::from(SYSTEM_PODMAN_SOCKET),
        ServiceScope::User => PathBuf::from(
            std::env::var("XDG_RUNTIME_DIR").unwrap_or_else(|_| format!("/run/user/{}", nix::unistd::geteuid())),
        )
        .join("podman/podman.sock"),
    };
    let enable = match scope {
        ServiceScope::System => "systemctl enable --now podman.socket",
        ServiceScope::User => "systemctl --user enable --now podman.socket",
    };
    let tag = config
        .image
        .tag
        .clone()
        .unwrap_or_else(|| crate::runtime::podman::DEFAULT_IMAGE.into());
    match crate::runtime::podman::Podman::connect_to(socket.clone()).await {
        Ok(p) => {
            r.ok(
                "podman socket",
                format!(
                    "{} (podman {}, API {})",
                    socket.display(),
                    p.version().version,
                    p.version().api_version
                ),
            );
            match p.image_exists(&tag).await {
                Ok(true) => r.ok("image", format!("{tag} is in this storage")),
                Ok(false) => r.fail(
                    "image",
                    format!("{tag} is not in {}'s storage", socket.display()),
                    if scope == ServiceScope::System {
                        "cohort image build --copy-system"
                    } else {
                        "cohort image build"
                    },
                ),
                Err(e) => r.fail("image", e, "check the podman service's log"),
            }
        }
        Err(e) => r.fail("podman socket", format!("{e:#}"), enable),
    }
    if scope == ServiceScope::System {
        // userns=auto takes container IDs from the `containers` ranges.
        let has = |f: &str| std::fs::read_to_string(f).is_ok_and(|t| t.lines().any(|l| l.starts_with("containers:")));
        if has("/etc/subuid") && has("/etc/subgid") {
            r.ok(
                "user namespaces",
                "/etc/subuid and /etc/subgid have a `containers` range (userns=auto)",
            );
        } else {
            r.fail(
                "user namespaces",
                "no `containers` range in /etc/subuid or /etc/subgid; task containers use userns=auto",
                "echo containers:2147483647:2147483648 | tee -a /etc/subuid /etc/subgid",
            );
        }
    }

    // systemd, Varlink credentials, TPM
    match Systemd::connect(scope.bus()).await {
        Ok(sd) => match sd.version().await {
            Ok(v) => {
                let major: u32 = v
                    .split(|c: char| !c.is_ascii_digit())
                    .next()
                    .and_then(|m| m.parse().ok())
                    .unwrap_or(0);
                if major >= 257 {
                    r.ok("systemd", format!("version {v}"))
                } else {
                    r.fail(
                        "systemd",
                        format!("version {v}"),
                        "cohort's service needs systemd >= 257 (Debian 13)",
                    )
                }
            }
            Err(e) => r.fail("systemd", e, "is systemd running as the service manager?"),
        },
        Err(e) => r.fail("systemd", e, "cohort's service needs systemd and D-Bus"),
    }
    match Credentials::new().check().await {
        Ok(info) if scope == ServiceScope::User && !info.user_scope => r.fail(
            "credentials",
            "io.systemd.Credentials has no user scope",
            "user-scope credentials need systemd >= 257",
        ),
        Ok(_) => r.ok("credentials", "io.systemd.Credentials answers over Varlink"),
        Err(e) => r.fail(
            "credentials",
            e,
            "systemctl enable --now systemd-creds.socket (systemd >= 256)",
        ),
    }
    if Path::new("/dev/tpmrm0").exists() {
        r.ok("TPM2", "/dev/tpmrm0 is present; keys are bound to it");
    } else {
        r.warn(
            "TPM2",
            "no /dev/tpmrm0: keys are sealed with the host key only (a copied disk carries it)",
        );
    }

    // lingering, codex, key
    if scope == ServiceScope::User {
        let uid = nix::unistd::getuid().as_raw();
        match cohort_systemd::logind::linger_enabled(uid).await {
            Ok(true) => r.ok("lingering", "on: the service starts at boot"),
            Ok(false) => r.fail(
                "lingering",
                "off: the service runs only while you are logged in",
                "loginctl enable-linger",
            ),
            Err(e) => r.warn("lingering", format!("cannot ask logind: {e}")),
        }
    }
    match crate::agent::codex::find_codex(config.agent.codex_path.as_deref()) {
        Ok(p) => r.ok("codex", p.display()),
        Err(e) => r.fail(
            "codex",
            e,
            "npm install -g @openai/codex@0.169.0 (the image build needs it)",
        ),
    }
    let key = config
        .agent
        .key
        .clone()
        .unwrap_or_else(|| crate::keys::DEFAULT_KEY.into());
    let creds_scope = match scope {
        ServiceScope::System => cohort_systemd::Scope::System,
        ServiceScope::User => cohort_systemd::Scope::User,
    };
    let path = crate::keys::store::path(creds_scope, &key)?;
    let can_decrypt = scope == ServiceScope::User || nix::unistd::geteuid().is_root();
    if !path.exists() {
        r.fail(
            "key",
            format!("{} is missing", path.display()),
            &format!("cohort keys place {key} --scope {}", scope.as_str()),
        );
    } else if can_decrypt {
        match crate::keys::decrypt_file(&Credentials::new(), &path, &key, creds_scope).await {
            Ok(_) => r.ok("key", format!("{} decrypts here", path.display())),
            Err(e) => r.fail(
                "key",
                super::keys::explain_key(e),
                &format!("cohort keys place {key} --scope {}", scope.as_str()),
            ),
        }
    } else {
        r.ok("key", format!("{} is placed", path.display()));
    }

    if r.failed == 0 {
        println!("all checks passed");
        Ok(0)
    } else {
        println!("{} problem(s) found", r.failed);
        Ok(1)
    }
}
