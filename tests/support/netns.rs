//! Simulated podman hosts on this one machine, for tests of cohort driving remote hosts.
//!
//! A [`SimHost`] is a network namespace (`cohort-sim-<pid>-<n>`) joined to the root namespace
//! by a veth pair (root side `10.77.K.1/30`, the "controller" address; namespace side
//! `10.77.K.2/30`), with its own rootful podman service and storage under a temp dir of the
//! same name. The service is reachable only over the network: `tcp://10.77.K.2:8888`, or with
//! [`SimHost::start_with_ssh`] through an sshd in the namespace to a unix socket. The namespace
//! has no default route, so a `--network host` container there reaches 10.77.K.1 (anything the
//! root namespace listens on there) and nothing else.
//!
//! Processes join the namespace with `nsenter --net` rather than `ip netns exec`: the latter
//! also gives them a mount namespace of their own, where the service's overlay mounts would
//! be invisible to the podman CLI the tests inspect with and to the clean-up here.
//!
//! Needs root, iproute2, nsenter, podman + runc (`fixtures/podman-service.sh install`) and for
//! ssh openssh-server/-client (`tests/run.sh` installs them).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

use super::remotes::SshOrigin;

/// The port of a TCP host's podman service (each namespace is fresh, so it is always free).
pub const PODMAN_PORT: u16 = 8888;

/// Every simulated host's namespace and temp dir name starts with this.
const PREFIX: &str = "cohort-sim-";

/// A simulated podman host; everything it started is killed and removed on drop.
pub struct SimHost {
    /// The namespace's name, also the temp dir's and `ip netns list`'s.
    name: String,
    dir: PathBuf,
    /// The third octet of the host's /30 (0 until claimed).
    k: u8,
    veth: Option<String>,
    service: Option<Child>,
    ssh: Option<SshOrigin>,
}

