//! podman over ssh, in process (russh; no `ssh` program): one ssh session per [`Podman`],
//! reused, and per request one `direct-streamlocal@openssh.com` channel to the remote
//! socket (what `ssh -L local:/remote.sock` does, and what podman's own ssh client does).
//! sshd must allow it (`AllowStreamLocalForwarding`, on by default).
//!
//! Login: the ssh-agent's keys (`SSH_AUTH_SOCK`), then the endpoint's identity file, else
//! `~/.ssh/id_ed25519`, `id_ecdsa`, `id_rsa`. The host key must already be in known_hosts
//! ([`super::known_hosts`]): an unknown or changed key is refused, never learnt.
//!
//! [`Podman`]: super::Podman

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use russh::client::{self, Handle};
use russh::keys::agent::client::AgentClient;
use russh::keys::agent::AgentIdentity;
use russh::keys::{PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

use super::endpoint::{Endpoint, SshTarget};
use super::error::{PodmanError, Result};
use super::known_hosts::{self, Verdict};

/// How long the TCP connect, the key exchange and the login may take together.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// A stream a request is sent over.
pub(super) type Io = Box<dyn IoStream>;
pub(super) trait IoStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> IoStream for T {}

/// Checks the host key during the key exchange.
struct Checker {
    target: SshTarget,
}

#[derive(Debug)]
enum Fail {
    Ssh(russh::Error),
    HostKey(String),
}

impl From<russh::Error> for Fail {
    fn from(e: russh::Error) -> Self {
        Fail::Ssh(e)
    }
}

impl std::fmt::Display for Fail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fail::Ssh(e) => write!(f, "ssh: {e}"),
            Fail::HostKey(m) => f.write_str(m),
        }
    }
}

impl client::Handler for Checker {
    type Error = Fail;

