//! The sd_notify protocol, in-process: datagrams like `READY=1\nSTATUS=...` sent to the
//! unix socket in `$NOTIFY_SOCKET`. This is what lets `cohort serve` be `Type=notify` with
//! a watchdog without a `systemd-notify` binary (which would also race: systemd attributes
//! a notification to the sending PID, and a short-lived child may be gone by then).

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// One field of a notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifyState {
    /// Start-up is finished (`Type=notify` units become active).
    Ready,
    /// The service is reloading its configuration.
    Reloading,
    /// The service is shutting down.
    Stopping,
    /// Free-form status line shown by `systemctl status`.
    Status(String),
    /// Keep-alive for `WatchdogSec=`.
    Watchdog,
    /// Ask for a new watchdog timeout.
    WatchdogUsec(u64),
    /// Extend the start/stop timeout by this many µs.
    ExtendTimeoutUsec(u64),
}

impl NotifyState {
    fn render(&self, out: &mut String) -> Result<(), NotifyError> {
        use std::fmt::Write as _;
        match self {
            NotifyState::Ready => out.push_str("READY=1"),
            NotifyState::Reloading => out.push_str("RELOADING=1"),
            NotifyState::Stopping => out.push_str("STOPPING=1"),
            NotifyState::Watchdog => out.push_str("WATCHDOG=1"),
            NotifyState::Status(s) => {
                // The protocol is newline-separated assignments: a newline would start a
                // new (attacker-chosen) field.
                if s.contains('\n') {
                    return Err(NotifyError::Newline);
                }
                let _ = write!(out, "STATUS={s}");
            }
            NotifyState::WatchdogUsec(u) => {
                let _ = write!(out, "WATCHDOG_USEC={u}");
            }
            NotifyState::ExtendTimeoutUsec(u) => {
                let _ = write!(out, "EXTEND_TIMEOUT_USEC={u}");
            }
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("$NOTIFY_SOCKET={0:?} is not a unix socket path or @abstract name")]
    UnsupportedAddress(String),
    #[error("a notification value must not contain a newline")]
    Newline,
    #[error("sending to $NOTIFY_SOCKET {addr:?}: {source}")]
    Io {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// A connection to the service manager's notification socket.
#[derive(Debug)]
pub struct Notifier {
    sock: UnixDatagram,
    addr: SocketAddr,
    label: String,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`; `Ok(None)` when not run by systemd (or not `Type=notify`),
    /// so callers can notify unconditionally.
    pub fn from_env() -> Result<Option<Self>, NotifyError> {
        match std::env::var("NOTIFY_SOCKET") {
            Ok(v) if !v.is_empty() => Self::connect(&v).map(Some),
            _ => Ok(None),
        }
    }

    /// To an explicit address: an absolute path, or `@name` for the abstract namespace
    /// (systemd uses abstract sockets for some managers, e.g. in containers).
    pub fn connect(addr: &str) -> Result<Self, NotifyError> {
        let io = |source| NotifyError::Io {
            addr: addr.to_string(),
            source,
        };
        let sa = if let Some(name) = addr.strip_prefix('@') {
            SocketAddr::from_abstract_name(name.as_bytes()).map_err(io)?
        } else if addr.starts_with('/') {
            SocketAddr::from_pathname(addr).map_err(io)?
        } else {
            // vsock: addresses are for VMs talking to their host; not our case.
            return Err(NotifyError::UnsupportedAddress(addr.to_string()));
        };
        let sock = UnixDatagram::unbound().map_err(io)?;
        Ok(Self {
            sock,
            addr: sa,
            label: addr.to_string(),
        })
    }

    /// Send several fields in one datagram (systemd applies them atomically).
    pub fn notify(&self, states: &[NotifyState]) -> Result<(), NotifyError> {
        let mut msg = String::new();
        for (i, s) in states.iter().enumerate() {
            if i > 0 {
                msg.push('\n');
            }
            s.render(&mut msg)?;
        }
        self.sock
            .send_to_addr(msg.as_bytes(), &self.addr)
            .map_err(|source| NotifyError::Io {
                addr: self.label.clone(),
                source,
            })?;
        Ok(())
    }

    pub fn ready(&self) -> Result<(), NotifyError> {
        self.notify(&[NotifyState::Ready])
    }

    pub fn status(&self, status: &str) -> Result<(), NotifyError> {
        self.notify(&[NotifyState::Status(status.to_string())])
    }

    pub fn watchdog(&self) -> Result<(), NotifyError> {
        self.notify(&[NotifyState::Watchdog])
    }

    pub fn stopping(&self) -> Result<(), NotifyError> {
        self.notify(&[NotifyState::Stopping])
    }
}

/// The watchdog interval systemd expects pings within (`WatchdogSec=`), if it is enabled
/// for *this* process: `$WATCHDOG_USEC`, honoured only when `$WATCHDOG_PID` is unset or is
/// our PID (a child that inherited the environment must not ping for its parent).
/// Callers should ping at about half this interval.
pub fn watchdog_interval() -> Option<Duration> {
    watchdog_interval_from(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

fn watchdog_interval_from(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok()? != me {
            return None;
        }
    }
    let usec: u64 = usec?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recv(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn sends_to_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::connect(path.to_str().unwrap()).unwrap();
        n.ready().unwrap();
        assert_eq!(recv(&server), "READY=1");
        n.notify(&[NotifyState::Status("serving 3 runs".into()), NotifyState::Watchdog])
            .unwrap();
        assert_eq!(recv(&server), "STATUS=serving 3 runs\nWATCHDOG=1");
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        let name = format!("cohort-test-notify-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        let n = Notifier::connect(&format!("@{name}")).unwrap();
        n.watchdog().unwrap();
        assert_eq!(recv(&server), "WATCHDOG=1");
    }

    #[test]
    fn refuses_newlines_and_odd_addresses() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n");
        let _server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::connect(path.to_str().unwrap()).unwrap();
        assert!(matches!(n.status("a\nREADY=1"), Err(NotifyError::Newline)));
        assert!(matches!(
            Notifier::connect("vsock:2:1234"),
            Err(NotifyError::UnsupportedAddress(_))
        ));
    }

    #[test]
    fn missing_socket_is_an_io_error() {
        let n = Notifier::connect("/nonexistent/cohort-notify").unwrap();
        assert!(matches!(n.ready(), Err(NotifyError::Io { .. })));
    }

    #[test]
    fn watchdog_interval_respects_pid() {
        let d = watchdog_interval_from(Some("3000000"), None, 7);
        assert_eq!(d, Some(Duration::from_secs(3)));
        assert_eq!(watchdog_interval_from(Some("3000000"), Some("7"), 7), d);
        assert_eq!(watchdog_interval_from(Some("3000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval_from(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval_from(None, None, 7), None);
        assert_eq!(watchdog_interval_from(Some("x"), None, 7), None);
    }
}
