//! Where a podman service listens: the URIs podman itself writes (`podman system connection
//! list`, `CONTAINER_HOST`, containers.conf `service_destinations`).

use std::fmt;
use std::path::PathBuf;

use super::error::{PodmanError, Result};

/// A podman service's address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `unix:///run/podman/podman.sock`: a socket on this machine.
    Unix(PathBuf),
    /// `tcp://HOST:PORT`. Podman's TCP listener is plain HTTP: no encryption and no
    /// authentication, so anyone who can reach the port owns the host. Use it only on a
    /// network you trust (or loopback); prefer ssh elsewhere.
    Tcp { host: String, port: u16 },
    /// `ssh://USER@HOST[:PORT]/path/to/podman.sock`: the remote socket, reached through an
    /// ssh connection's `direct-streamlocal` channels.
    Ssh(SshTarget),
}

/// An ssh login and the podman socket on the far side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshTarget {
    pub user: String,
    pub host: String,
    /// Default 22.
    pub port: u16,
    /// The podman socket's absolute path on the host.
    pub socket: PathBuf,
    /// The private key to log in with (after the ssh-agent's keys, if an agent runs); none:
    /// `~/.ssh/id_ed25519`, `id_ecdsa`, `id_rsa`.
    pub identity: Option<PathBuf>,
    /// The known_hosts file the host key is checked against, instead of
    /// `$COHORT_KNOWN_HOSTS` or `~/.ssh/known_hosts` (+ `/etc/ssh/ssh_known_hosts`).
    pub known_hosts: Option<PathBuf>,
}

impl SshTarget {
    /// `host` or `[host]:port`, as known_hosts and ssh-keyscan name it.
    pub fn host_port(&self) -> String {
        if self.port == 22 {
            self.host.clone()
        } else {
            format!("[{}]:{}", self.host, self.port)
        }
    }
}

/// `user@`'s default when a URI names none: the user cohort runs as, like ssh.
fn current_user() -> String {
    nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map(|u| u.name)
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "root".to_owned())
}

fn bad(uri: &str, why: impl fmt::Display) -> PodmanError {
    PodmanError::Endpoint(format!(
        "{uri:?}: {why}; write unix:///path/podman.sock, tcp://HOST:PORT or ssh://USER@HOST[:PORT]/path/podman.sock"
    ))
}

/// Split `HOST[:PORT]` (HOST may be `[v6]`); the port must be 1..=65535.
fn host_port(uri: &str, s: &str) -> Result<(String, Option<u16>)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or_else(|| bad(uri, "unclosed [ in the host"))?;
        match after {
            "" => (h, None),
            p => (h, Some(p.strip_prefix(':').ok_or_else(|| bad(uri, "junk after ]"))?)),
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    if host.is_empty() {
        return Err(bad(uri, "no host"));
    }
    if host.contains(['/', '@', ' ', '?', '#']) || (host.contains(':') && !s.starts_with('[')) {
        return Err(bad(uri, format!("{host:?} is not a host name")));
    }
    let port = match port {
        None => None,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => Some(n),
            _ => return Err(bad(uri, format!("{p:?} is not a port (1-65535)"))),
        },
    };
    Ok((host.to_owned(), port))
}

