//! The text of `cohort.service` for either scope.
//!
//! System scope is hardened as far as talking to the rootful podman socket allows; the
//! choices and what podman forced us to leave out are explained next to each directive
//! and in the README. User scope is a plain rootless unit: most sandboxing directives
//! need privileges a user manager does not have.

use std::path::{Path, PathBuf};

use cohort_systemd::UnitFile;

use super::ServiceScope;

pub struct UnitSpec {
    pub scope: ServiceScope,
    /// The cohort binary the unit runs.
    pub exe: PathBuf,
    /// The repository the service works on.
    pub repo: PathBuf,
    /// System scope: the static user that owns the repository, and its group.
    pub owner: Option<(String, String)>,
    /// The credential with the agent's key (`cohort.NAME`).
    pub key: String,
    /// Further credentials placed for the service (`git_token`, `git_ssh_key`), loaded
    /// like the key. Only those that exist: systemd refuses to start a unit whose
    /// encrypted credential is missing.
    pub extra_keys: Vec<String>,
    /// An explicit `--config` to pass on.
    pub config: Option<PathBuf>,
}

/// The rootful podman socket.
pub const SYSTEM_PODMAN_SOCKET: &str = "/run/podman/podman.sock";
/// Where the system service sees it (a bind mount in its own mount namespace).
pub const SERVICE_PODMAN_SOCKET: &str = "/run/cohort/podman.sock";

pub fn render(spec: &UnitSpec) -> anyhow::Result<String> {
    let mut u = UnitFile::new();
    u.header_comment("Written by `cohort service install`; `cohort service install --replace` rewrites it.");
    let repo = spec.repo.to_string_lossy().into_owned();
    u.section("Unit")
        .text("Description", &format!("cohort: AI agents working on {repo}"))
        .raw("Wants", "podman.socket")
        .raw("After", "podman.socket")
        // A restarted socket is a new inode: restart with it (the system unit binds it).
        .raw("PartOf", "podman.socket");
    let mut argv = vec![spec.exe.to_string_lossy().into_owned(), "-C".into(), repo.clone()];
    if let Some(c) = &spec.config {
        argv.extend(["--config".into(), c.to_string_lossy().into_owned()]);
    }
    argv.push("serve".into());
    let svc = u.section("Service");
    svc.raw("Type", "notify")
        .raw("NotifyAccess", "main")
        .exec("ExecStart", &argv)
        .raw("Restart", "on-failure")
        .raw("RestartSec", "10s")
        // 2 = a setup problem (repository, config, key), 243 = systemd could not load the
        // credential (another machine's, or a cleared TPM): restarting fixes neither.
        .raw("RestartPreventExitStatus", "2 243")
        .raw("WatchdogSec", "120s")
        .raw("TimeoutStopSec", "120s")
        .raw("StateDirectory", "cohort")
        // The deploy key is written here for ssh (0600, in a 0700 directory that systemd
        // removes when the service stops).
        .raw("RuntimeDirectory", "cohort")
        .raw("RuntimeDirectoryMode", "0700");
    match spec.scope {
        ServiceScope::User => {
            // LoadCredentialEncrypted= does not work in user units before systemd 258:
            // `cohort serve` decrypts the user-scope credential itself over Varlink.
            svc.bool("NoNewPrivileges", true);
            u.section("Install").raw("WantedBy", "default.target");
        }
        ServiceScope::System => {
            let (user, group) = spec
                .owner
                .clone()
                .ok_or_else(|| anyhow::anyhow!("a system unit needs the repository's owner"))?;
            harden_system(svc, &user, &group, &spec.repo, &spec.key);
            for k in &spec.extra_keys {
                svc.raw("LoadCredentialEncrypted", &crate::keys::credential_id(k));
            }
            u.section("Install").raw("WantedBy", "multi-user.target");
        }
    }
    Ok(u.render()?)
}

