//! [`SshOrigin`]: sshd on loopback with its own configuration and keys.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{free_ports, pid_file_names, run, temp_dir, Proc, PORT_ATTEMPTS};

/// `p` for a shell command line (git runs `core.sshCommand` through the shell).
fn sh_quote(p: &Path) -> String {
    let s = p.display().to_string();
    if s.chars().all(|c| c.is_ascii_alphanumeric() || "/._-+=:,@".contains(c)) {
        s
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// sshd on a loopback port with its own configuration, host key and authorized key: git over
/// ssh as root, to absolute repository paths.
pub struct SshOrigin {
    dir: tempfile::TempDir,
    pub port: u16,
    /// The authorized test key (private, 0600).
    pub user_key: PathBuf,
    /// A second key, not authorized: for wrong-credential tests.
    pub wrong_key: PathBuf,
    /// `[127.0.0.1]:PORT ssh-ed25519 …`: the server's host key.
    pub known_hosts: PathBuf,
    sshd: Proc,
}

const SSHD_CONFIG: &str = "Port @PORT@
ListenAddress 127.0.0.1
HostKey @DIR@/host_ed25519
AuthorizedKeysFile @DIR@/authorized_keys
PidFile @DIR@/sshd.pid
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
UseDNS no
PrintMotd no
# git sends GIT_PROTOCOL (protocol v2) through the environment.
AcceptEnv GIT_PROTOCOL
# As the tests' git CLI: repositories another test user owns are served too. SHLVL=1: the
# login shell (bash -c 'git-upload-pack …') counts as nested and skips the machine's
# ~/.bashrc, which is no part of the server (root's can be slow, e.g. pyenv's rehash lock).
SetEnv GIT_CONFIG_COUNT=1 GIT_CONFIG_KEY_0=safe.directory GIT_CONFIG_VALUE_0=* SHLVL=1
# podman over ssh (tests/podman_hosts.rs) opens direct-streamlocal channels to its socket.
AllowStreamLocalForwarding yes
LogLevel VERBOSE
";

fn ssh_keygen(path: &Path, comment: &str) {
    run(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
            .arg(path),
        "ssh-keygen",
    );
}

impl SshOrigin {
    pub fn start() -> SshOrigin {
        let dir = temp_dir("cohort-ssh-");
        let d = dir.path().to_owned();
        assert!(
            !d.display().to_string().contains(' '),
            "sshd_config paths cannot have spaces"
        );
        let (host_key, user_key, wrong_key) = (d.join("host_ed25519"), d.join("user_ed25519"), d.join("wrong_ed25519"));
        ssh_keygen(&host_key, "cohort-test-host");
        ssh_keygen(&user_key, "cohort-test-user");
        ssh_keygen(&wrong_key, "cohort-test-wrong");
        std::fs::copy(d.join("user_ed25519.pub"), d.join("authorized_keys")).expect("writing authorized_keys");
        // The privilege separation directory sshd insists on.
        std::fs::create_dir_all("/run/sshd").expect("creating /run/sshd");
        std::fs::set_permissions("/run/sshd", std::fs::Permissions::from_mode(0o755)).expect("chmod /run/sshd");

        let pid_file = d.join("sshd.pid");
        for attempt in 1..=PORT_ATTEMPTS {
            let port = free_ports(1)[0];
            let conf = SSHD_CONFIG
                .replace("@PORT@", &port.to_string())
                .replace("@DIR@", &d.display().to_string());
            std::fs::write(d.join("sshd_config"), conf).expect("writing sshd_config");
            let _ = std::fs::remove_file(&pid_file);
            // sshd re-executes itself per connection, so it wants its absolute path.
            let mut sshd = Proc::spawn(
                Command::new("/usr/sbin/sshd")
                    .args(["-D", "-e", "-f"])
                    .arg(d.join("sshd_config")),
                &d.join("sshd.log"),
            );
            // sshd writes its pid file once its port is bound.
            let pid = sshd.pid();
            match sshd.wait_ready("sshd", || pid_file_names(&pid_file, pid)) {
                Ok(()) => {
                    let host = std::fs::read_to_string(d.join("host_ed25519.pub")).expect("reading the host key");
                    let host: Vec<&str> = host.split_whitespace().take(2).collect();
                    let known_hosts = d.join("known_hosts");
                    std::fs::write(&known_hosts, format!("[127.0.0.1]:{port} {}\n", host.join(" ")))
                        .expect("writing known_hosts");
                    return SshOrigin {
                        dir,
                        port,
                        user_key,
                        wrong_key,
                        known_hosts,
                        sshd,
                    };
                }
                Err(log) => assert!(
                    log.contains("Address already in use") && attempt < PORT_ATTEMPTS,
                    "{log}"
                ),
            }
        }
        unreachable!("the last attempt panics")
    }

    /// `ssh://root@127.0.0.1:PORT/ABS/PATH` for a bare repository on this machine.
    pub fn url(&self, bare_repo: &Path) -> String {
        let abs = std::path::absolute(bare_repo).expect("an absolute repository path");
        format!("ssh://root@127.0.0.1:{}{}", self.port, abs.display())
    }

    /// A command for git's `core.sshCommand` (or `GIT_SSH_COMMAND`) that logs in with
    /// [`SshOrigin::user_key`] and trusts only this server's host key, never prompting.
    pub fn ssh_command(&self) -> String {
        self.ssh_command_with(&self.user_key)
    }

    /// [`SshOrigin::ssh_command`] with another private key (e.g. [`SshOrigin::wrong_key`]).
    /// `-F /dev/null`: the machine's and the user's ssh configurations play no part.
    pub fn ssh_command_with(&self, key: &Path) -> String {
        format!(
            "ssh -F /dev/null -i {} -o IdentitiesOnly=yes -o UserKnownHostsFile={} \
             -o StrictHostKeyChecking=yes -o BatchMode=yes",
            sh_quote(key),
            sh_quote(&self.known_hosts)
        )
    }

    /// sshd's log (`-e`: what it would send to syslog), e.g. which key was accepted.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    /// The listening sshd's pid while running.
    pub fn pids(&self) -> Vec<u32> {
        self.sshd.pid().into_iter().collect()
    }

    /// Ends the listening sshd: new connections are refused.
    pub fn stop(&mut self) {
        self.sshd.kill();
    }
}

impl Drop for SshOrigin {
    fn drop(&mut self) {
        self.stop();
    }
}
