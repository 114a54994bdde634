//! A run on three simulated podman hosts (`support::netns::SimHost`: each its own network
//! namespace with a veth, its own podman service and storage; two over TCP, one behind sshd
//! and named through podman's connection store): 24 tasks spread over all three, no worker
//! container with a bind mount, every task merged once; then a run during which one host
//! dies, whose tasks finish on the others. Needs root (CI is root).

#[path = "support/podman.rs"]
mod podman_support;
mod support;

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use podman_support::PodmanService;
use support::netns::SimHost;
use support::*;

/// The agent the workers run: in the image there is a shell, sleep and printf.
const AGENT: &str = "sh -c 'sleep 2; printf \"%s\\n\" \"$COHORT_TASK\" > task-$COHORT_TASK_ID.txt'";

/// `cohort image build` into the tests' image store (where runs look for the workers' image).
fn build_image(s: &Scratch) {
    let service = PodmanService::start();
    let out = s
        .cohort()
        .env("CONTAINER_HOST", service.container_host())
        .args(["image", "build"])
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "image build: {}", text(&out));
}

/// podman's own connection store, naming the ssh host `sim-ssh` with the test key.
fn connection_store(s: &Scratch, host: &SimHost) {
    let dir = s.tmp.path().join(".config/containers");
    std::fs::create_dir_all(&dir).unwrap();
    let store = serde_json::json!({"Connection": {"Default": "sim-ssh", "Connections": {
        "sim-ssh": {"URI": host.url(), "Identity": host.ssh_key().unwrap(), "IsMachine": false}}}});
    std::fs::write(dir.join("podman-connections.json"), store.to_string()).unwrap();
}

#[allow(clippy::zombie_processes)]
fn start_run(s: &Scratch, hosts: &[SimHost], tasks: usize, name: &str) -> Child {
    let req = s.request(&format!("{name}.md"), &tasks_doc(tasks).replace("task number", name));
    let mut args: Vec<String> = vec![
        "run".into(),
        req.display().to_string(),
        "--agent".into(),
        "command".into(),
        "--agent-command".into(),
        AGENT.into(),
        "--worker-timeout".into(),
        "5s".into(),
    ];
    for h in hosts {
        let target = match h.ssh_key() {
            Some(_) => "sim-ssh".to_string(),
            None => h.url(),
        };
        args.extend(["--host".into(), format!("{target}=4")]);
    }
    let ssh = hosts.iter().find(|h| h.ssh_key().is_some()).unwrap();
    let log = std::fs::File::create(s.tmp.path().join(format!("{name}.log"))).unwrap();
    s.cohort()
        .args(&args)
        .env("COHORT_KNOWN_HOSTS", ssh.known_hosts().unwrap())
        .env_remove("SSH_AUTH_SOCK")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn run_log(s: &Scratch, name: &str) -> String {
    std::fs::read_to_string(s.tmp.path().join(format!("{name}.log"))).unwrap_or_default()
}

/// Waits for the run, collecting every worker container's inspect record on the way.
fn watch(run: &mut Child, hosts: &[SimHost], seen: &mut Vec<serde_json::Value>, mut during: impl FnMut()) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Some(st) = run.try_wait().unwrap() {
            return st.code().unwrap_or(-1);
        }
        assert!(Instant::now() < deadline, "the run did not end");
        for h in hosts {
            if h.answers() {
                seen.extend(h.containers());
            }
        }
        during();
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Which worker (`host/n`) each task ran on last, from `report --json`.
fn placements(s: &Scratch) -> Vec<(String, String)> {
    let report = s.status_json();
    report["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            assert_eq!(t["status"], "merged", "{t}");
            (
                t["text"].as_str().unwrap().to_string(),
                t["worker"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn no_controller_binds(seen: &[serde_json::Value], controller: &Path) {
    assert!(!seen.is_empty(), "no worker container was ever seen");
    let controller = controller.display().to_string();
    for c in seen {
        assert_eq!(c["Config"]["Labels"]["cohort"], "worker", "{c}");
        for m in c["Mounts"].as_array().into_iter().flatten() {
            let src = m["Source"].as_str().unwrap_or("");
            assert!(
                m["Type"] != "bind" || !src.starts_with(&controller),
                "a worker container mounts a controller path: {m}"
            );
        }
        let binds = &c["HostConfig"]["Binds"];
        assert!(
            binds.is_null() || binds.as_array().is_some_and(|b| b.is_empty()),
            "{binds}"
        );
    }
}

#[test]
fn tasks_spread_over_three_hosts_and_survive_one_dying() {
    let s = Scratch::new();
    build_image(&s);
    let mut hosts = SimHost::start_many(3, |n| n == 3);
    connection_store(&s, &hosts[2]);

    // 24 tasks on 3 hosts of 4 slots.
    let mut run = start_run(&s, &hosts, 24, "first");
    let mut seen = Vec::new();
    let code = watch(&mut run, &hosts, &mut seen, || {});
    assert_eq!(code, 0, "{}", run_log(&s, "first"));
    no_controller_binds(&seen, s.tmp.path());
    let placed = placements(&s);
    assert_eq!(placed.len(), 24);
    let used: std::collections::BTreeSet<&str> = placed.iter().map(|(_, w)| w.split('/').next().unwrap()).collect();
    assert_eq!(used.len(), 3, "tasks ran on {used:?}");
    assert!(used.contains("sim-ssh"), "{used:?}");
    let mut merged = s.merged_tasks("cohort/service");
    merged.sort();
    merged.dedup();
    assert_eq!(merged.len(), 24);
    s.fsck();
    // The run's workers and their token secrets are gone from every host.
    for h in &hosts {
        assert!(h.containers().is_empty(), "{}", h.name());
    }

    // A second run; host 1 dies once it has work.
    let mut run = start_run(&s, &hosts, 24, "second");
    let mut killed = false;
    let victim = hosts[0]
        .url()
        .trim_start_matches("tcp://")
        .split(':')
        .next()
        .unwrap()
        .to_string();
    let mut seen = Vec::new();
    let (first, rest) = hosts.split_at_mut(1);
    let code = watch(&mut run, rest, &mut seen, || {
        if !killed && first[0].containers().iter().any(|c| c["State"]["Running"] == true) {
            std::thread::sleep(Duration::from_secs(1));
            first[0].kill();
            killed = true;
        }
    });
    assert!(killed, "host 1 never ran a worker");
    assert_eq!(code, 0, "{}", run_log(&s, "second"));
    assert_eq!(placements(&s).len(), 24);
    // What host 1 held when it died went back to the queue and finished elsewhere.
    let runs = s.work.join(".git/cohort/runs");
    let mut lost = 0;
    for dir in std::fs::read_dir(&runs).unwrap().flatten() {
        for log in files_under(&dir.path().join("logs")) {
            let text = std::fs::read_to_string(&log).unwrap();
            if text.contains("went silent") {
                lost += 1;
                let last = text.lines().rev().find_map(|l| l.strip_prefix("on| ")).unwrap();
                assert!(!last.starts_with(&victim), "{}: {text}", log.display());
            }
        }
    }
    assert!(lost > 0, "no task was in flight on host 1 when it died");
    let merged = s.merged_tasks("cohort/service");
    let second: Vec<_> = merged.iter().filter(|m| m.contains("second")).collect();
    assert_eq!(second.len(), 24, "{second:?}");
    let mut unique = second.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 24, "a task merged twice");
    s.fsck();
}