impl Endpoint {
    /// Parse a podman connection URI. A query string (`?secure=true`, which podman adds
    /// for ssh) is ignored.
    pub fn parse(uri: &str) -> Result<Endpoint> {
        let s = uri.trim();
        let s = s.split_once('?').map_or(s, |(a, _)| a);
        if let Some(path) = s.strip_prefix("unix://").or_else(|| s.strip_prefix("unix:")) {
            if !path.starts_with('/') {
                return Err(bad(uri, "a unix socket path must be absolute (unix:///path)"));
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = s.strip_prefix("tcp://") {
            let authority = rest.strip_suffix('/').unwrap_or(rest);
            if authority.contains('/') {
                return Err(bad(uri, "a tcp endpoint has no path"));
            }
            let (host, port) = host_port(uri, authority)?;
            let port = port.ok_or_else(|| bad(uri, "a tcp endpoint needs a port"))?;
            return Ok(Endpoint::Tcp { host, port });
        }
        if let Some(rest) = s.strip_prefix("ssh://") {
            let (authority, path) = match rest.find('/') {
                Some(i) => rest.split_at(i),
                None => return Err(bad(uri, "no socket path after the host")),
            };
            if path.len() < 2 {
                return Err(bad(uri, "no socket path after the host"));
            }
            let (user, hp) = match authority.rsplit_once('@') {
                Some((u, hp)) => {
                    if u.is_empty() || u.contains(':') {
                        return Err(bad(uri, "give the user alone (passwords are not taken)"));
                    }
                    (u.to_owned(), hp)
                }
                None => (current_user(), authority),
            };
            let (host, port) = host_port(uri, hp)?;
            return Ok(Endpoint::Ssh(SshTarget {
                user,
                host,
                port: port.unwrap_or(22),
                socket: PathBuf::from(path),
                identity: None,
                known_hosts: None,
            }));
        }
        Err(bad(uri, "unknown scheme"))
    }

    /// The same endpoint with `identity` as its ssh key (no effect on others).
    pub fn with_identity(mut self, identity: Option<PathBuf>) -> Endpoint {
        if let Endpoint::Ssh(t) = &mut self {
            t.identity = identity.filter(|p| !p.as_os_str().is_empty());
        }
        self
    }

    /// The host part (for a name): the socket's path for unix.
    pub fn host(&self) -> String {
        match self {
            Endpoint::Unix(p) => p.display().to_string(),
            Endpoint::Tcp { host, .. } => host.clone(),
            Endpoint::Ssh(t) => t.host.clone(),
        }
    }
}

/// The URI, without the identity file (nothing secret is in an endpoint).
impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bracket = |h: &str| {
            if h.contains(':') {
                format!("[{h}]")
            } else {
                h.to_owned()
            }
        };
        match self {
            Endpoint::Unix(p) => write!(f, "unix://{}", p.display()),
            Endpoint::Tcp { host, port } => write!(f, "tcp://{}:{port}", bracket(host)),
            Endpoint::Ssh(t) => {
                write!(f, "ssh://{}@{}", t.user, bracket(&t.host))?;
                if t.port != 22 {
                    write!(f, ":{}", t.port)?;
                }
                write!(f, "{}", t.socket.display())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_podman_uris() {
        assert_eq!(
            Endpoint::parse("unix:///run/podman/podman.sock").unwrap(),
            Endpoint::Unix("/run/podman/podman.sock".into())
        );
        assert_eq!(
            Endpoint::parse("tcp://10.0.0.2:8888").unwrap(),
            Endpoint::Tcp {
                host: "10.0.0.2".into(),
                port: 8888
            }
        );
        let Endpoint::Ssh(t) =
            Endpoint::parse("ssh://core@h.example:2222/run/user/1000/podman/podman.sock?secure=true").unwrap()
        else {
            panic!("not ssh")
        };
        assert_eq!((t.user.as_str(), t.host.as_str(), t.port), ("core", "h.example", 2222));
        assert_eq!(t.socket, PathBuf::from("/run/user/1000/podman/podman.sock"));
        assert_eq!(t.host_port(), "[h.example]:2222");
        let Endpoint::Ssh(t) = Endpoint::parse("ssh://root@[::1]/run/podman/podman.sock").unwrap() else {
            panic!("not ssh")
        };
        assert_eq!((t.host.as_str(), t.port), ("::1", 22));
        assert_eq!(t.host_port(), "::1");
        assert_eq!(
            Endpoint::parse("tcp://[fd00::2]:80").unwrap().to_string(),
            "tcp://[fd00::2]:80"
        );
        assert_eq!(
            Endpoint::parse("ssh://u@h:2/s.sock").unwrap().to_string(),
            "ssh://u@h:2/s.sock"
        );
    }

    #[test]
    fn rejects_what_podman_would_not_write() {
        for bad in [
            "http://h:1",
            "h:1",
            "unix://relative.sock",
            "tcp://h",
            "tcp://h:0",
            "tcp://h:99999",
            "tcp://h:1/path",
            "tcp://:1",
            "ssh://u@h",
            "ssh://u@h/",
            "ssh://u:pw@h/s.sock",
            "ssh://u@h:x/s.sock",
            "ssh://u@[::1/s.sock",
            "",
        ] {
            let e = Endpoint::parse(bad).expect_err(bad).to_string();
            assert!(e.contains("ssh://USER@HOST"), "{bad}: {e}");
        }
    }
}
