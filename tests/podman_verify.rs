//! The verify gate under `--runtime podman`, against a real disposable podman service: the
//! verify command runs in a container of the task image (not on the host), a failure goes back
//! to the agent, and a `[verify] caches` entry is a podman named volume that outlives the
//! containers and the run. Needs podman + runc: `bash fixtures/podman-service.sh install`.

#[path = "support/podman.rs"]
mod podman_support;
mod support;

use podman_support::PodmanService;
use support::*;

#[test]
fn verify_runs_in_a_container_with_a_named_volume_cache() {
    let service = PodmanService::start();
    let s = Scratch::new();
    // The project's check, committed in the repository: every value-*.txt must say ok. It
    // records where it ran, and counts its runs in the cache.
    s.write(
        "check.sh",
        "mkdir -p target && echo run >> target/runs && cat /proc/sys/kernel/hostname >> target/hosts\n\
         echo \"runs with this cache: $(wc -l < target/runs)\"\n\
         for f in value-*.txt; do [ -e \"$f\" ] || continue; \
         [ \"$(cat \"$f\")\" = ok ] || { echo \"$f is broken\"; exit 1; }; done\n",
    );
    s.git(&["add", "check.sh"]);
    s.git(&["commit", "-q", "-m", "check"]);
    let out = s
        .cohort()
        .env("CONTAINER_HOST", service.container_host())
        .args(["image", "build"])
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "image build: {}", text(&out));

    let config = s.request("c.toml", "[verify]\ncaches = [\"target\"]\n");
    let req = s.request("req.md", "- first\n- second\n");
    // Broken at first; fixed once told (the feedback file is in the attempt's directory,
    // mounted into the container).
    let agent = "sh -c 'if [ -n \"$COHORT_FEEDBACK_FILE\" ] && grep -q broken \"$COHORT_FEEDBACK_FILE\"; \
                 then echo ok > value-$COHORT_TASK_ID.txt; else echo no > value-$COHORT_TASK_ID.txt; fi'";
    let out = s
        .cohort()
        .env("CONTAINER_HOST", service.container_host())
        .args([
            "--config",
            config.to_str().unwrap(),
            "run",
            "--no-sync",
            "-j",
            "1",
            "--runtime",
            "podman",
        ])
        .args([
            "--agent",
            "command",
            "--agent-command",
            agent,
            "--verify",
            "sh check.sh",
        ])
        .arg(&req)
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert_eq!(s.merged_tasks("cohort/service").len(), 2, "{}", text(&out));
    let r = s.status_json();
    for t in r["tasks"].as_array().unwrap() {
        let v = t["verifies"].as_array().unwrap();
        assert_eq!(v[0]["passed"], false, "{t}");
        assert!(v[0]["failure"].as_str().unwrap().contains("is broken"), "{t}");
        assert!(v.iter().any(|v| v["passed"] == true), "{t}");
    }
    // The cache is a named volume, labelled, kept after the run.
    let volumes = service
        .cli()
        .args([
            "volume",
            "ls",
            "--filter",
            "label=cohort=cache",
            "--format",
            "{{.Name}} {{.Mountpoint}}",
        ])
        .output()
        .unwrap();
    let volumes = String::from_utf8_lossy(&volumes.stdout).into_owned();
    let lines: Vec<&str> = volumes.lines().collect();
    assert_eq!(lines.len(), 1, "one slot, one cache (-j 1): {volumes}");
    let (name, mountpoint) = lines[0].split_once(' ').unwrap();
    assert!(name.starts_with("cohort-cache-"), "{name}");
    let mountpoint = std::path::Path::new(mountpoint);
    // Every verify run (task and merge) found the runs of the ones before it.
    let runs = std::fs::read_to_string(mountpoint.join("runs")).unwrap();
    let verified: usize = r["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            t["verifies"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|v| v["failure"].is_string() || v["passed"] == true)
                .count()
        })
        .sum();
    assert_eq!(runs.lines().count(), verified, "{runs}");
    // In containers, not on the host; and nothing of the cache in the user's tree.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let hosts = std::fs::read_to_string(mountpoint.join("hosts")).unwrap();
    assert!(
        !hosts.lines().any(|h| h == host.trim()),
        "a verify ran on the host: {hosts}"
    );
    assert!(!s.work.join("target/runs").exists());
    assert_eq!(s.git(&["status", "--porcelain"]), "");
    // No container is left, the volume is.
    let left = service.cli().args(["ps", "-a", "-q"]).output().unwrap();
    assert!(
        left.stdout.is_empty(),
        "containers left: {}",
        String::from_utf8_lossy(&left.stdout)
    );
    let rm = service.cli().args(["volume", "rm", name]).output().unwrap();
    assert!(rm.status.success(), "{}", text(&rm));
}