    async fn check_server_key(&mut self, offered: &PublicKeyOrCertificate) -> Result<bool, Fail> {
        // A host certificate is trusted by its key, as when no @cert-authority line applies.
        let key = match offered {
            PublicKeyOrCertificate::PublicKey { key, .. } => key.clone(),
            PublicKeyOrCertificate::Certificate(c) => PublicKey::from(c.public_key().clone()),
        };
        let t = &self.target;
        let name = t.host_port();
        let files = known_hosts::files(t.known_hosts.as_deref());
        let shown = files
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let fp = known_hosts::fingerprint(&key);
        let alg = key.algorithm();
        let keyscan = format!("ssh-keyscan -p {} {}", t.port, t.host);
        let target = files.first().map(|p| p.display().to_string()).unwrap_or_default();
        match known_hosts::check(&files, &name, &key) {
            Verdict::Known => Ok(true),
            Verdict::Unknown => Err(Fail::HostKey(format!(
                "the ssh host key of {name} ({alg} {fp}) is not in {shown}; cohort never trusts a key it has not \
                 been told about. Compare that fingerprint with the host's own (`ssh-keygen -lf \
                 /etc/ssh/ssh_host_{}_key.pub` on it), then add it: `{keyscan} >> {target}`",
                alg.as_str()
                    .trim_start_matches("ssh-")
                    .split('-')
                    .next()
                    .unwrap_or("ed25519")
            ))),
            Verdict::Changed(lines) => Err(Fail::HostKey(format!(
                "THE SSH HOST KEY OF {name} HAS CHANGED: it offers {alg} {fp}, which differs from {}. Someone may \
                 be intercepting the connection, or the host was reinstalled. Only once you know which: remove the \
                 old entry with `ssh-keygen -R '{name}' -f {target}` and add the new one with `{keyscan} >> {target}`",
                lines
                    .iter()
                    .map(|(f, n)| format!("{}:{n}", f.display()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
            Verdict::Revoked(f, n) => Err(Fail::HostKey(format!(
                "the ssh host key of {name} ({alg} {fp}) is marked @revoked in {}:{n}; refusing it",
                f.display()
            ))),
        }
    }
}

/// The ssh session to one host, opened on first use and again after it dropped.
pub(super) struct SshConn {
    target: SshTarget,
    /// The session and its TCP connection's local address.
    handle: Mutex<Option<(Arc<Handle<Checker>>, IpAddr)>>,
}

impl std::fmt::Debug for SshConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshConn").field("target", &self.target).finish()
    }
}

fn remote_err(target: &SshTarget, message: impl Into<String>) -> PodmanError {
    PodmanError::Remote {
        endpoint: Endpoint::Ssh(target.clone()).to_string(),
        message: message.into(),
    }
}

impl SshConn {
    pub(super) fn new(target: SshTarget) -> SshConn {
        SshConn {
            target,
            handle: Mutex::new(None),
        }
    }

    /// A new channel to the remote podman socket. Returns the local address of the ssh
    /// connection too (the controller's address as the host sees it).
    pub(super) async fn open(&self) -> Result<(Io, IpAddr)> {
        let (handle, local) = {
            let mut slot = self.handle.lock().await;
            match slot.as_ref().filter(|(h, _)| !h.is_closed()) {
                Some((h, ip)) => (h.clone(), *ip),
                None => {
                    let (h, ip) = self.connect().await?;
                    let h = Arc::new(h);
                    *slot = Some((h.clone(), ip));
                    (h, ip)
                }
            }
        };
        let socket = self.target.socket.to_string_lossy().into_owned();
        let channel = handle.channel_open_direct_streamlocal(socket).await.map_err(|e| {
            remote_err(
                &self.target,
                format!(
                    "the ssh server refused a channel to {} ({e}): is podman's socket there and running \
                     (`systemctl --user enable --now podman.socket` on the host, as {}), and does sshd allow \
                     `AllowStreamLocalForwarding`?",
                    self.target.socket.display(),
                    self.target.user
                ),
            )
        })?;
        Ok((Box::new(channel.into_stream()), local))
    }

    async fn connect(&self) -> Result<(Handle<Checker>, IpAddr)> {
        let t = &self.target;
        let work = async {
            let tcp = TcpStream::connect((t.host.as_str(), t.port))
                .await
                .map_err(|e| format!("cannot reach the ssh server: {e}"))?;
            let _ = tcp.set_nodelay(true);
            let local = tcp
                .local_addr()
                .map_err(|e| format!("the connection's local address: {e}"))?
                .ip();
            let config = Arc::new(client::Config {
                // Long runs hold the session idle between requests; keepalives notice a
                // dead peer, and a NAT forgets an idle flow otherwise.
                keepalive_interval: Some(Duration::from_secs(30)),
                keepalive_max: 3,
                nodelay: true,
                ..Default::default()
            });
            let checker = Checker { target: t.clone() };
            let mut handle = client::connect_stream(config, tcp, checker)
                .await
                .map_err(|e| e.to_string())?;
            authenticate(&mut handle, t).await?;
            Ok::<_, String>((handle, local))
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, work).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(m)) => Err(remote_err(t, m)),
            Err(_) => Err(remote_err(
                t,
                format!("no ssh login within {}s", CONNECT_TIMEOUT.as_secs()),
            )),
        }
    }
}

/// `~/.ssh/id_ed25519`, `id_ecdsa`, `id_rsa` that exist.
fn default_identities() -> Vec<PathBuf> {
    let Some(home) = known_hosts::home_dir() else {
        return Vec::new();
    };
    ["id_ed25519", "id_ecdsa", "id_rsa"]
        .iter()
        .map(|n| home.join(".ssh").join(n))
        .filter(|p| p.exists())
        .collect()
}

async fn authenticate(handle: &mut Handle<Checker>, t: &SshTarget) -> Result<(), String> {
    let rsa_hash = handle.best_supported_rsa_hash().await.ok().flatten().flatten();
    let mut tried: Vec<String> = Vec::new();
    if let Some(sock) = std::env::var_os("SSH_AUTH_SOCK").filter(|s| !s.is_empty()) {
        match AgentClient::connect_uds(&sock).await {
            Ok(mut agent) => {
                let ids = agent.request_identities().await.unwrap_or_default();
                for id in ids {
                    let AgentIdentity::PublicKey { key, .. } = id else {
                        continue;
                    };
                    let hash = key.algorithm().is_rsa().then_some(rsa_hash).flatten();
                    let fp = known_hosts::fingerprint(&key);
                    match handle.authenticate_publickey_with(&t.user, key, hash, &mut agent).await {
                        Ok(r) if r.success() => return Ok(()),
                        Ok(_) => tried.push(format!("agent key {fp}")),
                        Err(e) => tried.push(format!("agent key {fp} ({e})")),
                    }
                }
            }
            Err(e) => tried.push(format!("the ssh-agent at SSH_AUTH_SOCK ({e})")),
        }
    }
    let files = match &t.identity {
        Some(p) => vec![p.clone()],
        None => default_identities(),
    };
    for f in files {
        match russh::keys::load_secret_key(&f, None) {
            Ok(key) => {
                let key = PrivateKeyWithHashAlg::new(Arc::new(key), rsa_hash);
                match handle.authenticate_publickey(&t.user, key).await {
                    Ok(r) if r.success() => return Ok(()),
                    Ok(_) => tried.push(f.display().to_string()),
                    Err(e) => tried.push(format!("{} ({e})", f.display())),
                }
            }
            Err(e) => tried.push(format!(
                "{} (unreadable: {e}; a key with a passphrase must be loaded into ssh-agent)",
                f.display()
            )),
        }
    }
    if tried.is_empty() {
        return Err(format!(
            "no ssh key to log in as {} with: start ssh-agent with your key (SSH_AUTH_SOCK), create \
             ~/.ssh/id_ed25519, or name a key with the connection's identity",
            t.user
        ));
    }
    Err(format!(
        "ssh login as {} refused (tried {}); add one of these keys' public halves to ~{}/.ssh/authorized_keys on the host",
        t.user,
        tried.join(", "),
        t.user
    ))
}
