//! A disposable podman REST service for tests: its own storage under a temp dir, the test
//! fixture's containers.conf (runc, lower ulimits), killed and cleaned up on drop.
//!
//! Self-contained (std only) so any test crate can `#[path]`-include it. Needs
//! podman and runc installed: `fixtures/podman-service.sh install` (CI does this).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub struct PodmanService {
    dir: PathBuf,
    socket: PathBuf,
    child: Child,
}

/// `fixtures/containers.conf` next to this file's crate (or `$COHORT_FIXTURES`).
pub fn containers_conf() -> PathBuf {
    let base = std::env::var_os("COHORT_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures"));
    base.join("containers.conf")
}

impl PodmanService {
    /// Start a fresh service and wait until it answers on its socket.
    /// Panics with a fix when podman is missing: a test that needs podman must not pass without it.
    pub fn start() -> PodmanService {
        let conf = containers_conf();
        assert!(conf.exists(), "{} missing", conf.display());
        let tmp = std::env::temp_dir();
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = tmp.join(format!("cohort-podman-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["root", "runroot", "tmp"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let socket = dir.join("podman.sock");
        let log = std::fs::File::create(dir.join("service.log")).unwrap();
        let child = Command::new("podman")
            .arg("--root")
            .arg(dir.join("root"))
            .arg("--runroot")
            .arg(dir.join("runroot"))
            .arg("--tmpdir")
            .arg(dir.join("tmp"))
            .args(["system", "service", "--time=0"])
            .arg(format!("unix://{}", socket.display()))
            .env("CONTAINERS_CONF", &conf)
            .env("TMPDIR", dir.join("tmp"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run podman ({e}); install it with `fixtures/podman-service.sh install`"
                )
            });
        let me = PodmanService { dir, socket, child };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !me.socket.exists() {
            assert!(
                Instant::now() < deadline,
                "podman service did not start: {}",
                me.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        me
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The value for `CONTAINER_HOST`.
    pub fn container_host(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("service.log")).unwrap_or_default()
    }
}

impl Drop for PodmanService {
    fn drop(&mut self) {
        // Containers left by a failed test would keep overlay mounts under our storage:
        // remove them through the same storage before stopping the service.
        let _ = Command::new("podman")
            .arg("--root")
            .arg(self.dir.join("root"))
            .arg("--runroot")
            .arg(self.dir.join("runroot"))
            .args(["rm", "--all", "--force", "--time", "0"])
            .env("CONTAINERS_CONF", containers_conf())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
        // conmon stays behind after exec sessions (`--exit-delay 300`) and later runs a cleanup
        // that would re-mount this storage: end the processes that name our directory.
        let dir_str = self.dir.display().to_string();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if pid != std::process::id() && String::from_utf8_lossy(&cmdline).contains(&dir_str) {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
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
