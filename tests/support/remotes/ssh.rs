//! [`SshOrigin`]: sshd on loopback with its own configuration and keys.

use std::net::{IpAddr, Ipv4Addr};
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

/// sshd on a loopback port (or in a network namespace: [`SshOrigin::start_in_netns`]) with its
/// own configuration, host key and authorized key: git over ssh as root, to absolute
/// repository paths, and forwarding to unix sockets (a podman service's).
pub struct SshOrigin {
    dir: tempfile::TempDir,
    /// The address sshd listens on.
    pub addr: IpAddr,
    pub port: u16,
    /// The authorized test key (private, 0600).
    pub user_key: PathBuf,
    /// A second key, not authorized: for wrong-credential tests.
    pub wrong_key: PathBuf,
    /// A known_hosts file holding [`SshOrigin::known_hosts_line`] alone.
    pub known_hosts: PathBuf,
    known_hosts_line: String,
    sshd: Proc,
}

const SSHD_CONFIG: &str = "Port @PORT@
ListenAddress @ADDR@
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
# podman over ssh (tests/podman_hosts.rs, the simulated hosts) opens direct-streamlocal
# channels to its socket (OpenSSH's default, stated because they depend on it).
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
    /// sshd on a free loopback port.
    pub fn start() -> SshOrigin {
        Self::start_at(None, IpAddr::V4(Ipv4Addr::LOCALHOST), None)
    }

    /// sshd inside the network namespace `netns` (a name `ip netns` knows) on `addr:port`;
    /// the namespace is fresh, so the port is free.
    pub fn start_in_netns(netns: &str, addr: IpAddr, port: u16) -> SshOrigin {
        Self::start_at(Some(netns), addr, Some(port))
    }

    fn start_at(netns: Option<&str>, addr: IpAddr, fixed_port: Option<u16>) -> SshOrigin {
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
            let port = fixed_port.unwrap_or_else(|| free_ports(1)[0]);
            let conf = SSHD_CONFIG
                .replace("@PORT@", &port.to_string())
                .replace("@ADDR@", &addr.to_string())
                .replace("@DIR@", &d.display().to_string());
            std::fs::write(d.join("sshd_config"), conf).expect("writing sshd_config");
            let _ = std::fs::remove_file(&pid_file);
            // sshd re-executes itself per connection, so it wants its absolute path. nsenter
            // execs it (same pid) after joining only the namespace's network.
            let mut cmd = match netns {
                Some(ns) => {
                    let mut c = Command::new("nsenter");
                    c.arg(format!("--net=/run/netns/{ns}")).arg("/usr/sbin/sshd");
                    c
                }
                None => Command::new("/usr/sbin/sshd"),
            };
            let mut sshd = Proc::spawn(
                cmd.args(["-D", "-e", "-f"]).arg(d.join("sshd_config")),
                &d.join("sshd.log"),
            );
            // sshd writes its pid file once its port is bound.
            let pid = sshd.pid();
            match sshd.wait_ready("sshd", || pid_file_names(&pid_file, pid)) {
                Ok(()) => {
                    let host = std::fs::read_to_string(d.join("host_ed25519.pub")).expect("reading the host key");
                    let host: Vec<&str> = host.split_whitespace().take(2).collect();
                    // ssh looks a host on port 22 up by its bare name.
                    let name = match port {
                        22 => addr.to_string(),
                        _ => format!("[{addr}]:{port}"),
                    };
                    let known_hosts_line = format!("{name} {}", host.join(" "));
                    let known_hosts = d.join("known_hosts");
                    std::fs::write(&known_hosts, format!("{known_hosts_line}\n")).expect("writing known_hosts");
                    return SshOrigin {
                        dir,
                        addr,
                        port,
                        user_key,
                        wrong_key,
                        known_hosts,
                        known_hosts_line,
                        sshd,
                    };
                }
                Err(log) => assert!(
                    log.contains("Address already in use") && fixed_port.is_none() && attempt < PORT_ATTEMPTS,
                    "{log}"
                ),
            }
        }
        unreachable!("the last attempt panics")
    }

    /// `ssh://root@ADDR:PORT/ABS/PATH` for a bare repository (or a socket) on this machine.
    pub fn url(&self, bare_repo: &Path) -> String {
        let abs = std::path::absolute(bare_repo).expect("an absolute repository path");
        format!("ssh://root@{}:{}{}", self.addr, self.port, abs.display())
    }

    /// `HOST ssh-ed25519 KEY` (HOST: `[ADDR]:PORT`, or `ADDR` on port 22): the server's host
    /// key as a known_hosts line.
    pub fn known_hosts_line(&self) -> &str {
        &self.known_hosts_line
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
