//! The simulated podman hosts (`support::netns::SimHost`) proven: each answers over its own
//! URL only (TCP, or ssh with the test key and the host key line), a `--network host`
//! container on one reaches its controller address and nothing else, and a killed host
//! leaves no process, and once dropped no namespace, link or storage — a panicking test
//! included. Needs root, podman + runc and busybox-static (`tests/run.sh` installs them).

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::netns::{SimHost, PODMAN_PORT};
use support::{fixture, text};

/// The podman remote client against `host`'s service, through its URL.
fn remote(host: &SimHost, args: &[&str]) -> Output {
    Command::new("podman")
        .arg("--url")
        .arg(host.url())
        .args(args)
        .env_remove("CONTAINER_HOST")
        .env("CONTAINERS_CONF", fixture("containers.conf"))
        .stdin(Stdio::null())
        .output()
        .expect("running the podman CLI")
}

fn remote_ok(host: &SimHost, args: &[&str]) -> String {
    let out = remote(host, args);
    assert!(
        out.status.success(),
        "podman --url {} {args:?}: {}",
        host.url(),
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `GET /_ping` over a connected stream: the whole answer.
fn ping(mut stream: impl Read + Write) -> String {
    stream
        .write_all(b"GET /v4.0.0/libpod/_ping HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n")
        .expect("sending a request");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("reading the answer");
    answer
}

fn tcp_ping(addr: IpAddr, port: u16) -> std::io::Result<String> {
    let s = TcpStream::connect_timeout(&SocketAddr::new(addr, port), Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(ping(s))
}

/// An image of one file, a static busybox, imported on `host` as `localhost/sim-busybox`.
fn import_busybox(host: &SimHost, scratch: &Path) -> &'static str {
    let busybox = Path::new("/bin/busybox");
    assert!(
        busybox.exists(),
        "no /bin/busybox: install busybox-static (tests/run.sh does)"
    );
    let rootfs = scratch.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::copy(busybox, rootfs.join("bin/busybox")).unwrap();
    let tar = scratch.join("busybox.tar");
    let out = Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .output()
        .unwrap();
    assert!(out.status.success(), "tar: {}", text(&out));
    let out = host
        .podman_cli()
        .arg("import")
        .arg(&tar)
        .arg("localhost/sim-busybox")
        .output()
        .unwrap();
    assert!(out.status.success(), "podman import: {}", text(&out));
    "localhost/sim-busybox"
}

fn netns_list() -> String {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn link_exists(name: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// Pids of processes whose command line names `needle`.
fn processes_naming(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.parse::<u32>().is_err() || name == std::process::id().to_string() {
            continue;
        }
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(needle) && !support::gone(&name) {
            found.push(name);
        }
    }
    found
}

/// What is left of a host after drop: its namespace, link, dir, processes.
fn assert_gone(name: &str, veth: &str, dir: &Path) {
    assert!(!netns_list().contains(name), "namespace {name} left: {}", netns_list());
    assert!(!link_exists(veth), "link {veth} left");
    assert!(!dir.exists(), "{} left", dir.display());
    let dir_slash = format!("{}/", dir.display());
    assert!(processes_naming(&dir_slash).is_empty(), "processes of {name} left");
}

#[test]
fn three_hosts_answer_over_their_urls() {
    let started = Instant::now();
    let hosts = SimHost::start_many(3, |n| n == 3);
    let took = started.elapsed();
    eprintln!("3 simulated hosts up in {took:?}");
    assert!(took < Duration::from_secs(10), "starting 3 hosts took {took:?}");

    let ips: std::collections::BTreeSet<IpAddr> = hosts.iter().map(SimHost::ip).collect();
    assert_eq!(ips.len(), 3, "each host has its own address");
    for h in &hosts {
        assert_ne!(h.ip(), h.controller_ip());
        assert!(h.answers(), "{}: {}", h.name(), h.log());
    }

    for h in &hosts[..2] {
        assert_eq!(h.url(), format!("tcp://{}:{PODMAN_PORT}", h.ip()));
        let answer = tcp_ping(h.ip(), PODMAN_PORT).expect("the service answers over TCP");
        assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("OK"), "{answer}");
        // It is this host's service: its storage is the host's own.
        let root = remote_ok(h, &["info", "--format", "{{.Store.GraphRoot}}"]);
        assert_eq!(Path::new(root.trim()), h.dir().join("root"));
        // Nothing but TCP: no socket to hand anyone.
        assert!(!h.socket().exists());
    }

    // The ssh host: its sshd in the namespace, the test key, and only the given host key line.
    let h = &hosts[2];
    let key = h.ssh_key().expect("an ssh host has a key");
    let line = h.known_hosts_line().expect("an ssh host has a host key line");
    assert!(line.starts_with(&format!("{} ssh-ed25519 ", h.ip())), "{line}");
    assert_eq!(h.url(), format!("ssh://root@{}:22{}", h.ip(), h.socket().display()));
    assert!(tcp_ping(h.ip(), PODMAN_PORT).is_err(), "an ssh host serves no TCP");
    let scratch = tempfile::tempdir().unwrap();
    let known = scratch.path().join("known_hosts");
    std::fs::write(&known, format!("{line}\n")).unwrap();
    let empty = scratch.path().join("empty_known_hosts");
    std::fs::write(&empty, "").unwrap();
    let ssh = |known: &Path| {
        let mut c = Command::new("ssh");
        c.args(["-F", "/dev/null", "-i"])
            .arg(key)
            .args([
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=yes",
            ])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", known.display()))
            .stdin(Stdio::null());
        c
    };
    let out = ssh(&empty)
        .arg(format!("root@{}", h.ip()))
        .arg("true")
        .output()
        .unwrap();
    assert!(!out.status.success(), "an unknown host key is refused: {}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Host key verification failed"));

    // The service's socket through the connection, as a podman client over ssh reaches it.
    let local = scratch.path().join("forwarded.sock");
    let mut tunnel = ssh(&known)
        .args(["-N", "-o", "ExitOnForwardFailure=yes", "-L"])
        .arg(format!("{}:{}", local.display(), h.socket().display()))
        .arg(format!("root@{}", h.ip()))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !local.exists() {
        if let Some(status) = tunnel.try_wait().unwrap() {
            let mut err = String::new();
            tunnel.stderr.take().unwrap().read_to_string(&mut err).unwrap();
            panic!("ssh -L exited ({status}): {err}");
        }
        assert!(Instant::now() < deadline, "ssh -L did not forward in 10 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let answer = ping(UnixStream::connect(&local).unwrap());
    let _ = tunnel.kill();
    let _ = tunnel.wait();
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("OK"), "{answer}");

    // podman's own ssh client takes the URL as it is, with the key and the host key line.
    let home = scratch.path().join("home");
    std::fs::create_dir_all(home.join(".ssh")).unwrap();
    std::fs::write(home.join(".ssh/known_hosts"), format!("{line}\n")).unwrap();
    let out = Command::new("podman")
        .arg("--url")
        .arg(h.url())
        .arg("--identity")
        .arg(key)
        .args(["info", "--format", "{{.Store.GraphRoot}}"])
        .env("HOME", &home)
        .env_remove("CONTAINER_HOST")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "podman --url {}: {}", h.url(), text(&out));
    assert_eq!(
        Path::new(String::from_utf8_lossy(&out.stdout).trim()),
        h.dir().join("root")
    );
}

#[test]
fn containers_reach_their_controller_only() {
    let hosts = SimHost::start_many(2, |_| false);
    let (one, two) = (&hosts[0], &hosts[1]);
    let scratch = tempfile::tempdir().unwrap();
    let image = import_busybox(one, scratch.path());

    // The "controller" listens in the root namespace on each host's link address.
    let controller = TcpListener::bind((one.controller_ip(), 0)).unwrap();
    let port = controller.local_addr().unwrap().port();
    let other = TcpListener::bind((two.controller_ip(), 0)).unwrap();
    other.set_nonblocking(true).unwrap();

    // `--network host`: the host's own network; the default (podman's bridge inside the
    // namespace): masqueraded to the host's address. Either way only the controller is there.
    for network in ["host", "bridge"] {
        let controller = controller.try_clone().unwrap();
        let accepted = std::thread::spawn(move || {
            let (conn, peer) = controller.accept().unwrap();
            let mut line = String::new();
            BufReader::new(conn).read_line(&mut line).unwrap();
            (peer.ip(), line)
        });
        // Started by host 1's service, through its URL. `timeout`: a probe that did connect
        // would wait for data (and exit 143, not 1).
        let script = format!(
            "echo hello-from-host-1 | /bin/busybox nc -w 5 {c1} {port} && echo sent; \
             /bin/busybox timeout 5 /bin/busybox nc {h2} {PODMAN_PORT} </dev/null; echo host2=$?; \
             /bin/busybox timeout 5 /bin/busybox nc {c2} {p2} </dev/null; echo controller2=$?",
            c1 = one.controller_ip(),
            h2 = two.ip(),
            c2 = two.controller_ip(),
            p2 = other.local_addr().unwrap().port(),
        );
        let out = remote(
            one,
            &[
                "run",
                "--rm",
                "--network",
                network,
                image,
                "/bin/busybox",
                "sh",
                "-c",
                &script,
            ],
        );
        let what = format!("--network {network}: {}", text(&out));
        assert!(out.status.success(), "{what}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stdout.contains("sent\n"), "{what}");
        let (peer, line) = accepted.join().unwrap();
        assert_eq!(line.trim(), "hello-from-host-1");
        assert_eq!(peer, one.ip(), "the connection comes from host 1's address");
        // Host 2 (its podman, its controller address) is out of reach: there is no route.
        assert!(stdout.contains("host2=1\n"), "{what}");
        assert!(stdout.contains("controller2=1\n"), "{what}");
        assert_eq!(stderr.matches("Network is unreachable").count(), 2, "{what}");
        assert!(other.accept().is_err(), "nothing reached host 2's controller address");
    }
    // Meanwhile host 2's service still answers the root namespace.
    assert!(two.answers());
}

#[test]
fn a_killed_host_leaves_nothing_and_drop_removes_it() {
    let mut host = SimHost::start(1);
    let scratch = tempfile::tempdir().unwrap();
    let image = import_busybox(&host, scratch.path());
    let id = remote_ok(
        &host,
        &["run", "-d", "--network", "host", image, "/bin/busybox", "sleep", "600"],
    );
    // And one with a network namespace of its own: its processes are the host's too.
    let isolated = remote_ok(
        &host,
        &["run", "-d", "--network", "none", image, "/bin/busybox", "sleep", "600"],
    );
    let containers = host.containers();
    assert_eq!(containers.len(), 2, "{containers:?}");
    let before = host.pids();
    for id in [&id, &isolated] {
        let c = containers
            .iter()
            .find(|c| c["Id"].as_str() == Some(id.trim()))
            .unwrap_or_else(|| panic!("no {id} in {containers:?}"));
        assert_eq!(c["State"]["Running"].as_bool(), Some(true), "{c}");
        let sleeper = c["State"]["Pid"].as_u64().unwrap() as u32;
        assert!(before.contains(&sleeper), "{sleeper} not among {before:?}");
    }
    // The service, two conmons and two containers at least.
    assert!(before.len() >= 5, "{before:?}");
    let started: Vec<String> = host
        .events()
        .iter()
        .filter(|e| e["Type"] == "container" && e["Status"] == "start")
        .filter_map(|e| e["ID"].as_str().map(String::from))
        .collect();
    assert_eq!(started, [id.trim(), isolated.trim()]);

    host.kill();
    assert!(!host.answers());
    assert!(tcp_ping(host.ip(), PODMAN_PORT).is_err(), "a dead host's port refuses");
    assert!(host.pids().is_empty(), "{:?}", host.pids());
    for pid in &before {
        assert!(support::gone(&pid.to_string()), "{pid} survived the kill");
    }
    // Its storage can still be inspected (what the dead host had running).
    assert_eq!(host.containers().len(), 2);
    // The link stays until drop: the controller sees a silent host, not a vanished network.
    assert!(link_exists(host.veth()));

    let (name, veth, dir) = (host.name().to_owned(), host.veth().to_owned(), host.dir().to_path_buf());
    assert!(netns_list().contains(&name));
    drop(host);
    assert_gone(&name, &veth, &dir);
}

#[test]
fn a_panicking_test_leaves_no_host() {
    let seen: std::sync::Mutex<Option<(String, String, PathBuf)>> = std::sync::Mutex::new(None);
    let result = std::panic::catch_unwind(|| {
        let host = SimHost::start_with_ssh(1);
        *seen.lock().unwrap() = Some((host.name().to_owned(), host.veth().to_owned(), host.dir().to_path_buf()));
        assert!(host.answers());
        panic!("a failing test with a live host");
    });
    assert!(result.is_err());
    let (name, veth, dir) = seen.lock().unwrap().take().expect("the host started");
    assert_gone(&name, &veth, &dir);
}