/// Runs `cmd` (set-up or clean-up), killing it after `limit`; `Err(stderr or why)` on failure.
fn run_for(cmd: &mut Command, limit: Duration) -> Result<String, String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
    let deadline = Instant::now() + limit;
    while child.try_wait().map_err(|e| e.to_string())?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{cmd:?} still running after {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// `ip ARGS`, which must succeed.
fn ip(args: &[&str]) {
    if let Err(e) = run_for(Command::new("ip").args(args), Duration::from_secs(10)) {
        panic!("simulated host set-up: {e} (needs root and iproute2)");
    }
}

/// `GET /_ping` over `stream`: true on `200 OK`.
fn ping_over(mut stream: impl Read + Write) -> bool {
    let req = "GET /v4.0.0/libpod/_ping HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n";
    let mut answer = String::new();
    stream.write_all(req.as_bytes()).is_ok()
        && stream.read_to_string(&mut answer).is_ok()
        && answer.starts_with("HTTP/1.1 200")
        && answer.ends_with("OK")
}

impl SimHost {
    /// Host number `n` (only for messages) with its podman service on `tcp://10.77.K.2:8888`.
    pub fn start(n: usize) -> SimHost {
        Self::start_inner(n, false)
    }

    /// Host number `n` with its podman service on a unix socket that only an sshd in the
    /// namespace (`10.77.K.2:22`, root with [`SimHost::ssh_key`]) gives access to.
    pub fn start_with_ssh(n: usize) -> SimHost {
        Self::start_inner(n, true)
    }

    /// `count` hosts started side by side (host `i` has ssh when `with_ssh(i)`), numbered
    /// from 1: starting podman services one after the other is the slow part.
    pub fn start_many(count: usize, with_ssh: impl Fn(usize) -> bool) -> Vec<SimHost> {
        let handles: Vec<_> = (1..=count)
            .map(|n| {
                let ssh = with_ssh(n);
                std::thread::spawn(move || Self::start_inner(n, ssh))
            })
            .collect();
        // Join every thread before panicking, so no started host is left undropped.
        let results: Vec<_> = handles.into_iter().map(|h| h.join()).collect();
        let mut hosts = Vec::new();
        let mut failed = None;
        for r in results {
            match r {
                Ok(h) => hosts.push(h),
                Err(e) => failed = Some(e),
            }
        }
        if let Some(e) = failed {
            drop(hosts);
            std::panic::resume_unwind(e);
        }
        hosts
    }

    fn start_inner(n: usize, with_ssh: bool) -> SimHost {
        static SWEEP: Once = Once::new();
        SWEEP.call_once(sweep_stale);
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(&name);
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["root", "runroot", "tmp"] {
            std::fs::create_dir_all(dir.join(sub)).expect("creating a simulated host's dir");
        }
        // From here on, Drop cleans up whatever part was built.
        let mut host = SimHost {
            name,
            dir,
            k: 0,
            veth: None,
            service: None,
            ssh: None,
        };
        ip(&["netns", "add", &host.name]);
        host.claim_link();
        let ns_ip = host.ip().to_string();
        ip(&["-n", &host.name, "addr", "add", &format!("{ns_ip}/30"), "dev", "eth0"]);
        ip(&["-n", &host.name, "link", "set", "eth0", "up"]);
        ip(&["-n", &host.name, "link", "set", "lo", "up"]);
        // The namespace routes for a bridged container: each probe of an address it has no
        // route to gets its "unreachable" at once, not after the first one's rate limit.
        let sysctl = host
            .in_netns("sysctl")
            .args(["-qw", "net.ipv4.icmp_ratelimit=0"])
            .status();
        assert!(sysctl.is_ok_and(|s| s.success()), "sysctl in {}", host.name);

        let log = std::fs::File::create(host.dir.join("service.log")).expect("creating the service log");
        let endpoint = if with_ssh {
            format!("unix://{}", host.socket().display())
        } else {
            format!("tcp://{ns_ip}:{PODMAN_PORT}")
        };
        let child = host
            .in_netns("podman")
            .args(["system", "service", "--time=0", &endpoint])
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("cloning a file handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run podman ({e}): run `fixtures/podman-service.sh install`"));
        host.service = Some(child);
        if with_ssh {
            host.ssh = Some(SshOrigin::start_in_netns(&host.name, host.ip(), 22));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while !host.answers() {
            let exited = host.service.as_mut().and_then(|c| c.try_wait().ok().flatten());
            assert!(exited.is_none(), "host {n}: podman service exited: {}", host.log());
            assert!(
                Instant::now() < deadline,
                "host {n}: podman service not up in 30 s: {}",
                host.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        host
    }

    /// Picks a free /30 (third octet K), claims it by creating the root side's veth `csimK`
    /// (a link name is taken atomically, so test processes racing for K cannot both win) with
    /// its peer `eth0` in the namespace, and gives the root side its address.
    fn claim_link(&mut self) {
        let pid = std::process::id() as usize;
        let serial: usize = self.name.rsplit('-').next().and_then(|s| s.parse().ok()).unwrap_or(0);
        let used = run_for(
            Command::new("ip").args(["-o", "-4", "addr", "show"]),
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("listing addresses: {e}"));
        for i in 0..254 {
            let k = ((pid * 7 + serial + i) % 254 + 1) as u8;
            if used.contains(&format!(" 10.77.{k}.")) {
                continue;
            }
            let veth = format!("csim{k}");
            let peer = format!("netns {}", self.name);
            let made = run_for(
                Command::new("ip")
                    .args(["link", "add", &veth, "type", "veth", "peer", "name", "eth0"])
                    .args(peer.split(' ')),
                Duration::from_secs(10),
            );
            match made {
                Ok(_) => {
                    self.k = k;
                    self.veth = Some(veth.clone());
                    // Which host this is, for the stale sweep of a killed test process.
                    let _ = std::fs::write(self.dir.join("veth"), &veth);
                    ip(&["addr", "add", &format!("{}/30", self.controller_ip()), "dev", &veth]);
                    ip(&["link", "set", &veth, "up"]);
                    return;
                }
                Err(e) if e.contains("exists") => continue,
                Err(e) => panic!("creating a veth pair: {e}"),
            }
        }
        panic!("no free 10.77.K.0/30 for a simulated host: leaked csim* links? (`ip -o link`)")
    }

    /// What cohort's `--host` takes: `tcp://10.77.K.2:8888` or
    /// `ssh://root@10.77.K.2:22/<dir>/podman.sock`.
    pub fn url(&self) -> String {
        match &self.ssh {
            Some(ssh) => ssh.url(&self.socket()),
            None => format!("tcp://{}:{PODMAN_PORT}", self.ip()),
        }
    }

    /// The root namespace's address on this host's link (10.77.K.1): where a controller
    /// listening in the root namespace is reached from this host.
    pub fn controller_ip(&self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 77, self.k, 1))
    }

    /// The host's own address (10.77.K.2).
    pub fn ip(&self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 77, self.k, 2))
    }

    /// The ssh login's private key (ssh hosts only).
    pub fn ssh_key(&self) -> Option<&Path> {
        self.ssh.as_ref().map(|s| s.user_key.as_path())
    }

    /// `10.77.K.2 ssh-ed25519 …`, the host key as a known_hosts line (ssh hosts only).
    pub fn known_hosts_line(&self) -> Option<&str> {
        self.ssh.as_ref().map(|s| s.known_hosts_line())
    }

    /// A known_hosts file holding [`SimHost::known_hosts_line`] (ssh hosts only).
    pub fn known_hosts(&self) -> Option<&Path> {
        self.ssh.as_ref().map(|s| s.known_hosts.as_path())
    }

    /// The podman service's unix socket (ssh hosts; a TCP host has none).
    pub fn socket(&self) -> PathBuf {
        self.dir.join("podman.sock")
    }

    /// The namespace's name (`ip netns list`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The root side of the veth pair (`csimK`).
    pub fn veth(&self) -> &str {
        self.veth.as_deref().unwrap_or("")
    }

    /// The temp dir holding the host's storage, socket and logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The podman service's output.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("service.log")).unwrap_or_default()
    }

    /// True while the podman service answers `_ping` (over TCP; for an ssh host on its
    /// socket directly, not through sshd).
    pub fn answers(&self) -> bool {
        let limit = Duration::from_secs(2);
        if self.ssh.is_some() {
            let Ok(s) = UnixStream::connect(self.socket()) else {
                return false;
            };
            let _ = s.set_read_timeout(Some(limit));
            return ping_over(s);
        }
        let Ok(s) = TcpStream::connect_timeout(&SocketAddr::new(self.ip(), PODMAN_PORT), limit) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(limit));
        ping_over(s)
    }

    /// `cmd` in the host's network namespace (and only that: the mount namespace is ours).
    fn in_netns(&self, cmd: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.name)).arg(cmd);
        if cmd == "podman" {
            c.env("CONTAINERS_CONF", super::fixture("containers.conf"));
            c.env("TMPDIR", self.dir.join("tmp"));
            c.env_remove("CONTAINER_HOST");
            c.arg("--root").arg(self.dir.join("root"));
            c.arg("--runroot").arg(self.dir.join("runroot"));
            c.arg("--tmpdir").arg(self.dir.join("tmp"));
        }
        c
    }

    /// The podman CLI on this host's storage, run in its namespace, for test set-up and
    /// assertions (`ps`, `inspect`, `run --network host`); works after [`SimHost::kill`] too.
    pub fn podman_cli(&self) -> Command {
        self.in_netns("podman")
    }

    /// `podman inspect` of every container on the host (any state), e.g. `["Mounts"]` with
    /// each mount's `Source`, `["State"]["Running"]`, `["Config"]["Env"]`.
    pub fn containers(&self) -> Vec<serde_json::Value> {
        // Asked again on an error: the run's workers are auto-remove containers, which
        // podman deletes at any moment, and a listing has once failed next to that.
        let mut tries = 0;
        let ids = loop {
            match run_for(
                self.podman_cli().args(["ps", "--all", "--quiet", "--no-trunc"]),
                Duration::from_secs(30),
            ) {
                Ok(ids) => break ids,
                Err(e) if tries < 3 => {
                    eprintln!("{}: {e}; asking again", self.name);
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => panic!("{}: {e}", self.name),
            }
        };
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if ids.is_empty() {
            return Vec::new();
        }
        // One at a time: a container removed between the listing and its inspect (a run
        // ending) is left out rather than failing the whole call.
        let mut out = Vec::new();
        for id in ids {
            let Ok(json) = run_for(
                self.podman_cli().args(["container", "inspect", id]),
                Duration::from_secs(30),
            ) else {
                continue;
            };
            let records: Vec<serde_json::Value> =
                serde_json::from_str(&json).unwrap_or_else(|e| panic!("podman inspect: {e}: {json}"));
            out.extend(records);
        }
        out
    }

    /// What [`Self::containers`] still lists after up to `within`: the run's workers go by
    /// podman's auto-remove, which finishes a moment after `cohort run` has exited.
    pub fn containers_left_after(&self, within: Duration) -> Vec<serde_json::Value> {
        let deadline = std::time::Instant::now() + within;
        loop {
            let left = self.containers();
            if left.is_empty() || std::time::Instant::now() >= deadline {
                return left;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The host's podman events so far (`podman events --stream=false`), oldest first, e.g.
    /// `{"Type": "container", "Status": "start", "ID": …, "Image": …}`: what ran here even
    /// when the containers are gone.
    pub fn events(&self) -> Vec<serde_json::Value> {
        let lines = run_for(
            self.podman_cli().args(["events", "--stream=false", "--format", "json"]),
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("{}: {e}", self.name));
        lines
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("podman events: {e}: {l}")))
            .collect()
    }

    /// Every process of this host: in its network namespace, naming its dir (conmon, podman
    /// clean-ups), and their descendants (containers with a network of their own).
    pub fn pids(&self) -> Vec<u32> {
        host_pids(&self.name, &self.dir)
    }

    /// The host dies: SIGKILL to every process of it (podman service, conmon, containers,
    /// sshd) until none is left. Its namespace, link and storage stay until drop.
    pub fn kill(&mut self) {
        let left = kill_host(&self.name, &self.dir);
        assert!(
            left.is_empty(),
            "{}: processes alive after SIGKILL: {left:?}",
            self.name
        );
        if let Some(mut c) = self.service.take() {
            let _ = c.wait();
        }
        if let Some(ssh) = &mut self.ssh {
            ssh.stop();
        }
    }
}

/// Processes that belong to the host `name` (see [`SimHost::pids`]).
fn host_pids(name: &str, dir: &Path) -> Vec<u32> {
    let me = std::process::id();
    let mut ours: BTreeSet<u32> = run_for(
        Command::new("ip").args(["netns", "pids", name]),
        Duration::from_secs(10),
    )
    .unwrap_or_default()
    .split_whitespace()
    .filter_map(|p| p.parse().ok())
    .collect();
    let inside = format!("{}/", dir.display());
    let whole = dir.display().to_string();
    let mut parents: Vec<(u32, u32)> = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let names_dir = cmdline.split(|b| *b == 0).any(|arg| {
            let arg = String::from_utf8_lossy(arg);
            arg.contains(&inside) || arg.ends_with(&whole)
        });
        if names_dir {
            ours.insert(pid);
        }
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
        let ppid = stat
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().nth(1)?.parse().ok());
        if let Some(ppid) = ppid {
            parents.push((pid, ppid));
        }
    }
    loop {
        let before = ours.len();
        for (pid, ppid) in &parents {
            if ours.contains(ppid) {
                ours.insert(*pid);
            }
        }
        if ours.len() == before {
            break;
        }
    }
    ours.remove(&me);
    ours.into_iter().collect()
}

fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // A zombie is dead; its parent (maybe us) reaps it.
        Ok(stat) => !stat.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// SIGKILL to the host's processes, again until none is alive (a dying parent can have
/// forked); the survivors after 5 s.
fn kill_host(name: &str, dir: &Path) -> Vec<u32> {
    for _ in 0..100 {
        let pids: Vec<u32> = host_pids(name, dir).into_iter().filter(|p| alive(*p)).collect();
        if pids.is_empty() {
            return pids;
        }
        for pid in pids {
            // SAFETY: kill(2) with a pid just read from /proc; at worst it names a process that
            // ended meanwhile (ESRCH) — pids are not reused that fast.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    host_pids(name, dir).into_iter().filter(|p| alive(*p)).collect()
}

/// Everything of host `name` gone: processes, containers' leftovers (podman's records of them,
/// their networks), mounts under `dir`, the namespace, the link and `dir`.
fn clean_up(name: &str, dir: &Path, veth: Option<&str>) {
    // Never panics: it runs in Drop, maybe while a failed test unwinds.
    kill_host(name, dir);
    if dir.join("root").exists() {
        let mut rm = Command::new("nsenter");
        rm.arg(format!("--net=/run/netns/{name}"))
            .arg("podman")
            .env("CONTAINERS_CONF", super::fixture("containers.conf"))
            .env("TMPDIR", dir.join("tmp"))
            .env_remove("CONTAINER_HOST")
            .arg("--root")
            .arg(dir.join("root"))
            .arg("--runroot")
            .arg(dir.join("runroot"))
            .arg("--tmpdir")
            .arg(dir.join("tmp"))
            .args(["rm", "--all", "--force", "--time", "0"]);
        let _ = run_for(&mut rm, Duration::from_secs(30));
        kill_host(name, dir);
    }
    // The overlay driver keeps its home and the containers' roots mounted.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut ours: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| Path::new(m).starts_with(dir))
        .collect();
    ours.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in ours {
        let _ = run_for(Command::new("umount").arg("-l").arg(m), Duration::from_secs(10));
    }
    let _ = run_for(
        Command::new("ip").args(["netns", "delete", name]),
        Duration::from_secs(10),
    );
    // Gone with its peer once the namespace is; deleted here in case something holds it.
    if let Some(veth) = veth {
        let _ = run_for(
            Command::new("ip").args(["link", "delete", veth]),
            Duration::from_secs(10),
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Hosts left by test processes that were killed before dropping them (`cohort-sim-PID-N` of a
/// PID no longer running).
fn sweep_stale() {
    let list = run_for(Command::new("ip").args(["netns", "list"]), Duration::from_secs(10)).unwrap_or_default();
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = name.strip_prefix(PREFIX).and_then(|r| r.split('-').next()) else {
            continue;
        };
        if Path::new("/proc").join(pid).exists() {
            continue;
        }
        let dir = std::env::temp_dir().join(name);
        let veth = std::fs::read_to_string(dir.join("veth")).ok();
        clean_up(name, &dir, veth.as_deref().map(str::trim));
    }
}

impl Drop for SimHost {
    fn drop(&mut self) {
        if let Some(ssh) = &mut self.ssh {
            ssh.stop();
        }
        if let Some(mut c) = self.service.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        clean_up(&self.name, &self.dir, self.veth.as_deref());
    }
}
