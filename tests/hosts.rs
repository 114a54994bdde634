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
        let left = h.containers_left_after(Duration::from_secs(60));
        assert!(left.is_empty(), "{}: {left:?}", h.name());
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
    // Host 1 dies once the controller has handed it a task of this run.
    let on_victim = |s: &Scratch| -> usize {
        let runs = s.work.join(".git/cohort/runs");
        files_under(&runs)
            .iter()
            .filter(|f| f.extension().is_some_and(|e| e == "log"))
            .map(|f| {
                let text = std::fs::read_to_string(f).unwrap_or_default();
                text.lines()
                    .filter(|l| l.starts_with(&format!("on| {victim}/")))
                    .count()
            })
            .sum()
    };
    let before = on_victim(&s);
    let code = watch(&mut run, rest, &mut seen, || {
        if !killed && on_victim(&s) > before {
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

/// The worker container `cohort k8s manifests` describes, run as the Job's pod would run it
/// (its command, its token from the Secret, its user, a read-only root with its scratch
/// volumes) on podman, takes the run's tasks from the controller.
#[test]
fn the_kubernetes_jobs_worker_container_serves_a_run_on_podman() {
    use k8s_openapi::api::batch::v1::Job;
    use k8s_openapi::api::core::v1::Secret;
    use serde::Deserialize;
    let s = Scratch::new();
    let service = PodmanService::start();
    let out = s
        .cohort()
        .env("CONTAINER_HOST", service.container_host())
        .args(["image", "build"])
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "image build: {}", text(&out));
    let req = s.request("k8s.md", &tasks_doc(2));
    let log = std::fs::File::create(s.tmp.path().join("k8s.log")).unwrap();
    let mut run = s
        .cohort()
        .args([
            "run",
            req.to_str().unwrap(),
            "--agent",
            "command",
            "--agent-command",
            AGENT,
        ])
        .args(["--listen", "127.0.0.1:0"])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let runs = s.work.join(".git/cohort/runs");
    let deadline = Instant::now() + Duration::from_secs(60);
    let run_dir = loop {
        let found = std::fs::read_dir(&runs)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.join("worker-token").exists());
        if let Some(d) = found {
            break d;
        }
        if Instant::now() > deadline {
            let _ = run.kill();
            let _ = run.wait();
            panic!("the controller never opened its run: {}", run_log(&s, "k8s"));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let run_id = run_dir.file_name().unwrap().to_str().unwrap().to_string();
    let out = s
        .cohort()
        .args(["k8s", "manifests", "--run", &run_id, "--parallelism", "1"])
        .args(["--image", "localhost/cohort:latest"])
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", text(&out));
    let yaml = String::from_utf8(out.stdout).unwrap();
    let (mut job, mut secret) = (None, None);
    for doc in serde_norway::Deserializer::from_str(&yaml) {
        let v = serde_norway::Value::deserialize(doc).unwrap();
        match v["kind"].as_str() {
            Some("Job") => job = Some(serde_norway::from_value::<Job>(v).unwrap()),
            Some("Secret") => secret = Some(serde_norway::from_value::<Secret>(v).unwrap()),
            _ => {}
        }
    }
    let (job, secret) = (job.unwrap(), secret.unwrap());
    let pod = job.spec.unwrap().template.spec.unwrap();
    let c = &pod.containers[0];
    // The token the pod gets: the Secret's key its env names.
    let env = c.env.as_ref().unwrap();
    let from = env[0].value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap();
    let token = secret
        .string_data
        .as_ref()
        .and_then(|d| d.get(&from.key).cloned())
        .unwrap_or_else(|| String::from_utf8(secret.data.as_ref().unwrap()[&from.key].0.clone()).unwrap());
    let sc = c.security_context.as_ref().unwrap();
    let user = format!("{}:{}", sc.run_as_user.unwrap_or(1000), sc.run_as_group.unwrap_or(1000));
    let mut podman = service.cli();
    podman
        .args(["run", "--rm", "--network", "host", "--user", &user, "--read-only"])
        .args(["-e", &env[0].name]) // the value comes from this process's environment
        .env(&env[0].name, token.trim());
    for m in c.volume_mounts.iter().flatten() {
        // An emptyDir: empty, writable by the pod's user (podman 4.3 ignores tmpfs-mode;
        // U=true makes the tmpfs the container user's).
        podman.args(["--mount", &format!("type=tmpfs,destination={},U=true", m.mount_path)]);
    }
    podman.arg(c.image.as_deref().unwrap());
    podman.args(c.command.iter().flatten()).args(c.args.iter().flatten());
    let worker = podman.output().unwrap();
    assert!(worker.status.success(), "the Job's worker: {}", text(&worker));
    let status = run.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{}", run_log(&s, "k8s"));
    assert_eq!(s.merged_tasks("cohort/service").len(), 2);
    assert!(text(&worker).contains("the run is over"), "{}", text(&worker));
    s.fsck();
}

/// Starts a run of `tasks` on `host` (one slot), stops it with Ctrl-C once its first task
/// merged, and returns its exit code.
fn interrupted_run(s: &Scratch, host: &SimHost, tasks: usize, name: &str) -> i32 {
    let req = s.request(&format!("{name}.md"), &tasks_doc(tasks).replace("task number", name));
    let log = std::fs::File::create(s.tmp.path().join(format!("{name}.log"))).unwrap();
    let mut run = s
        .cohort()
        .args([
            "run",
            req.to_str().unwrap(),
            "--agent",
            "command",
            "--agent-command",
            AGENT,
        ])
        .args(["--host", &format!("{}=1", host.url())])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    while !run_log(s, name).contains("task 001 merged") {
        assert!(
            run.try_wait().unwrap().is_none(),
            "the run ended early: {}",
            run_log(s, name)
        );
        assert!(Instant::now() < deadline, "task 1 never merged: {}", run_log(s, name));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(unsafe { libc::kill(run.id() as i32, libc::SIGINT) }, 0);
    run.wait().unwrap().code().unwrap_or(-1)
}

/// A run started with `--host` and interrupted is resumed on the same host without naming it
/// again; `--runtime` given to `resume` runs what is left here instead.
#[test]
fn a_resumed_run_keeps_its_hosts_unless_a_runtime_is_given() {
    let s = Scratch::new();
    build_image(&s);
    let hosts = SimHost::start_many(1, |_| false);
    let host = &hosts[0];

    assert_eq!(interrupted_run(&s, host, 3, "kept"), 130, "{}", run_log(&s, "kept"));
    let out = s.cohort().args(["resume"]).output().unwrap();
    assert_eq!(code(&out), 0, "resume: {}", text(&out));
    let placed = placements(&s);
    assert_eq!(placed.len(), 3);
    let workers: std::collections::BTreeSet<&str> = placed.iter().map(|(_, w)| w.as_str()).collect();
    assert_eq!(workers.len(), 1, "every task ran on the host's one worker: {placed:?}");
    assert!(
        !placed[2].1.is_empty(),
        "task 3, started by resume, ran on the worker: {placed:?}"
    );
    let left = host.containers_left_after(Duration::from_secs(60));
    assert!(left.is_empty(), "the resumed run left workers: {left:?}");

    assert_eq!(interrupted_run(&s, host, 3, "here"), 130, "{}", run_log(&s, "here"));
    let out = s.cohort().args(["resume", "--runtime", "host"]).output().unwrap();
    assert_eq!(code(&out), 0, "resume --runtime host: {}", text(&out));
    let placed = placements(&s);
    assert!(!placed[0].1.is_empty(), "task 1 ran on the host's worker: {placed:?}");
    // Task 3 had not started when the run stopped: it ran here, on no worker.
    assert!(placed[2].1.is_empty(), "task 3 ran here, not on a worker: {placed:?}");
    s.fsck();
}