fn harden_system(svc: &mut cohort_systemd::Section, user: &str, group: &str, repo: &Path, key: &str) {
    let id = crate::keys::credential_id(key);
    // podman's tmpfiles rule keeps /run/podman at 0700 root, so no other user can reach the
    // socket by its path, whatever its own mode. systemd (as root) binds the socket into
    // this service's runtime directory instead; the socket's group (the drop-in below)
    // decides who may connect.
    svc.raw("BindPaths", &format!("{SYSTEM_PODMAN_SOCKET}:{SERVICE_PODMAN_SOCKET}"))
        .env("CONTAINER_HOST", &format!("unix://{SERVICE_PODMAN_SOCKET}"))
        .raw("Environment", "HOME=%S/cohort")
        // systemd decrypts /etc/credstore.encrypted/cohort.NAME (TPM2-bound) into
        // $CREDENTIALS_DIRECTORY for this service only.
        .raw("LoadCredentialEncrypted", &id)
        // DynamicUser= gives ProtectSystem=strict, ProtectHome=read-only, PrivateTmp=,
        // RemoveIPC=, NoNewPrivileges= and RestrictSUIDSGID=. Because User= names a static
        // user, systemd runs the service as that user: the repository's owner, so every
        // object and ref it writes stays owned by them.
        .bool("DynamicUser", true)
        .text("User", user)
        .text("Group", group)
        .list("ReadWritePaths", &[repo.to_string_lossy()])
        .bool("PrivateUsers", true)
        .bool("PrivateDevices", true)
        .raw("DevicePolicy", "closed")
        .raw("DeviceAllow", "")
        .raw("ProtectSystem", "strict")
        .raw("ProtectHome", "read-only")
        .bool("PrivateTmp", true)
        .bool("PrivateIPC", true)
        .bool("ProtectKernelTunables", true)
        .bool("ProtectKernelModules", true)
        .bool("ProtectKernelLogs", true)
        .bool("ProtectControlGroups", true)
        .bool("ProtectClock", true)
        .bool("ProtectHostname", true)
        .raw("ProtectProc", "invisible")
        .raw("ProcSubset", "pid")
        .bool("RestrictNamespaces", true)
        .bool("RestrictRealtime", true)
        .bool("RestrictSUIDSGID", true)
        .bool("LockPersonality", true)
        .bool("MemoryDenyWriteExecute", true)
        .bool("NoNewPrivileges", true)
        .bool("RemoveIPC", true)
        .raw("KeyringMode", "private")
        .raw("UMask", "0022")
        .raw("CapabilityBoundingSet", "")
        .raw("AmbientCapabilities", "")
        .raw("SystemCallArchitectures", "native")
        .raw("SystemCallFilter", "@system-service")
        .raw(
            "SystemCallFilter",
            "~@privileged @resources @mount @debug @cpu-emulation @obsolete @raw-io @reboot @swap @module @clock",
        )
        .raw("SystemCallErrorNumber", "EPERM")
        // AF_UNIX for the podman socket, the journal and D-Bus; AF_INET/6 for the model
        // API (planner, model check). Not PrivateNetwork=: the model API is remote.
        .raw("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6");
}

/// A drop-in for `podman.socket` that lets the service's user (and root) connect: the
/// rootful socket is root-only by default. Whoever may use it is root-equivalent, which
/// is why it is given to the one user the system service runs as, and said so.
pub fn podman_socket_dropin(group: &str) -> anyhow::Result<String> {
    let mut u = UnitFile::new();
    u.header_comment("Written by `cohort service install --scope system`: lets cohort.service's user use");
    u.header_comment("the rootful podman socket (that user is root-equivalent through it).");
    u.section("Socket").text("SocketGroup", group).raw("SocketMode", "0660");
    Ok(u.render()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(scope: ServiceScope) -> UnitSpec {
        UnitSpec {
            scope,
            exe: "/usr/local/bin/cohort".into(),
            repo: "/srv/repo 100%".into(),
            owner: Some(("alice".into(), "alice".into())),
            key: "openai_api_key".into(),
            extra_keys: vec!["git_token".into()],
            config: None,
        }
    }

    #[test]
    fn user_unit() {
        let text = render(&spec(ServiceScope::User)).unwrap();
        assert!(text.contains("Type=notify"), "{text}");
        assert!(text.contains("RestartPreventExitStatus=2 243\n"), "{text}");
        assert!(
            text.contains("ExecStart=\"/usr/local/bin/cohort\" \"-C\" \"/srv/repo 100%%\" \"serve\""),
            "{text}"
        );
        assert!(text.contains("WantedBy=default.target"), "{text}");
        assert!(text.contains("RuntimeDirectoryMode=0700\n"), "{text}");
        assert!(
            !text.contains("LoadCredentialEncrypted"),
            "broken in user units before 258: {text}"
        );
    }

    #[test]
    fn system_unit_is_hardened_and_loads_the_credential() {
        let mut s = spec(ServiceScope::System);
        s.repo = "/srv/repo".into();
        let text = render(&s).unwrap();
        for want in [
            "LoadCredentialEncrypted=cohort.openai_api_key",
            "LoadCredentialEncrypted=cohort.git_token",
            "RuntimeDirectory=cohort",
            "RuntimeDirectoryMode=0700",
            "BindPaths=/run/podman/podman.sock:/run/cohort/podman.sock",
            "Environment=\"CONTAINER_HOST=unix:///run/cohort/podman.sock\"",
            "DynamicUser=yes",
            "User=alice",
            "PrivateUsers=yes",
            "ProtectSystem=strict",
            "ReadWritePaths=/srv/repo",
            "DeviceAllow=",
            "StateDirectory=cohort",
            "SystemCallFilter=@system-service",
            "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
            "WantedBy=multi-user.target",
        ] {
            assert!(text.lines().any(|l| l == want), "missing {want}:\n{text}");
        }
        // A repository path with a space cannot be a ReadWritePaths= word.
        assert!(render(&spec(ServiceScope::System)).is_err());
    }
}
