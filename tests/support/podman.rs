//! A disposable podman REST service for tests: its own storage under a temp dir, the test
//! fixture's containers.conf (runc, lower ulimits), stopped and cleaned up on drop.
//! Rootful by default; [`PodmanService::start_rootless`] runs it as an ordinary user, the
//! way a developer's `systemctl --user` socket does.
//!
//! Self-contained (std only) so any test crate can `#[path]`-include it. Needs podman, runc
//! and uidmap installed and a test user with subordinate ids:
//! `fixtures/podman-service.sh install` (CI does this).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The user `fixtures/podman-service.sh install` creates for rootless tests.
pub const ROOTLESS_USER: &str = "cohort-podman-test";

pub struct PodmanService {
    dir: PathBuf,
    socket: PathBuf,
    child: Child,
    user: Option<String>,
    /// Set when the service listens on `tcp://127.0.0.1:PORT` instead of its socket.
    tcp_port: Option<u16>,
}

/// `fixtures/containers.conf` next to this file's crate (or `$COHORT_FIXTURES`).
pub fn containers_conf() -> PathBuf {
    let base = std::env::var_os("COHORT_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures"));
    base.join("containers.conf")
}

/// `(uid, gid)` of a host user, from /etc/passwd.
pub fn user_ids(user: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 3 && f[0] == user).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    })
}

impl PodmanService {
    /// A rootful service (as root, storage under a temp dir).
    pub fn start() -> PodmanService {
        Self::start_inner(None, false)
    }

    /// A rootful service listening on `tcp://127.0.0.1:PORT` (plain HTTP, loopback only)
    /// rather than on a unix socket: see [`PodmanService::tcp_uri`].
    pub fn start_tcp() -> PodmanService {
        Self::start_inner(None, true)
    }

    /// A rootless service run as `user` (see [`ROOTLESS_USER`]).
    pub fn start_rootless(user: &str) -> PodmanService {
        assert!(
            user_ids(user).is_some(),
            "no user {user}: run `fixtures/podman-service.sh install`"
        );
        Self::start_inner(Some(user.to_owned()), false)
    }

    /// Start a fresh service and wait until it answers on its socket.
    /// Panics with a fix when podman is missing: a test that needs podman must not pass without it.
    fn start_inner(user: Option<String>, tcp: bool) -> PodmanService {
        let conf = containers_conf();
        assert!(conf.exists(), "{} missing", conf.display());
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("cohort-podman-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["root", "runroot", "tmp", "xdg", "home"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        if let Some(u) = &user {
            let ok = Command::new("chown").arg("-R").arg(u).arg(&dir).status().unwrap();
            assert!(ok.success(), "chown {u} {}", dir.display());
            let _ = Command::new("chmod").arg("700").arg(dir.join("xdg")).status();
        }
        let socket = dir.join("podman.sock");
        let log = std::fs::File::create(dir.join("service.log")).unwrap();
        let mut me = PodmanService {
            dir,
            socket,
            child: Command::new("true").spawn().unwrap(),
            user,
            // A port free a moment ago; podman cannot be told to bind port 0 and report it.
            tcp_port: tcp.then(|| {
                let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                l.local_addr().unwrap().port()
            }),
        };
        let _ = me.child.wait();
        let listen = match me.tcp_port {
            Some(port) => format!("tcp://127.0.0.1:{port}"),
            None => format!("unix://{}", me.socket.display()),
        };
        me.child = me
            .podman()
            .args(["system", "service", "--time=0"])
            .arg(listen)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run podman ({e}); install it with `fixtures/podman-service.sh install`")
            });
        let deadline = Instant::now() + Duration::from_secs(30);
        let up = |me: &PodmanService| match me.tcp_port {
            Some(port) => std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
            None => me.socket.exists(),
        };
        while !up(&me) {
            if let Ok(Some(status)) = me.child.try_wait() {
                panic!("podman service exited ({status}): {}", me.log());
            }
            assert!(Instant::now() < deadline, "podman service did not start: {}", me.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        me
    }

    /// The podman CLI against this service's storage (for test set-up and inspection; the
    /// product never runs it). `CONTAINER_HOST` is cleared so it works locally, not remotely.
    pub fn cli(&self) -> Command {
        let mut c = self.podman();
        c.env_remove("CONTAINER_HOST");
        c
    }

    /// `podman` with this service's storage and settings, as its user.
    fn podman(&self) -> Command {
        let d = &self.dir;
        let mut cmd = match &self.user {
            Some(u) => {
                let mut c = Command::new("runuser");
                c.args(["-u", u, "--", "env"]);
                c.arg(format!("XDG_RUNTIME_DIR={}", d.join("xdg").display()));
                c.arg(format!("HOME={}", d.join("home").display()));
                c.arg(format!("CONTAINERS_CONF={}", containers_conf().display()));
                c.arg(format!("TMPDIR={}", d.join("tmp").display()));
                c.arg("podman");
                c
            }
            None => {
                let mut c = Command::new("podman");
                c.env("CONTAINERS_CONF", containers_conf());
                c.env("TMPDIR", d.join("tmp"));
                c
            }
        };
        cmd.arg("--root").arg(d.join("root"));
        cmd.arg("--runroot").arg(d.join("runroot"));
        cmd.arg("--tmpdir").arg(d.join("tmp"));
        cmd
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `tcp://127.0.0.1:PORT` of a [`PodmanService::start_tcp`] service.
    pub fn tcp_uri(&self) -> String {
        format!(
            "tcp://127.0.0.1:{}",
            self.tcp_port.expect("a service started with start_tcp")
        )
    }

    /// The value for `CONTAINER_HOST`.
    pub fn container_host(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The user the service runs as (`None`: root).
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("service.log")).unwrap_or_default()
    }
}

impl Drop for PodmanService {
    fn drop(&mut self) {
        // Containers left by a failed test would keep mounts under our storage.
        let _ = self
            .podman()
            .args(["rm", "--all", "--force", "--time", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        // conmon stays behind after exec sessions (`--exit-delay 300`) and later runs a cleanup
        // that would re-mount this storage; a rootless service also leaves a pause process.
        // End the processes that name our directory, and the pause process it recorded.
        let dir_str = self.dir.display().to_string();
        let mut pids: Vec<u32> = Vec::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if pid != std::process::id() && String::from_utf8_lossy(&cmdline).contains(&dir_str) {
                pids.push(pid);
            }
        }
        for pause in ["xdg/libpod/tmp/pause.pid", "tmp/pause.pid"] {
            if let Ok(p) = std::fs::read_to_string(self.dir.join(pause)) {
                pids.extend(p.trim().parse::<u32>());
            }
        }
        for pid in pids {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        }
        let _ = self.child.wait();
        // The overlay driver keeps its home mounted; unmount what is under our dir.
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut ours: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| Path::new(m).starts_with(&self.dir))
            .collect();
        ours.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in ours {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
