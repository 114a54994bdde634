//! The real codex in task containers with the default network (`none`), against a disposable
//! podman service, rootful and rootless: it reaches the model only through cohort's gateway
//! (the socket mounted in, `cohort __bridge` on the container's loopback) and holds no key;
//! it reaches an allow-listed host through the gateway's proxy and nothing else, and each
//! refusal is in the task's log. The key is looked for in `podman inspect` of every
//! container, in `/proc/*/environ` inside one, and in everything under the git dir (codex's
//! home, the logs, the state DB). Needs podman + runc: `bash fixtures/podman-service.sh install`.

#[path = "support/podman.rs"]
mod podman_support;
mod support;

use std::io::{Read, Write};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};

use cohort_standin::{Options, Standin};
use podman_support::{PodmanService, ROOTLESS_USER};
use support::*;

const KEY: &str = "sk-cohort-test-key-gateway-podman-0f1e2d3c4b5a";

/// A one-line HTTP server on `addr` answering every request with `body`, for the allowed host.
fn tiny_server(addr: &str, body: &'static str) -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind(addr).unwrap();
    let local = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    local
}

/// Every container the service knows, as `podman inspect` JSON text.
fn inspect_all(service: &PodmanService) -> Vec<String> {
    let ids = service.cli().args(["ps", "-a", "-q", "--no-trunc"]).output().unwrap();
    String::from_utf8_lossy(&ids.stdout)
        .split_whitespace()
        .filter_map(|id| {
            let out = service.cli().args(["inspect", id]).output().ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        })
        .collect()
}

fn cohort_as(s: &Scratch, service: &PodmanService, user: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = match user {
        None => s.cohort(),
        Some(u) => cohort_as_user(s, u, &service.dir().join("home"), &service.dir().join("xdg")),
    };
    cmd.env("CONTAINER_HOST", service.container_host())
        .env("OPENAI_API_KEY", KEY)
        .args(args);
    cmd.output().unwrap()
}

fn through_the_gateway(service: &PodmanService, user: Option<&str>) {
    let standin = Standin::start(Options::default()).unwrap();
    let allowed = tiny_server("127.0.0.2:0", "allowed-host-answer");
    let s = Scratch::new();
    // Settings of the user's own (trusted), outside the repository: codex, the allow-list,
    // and curl in the image for the egress probes.
    let mut programs: Vec<String> = cohort_oci::default_programs()
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    programs.push("/usr/bin/curl".into());
    let settings = format!(
        "[agent]\nkind = \"codex\"\nmodel = \"gpt-5-codex\"\ncodex_path = {:?}\n\n\
         [container]\nallow = [\"{allowed}\"]\n\n[image]\nprograms = {programs:?}\n",
        codex()
    );
    let dir = s.tmp.path().join(".config/cohort");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.toml"), settings).unwrap();
    if let Some(u) = user {
        let ok = Command::new("chown")
            .arg("-R")
            .arg(u)
            .arg(s.tmp.path())
            .status()
            .unwrap();
        assert!(ok.success());
    }
    let out = cohort_as(&s, service, user, &["image", "build"]);
    assert_eq!(code(&out), 0, "image build: {}", text(&out));

    let req = s.request(
        "req.md",
        &format!(
            "- add a greeting file\n\
             - STANDIN-CMD: curl -sS http://{allowed}/ > allowed.txt; curl -sS -o /dev/null -w '%{{http_code}}' \
               http://127.0.0.3:9/ > refused.txt; true\n\
             - STANDIN-CMD: cat /proc/[0-9]*/environ | tr '\\0' '\\n' | sort -u > environ.txt\n"
        ),
    );
    let req = req.display().to_string();
    let done = AtomicBool::new(false);
    let (out, seen) = std::thread::scope(|scope| {
        let watcher = scope.spawn(|| {
            let mut seen = Vec::new();
            while !done.load(Ordering::Relaxed) {
                seen.extend(inspect_all(service));
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            seen
        });
        let base = standin.base_url();
        let out = cohort_as(
            &s,
            service,
            user,
            &["run", "-j", "2", "--runtime", "podman", "--base-url", &base, &req],
        );
        done.store(true, Ordering::Relaxed);
        (out, watcher.join().unwrap())
    });
    if user.is_some() {
        let ok = Command::new("chown")
            .arg("-R")
            .arg("root")
            .arg(s.tmp.path())
            .status()
            .unwrap();
        assert!(ok.success());
    }
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert_eq!(s.merged_tasks("cohort/service").len(), 3, "{}", text(&out));

    // The endpoint saw the key from the gateway only; codex's requests carried a token.
    let records = standin.records();
    assert!(records.iter().any(|r| r["path"] == "/v1/responses"));
    for r in &records {
        assert_eq!(r["headers"]["authorization"], format!("Bearer {KEY}"), "{r}");
    }
    // Inside: the environment of every process of the container holds a token, not the key.
    let environ = s.git(&["show", "cohort/service:environ.txt"]);
    assert!(environ.contains("COHORT_CODEX_KEY=cohort-"), "{environ}");
    assert!(
        environ.contains("OPENAI_BASE_URL=http://127.0.0.1:8080/v1"),
        "{environ}"
    );
    assert!(
        !environ.contains(KEY),
        "the key is in a container process's environment"
    );
    for json in &seen {
        assert!(!json.contains(KEY), "the key is in podman inspect");
        if json.contains("\"cohort.run\"") {
            let v: serde_json::Value = serde_json::from_str(json).unwrap();
            assert_eq!(v[0]["HostConfig"]["NetworkMode"], "none", "{json}");
        }
    }
    for f in files_under(&s.work.join(".git")) {
        let bytes = std::fs::read(&f).unwrap();
        assert!(
            !bytes.windows(KEY.len()).any(|w| w == KEY.as_bytes()),
            "key in {}",
            f.display()
        );
    }
    // Egress: the allow-listed host answered through the proxy; another was refused, and the
    // refusal is in the task's log with host and port.
    assert_eq!(s.git(&["show", "cohort/service:allowed.txt"]), "allowed-host-answer");
    assert_eq!(s.git(&["show", "cohort/service:refused.txt"]), "403");
    let log = String::from_utf8(s.run(&["logs", "2"]).stdout).unwrap();
    assert!(log.contains("egress refused: 127.0.0.3:9"), "{log}");
    let report = s.status_json();
    assert!(
        report["tasks"][1]["gateway"]["refused"].as_u64().unwrap() >= 1,
        "{report}"
    );
    assert_eq!(report["spend"]["output"], 3 * 75, "{report}");
}

#[test]
fn codex_in_rootful_containers_through_the_gateway() {
    let service = PodmanService::start();
    through_the_gateway(&service, None);
}

#[test]
fn codex_in_rootless_containers_through_the_gateway() {
    let service = PodmanService::start_rootless(ROOTLESS_USER);
    through_the_gateway(&service, Some(ROOTLESS_USER));
}
