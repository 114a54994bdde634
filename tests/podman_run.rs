//! `--runtime podman` end to end against a real disposable podman service (no mocks):
//! `cohort image build` (twice: same digest), `cohort run` with every task in its own
//! container, the API key nowhere in containers, image or state DB, containers removed
//! afterwards, the default runtime choice, and `cohort container run` / `enter` (piped and
//! through a pty). Needs podman + runc: `bash fixtures/podman-service.sh install`.

#[path = "support/podman.rs"]
mod podman_support;
mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

use podman_support::PodmanService;
use support::*;

const KEY: &str = "sk-cohort-test-KEY-9f8e7d6c5b4a";

fn cli_out(service: &PodmanService, args: &[&str]) -> String {
    let out = service.cli().args(args).output().unwrap();
    assert!(out.status.success(), "podman {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every container the service knows, as `podman inspect` JSON text.
fn inspect_all(service: &PodmanService) -> Vec<(String, String)> {
    let ids = cli_out(service, &["ps", "-a", "-q", "--no-trunc"]);
    ids.split_whitespace()
        .filter_map(|id| {
            let out = service.cli().args(["inspect", id]).output().ok()?;
            out.status
                .success()
                .then(|| (id.to_string(), String::from_utf8_lossy(&out.stdout).into_owned()))
        })
        .collect()
}

/// Unpacks an oci-archive into `dir`, with every gzip layer also decompressed next to its blob
/// (tar + gzip CLIs, test side only), so `grep -r` sees every byte of every layer.
fn unpack_archive(archive: &Path, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let st = Command::new("tar")
        .arg("-xf")
        .arg(archive)
        .arg("-C")
        .arg(dir)
        .status()
        .unwrap();
    assert!(st.success());
    for e in std::fs::read_dir(dir.join("blobs/sha256")).unwrap() {
        let p = e.unwrap().path();
        let gz = Command::new("gzip").arg("-dc").arg(&p).output().unwrap();
        if gz.status.success() {
            std::fs::write(p.with_extension("raw"), gz.stdout).unwrap();
        }
    }
}

/// `grep -r -a -F` for a fixed string anywhere under `dir`.
fn found_in(dir: &Path, needle: &str) -> bool {
    let st = Command::new("grep")
        .args(["-r", "-q", "-a", "-F", needle])
        .arg(dir)
        .status()
        .unwrap();
    assert!(st.code() == Some(0) || st.code() == Some(1), "grep failed");
    st.success()
}

fn build(s: &Scratch, service: &PodmanService, archive: &Path) -> String {
    let out = s
        .cohort()
        .env("CONTAINER_HOST", service.container_host())
        .env("OPENAI_API_KEY", KEY)
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .args(["image", "build", "--archive"])
        .arg(archive)
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "image build: {}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("digest "))
        .unwrap_or_else(|| panic!("no digest: {}", text(&out)))
        .to_string()
}

/// What a task container mounts: its checkout at /workspace, its private git dir and its
/// attempt's directory, the object store read-only, and the gateway's socket; nothing else of
/// the git dir.
fn check_task_mounts(s: &Scratch, seen: &[(String, String)]) {
    let git_dir = s.work.join(".git").canonicalize().unwrap().display().to_string();
    for (id, json) in seen.iter().filter(|(_, j)| j.contains("\"cohort.run\"")) {
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        for m in v[0]["Mounts"].as_array().unwrap() {
            let dst = m["Destination"].as_str().unwrap();
            let rw = m["RW"].as_bool().unwrap();
            let src = m["Source"].as_str().unwrap_or("");
            // Engine mounts (/sys with network = "host", ...) are not the repository's.
            let of_repo = dst == "/workspace" || dst.starts_with(&git_dir) || src.starts_with(&git_dir);
            let ok = !of_repo
                || dst == "/workspace"
                || dst == "/run/cohort/gateway.sock"
                || (dst == format!("{git_dir}/objects") && !rw)
                || (dst.starts_with(&format!("{git_dir}/cohort/runs/"))
                    && (dst.contains("/gitdirs/") || dst.contains("/attempts/")));
            assert!(ok, "task container {id} mounts {dst} (rw {rw})");
        }
    }
}

fn with_stdin(mut cmd: Command, input: &str) -> Output {
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn image_build_run_in_containers_and_dev_container() {
    let service = PodmanService::start();
    let s = Scratch::new();
    s.write(
        "cohort.toml",
        "[image]\ninclude = [\"*.md\", \"*.log\"]\n\n[container]\nnetwork = \"none\"\nmemory = \"1g\"\npids = 512\n\
         startup = [\"echo started > /workspace/startup.txt\"]\n",
    );
    s.git(&["add", "cohort.toml"]);
    s.git(&["commit", "-q", "-m", "cohort.toml"]);
    s.git(&["push", "-q"]);
    // `[container] network` is a sensitive setting: honoured once the file is trusted.
    let out = s.run(&["trust"]);
    assert_eq!(code(&out), 0, "trust: {}", text(&out));
    // Ignored (never tracked): must not reach the image even though `*.log` is included.
    s.write("secret.log", &format!("OPENAI_API_KEY={KEY}\n"));

    // --- image build, twice: one digest, byte-identical archives, no key inside.
    let a1 = s.tmp.path().join("a1.tar");
    let a2 = s.tmp.path().join("a2.tar");
    let d1 = build(&s, &service, &a1);
    let d2 = build(&s, &service, &a2);
    assert_eq!(d1, d2, "two builds, one digest");
    assert_eq!(std::fs::read(&a1).unwrap(), std::fs::read(&a2).unwrap());
    let unpacked = s.tmp.path().join("a1");
    unpack_archive(&a1, &unpacked);
    assert!(
        found_in(&unpacked, "opt/cohort/repo/README.md"),
        "included repository file"
    );
    assert!(found_in(&unpacked, "# scratch"), "its content");
    assert!(!found_in(&unpacked, "secret.log"), "ignored file in the image");
    assert!(!found_in(&unpacked, KEY), "the API key is in the image");
    let head = s.git(&["rev-parse", "HEAD"]);
    let labels = cli_out(
        &service,
        &[
            "image",
            "inspect",
            "--format",
            "{{json .Labels}}",
            "localhost/cohort:latest",
        ],
    );
    assert!(labels.contains(head.trim()), "source commit label: {labels}");

    // --- a run: every task in its own container, watched from outside while it runs.
    let req = s.request("req.md", "- first task\n- second task\n- third task\n");
    let agent = "sh -c 'cat /proc/sys/kernel/hostname > out-$COHORT_TASK_ID.txt; \
                 tr \"\\0\" \" \" < /proc/1/cmdline >> out-$COHORT_TASK_ID.txt; echo >> out-$COHORT_TASK_ID.txt; \
                 test -f /opt/cohort/repo/README.md && echo image-ok >> out-$COHORT_TASK_ID.txt; \
                 id -u >> out-$COHORT_TASK_ID.txt; head -n1 /proc/self/uid_map | tr -s \" \" >> out-$COHORT_TASK_ID.txt; \
                 ls /sys/class/net >> out-$COHORT_TASK_ID.txt; \
                 touch \"$(dirname $COHORT_PROMPT_FILE)/agent-$COHORT_TASK_ID\"; sleep 2'";
    let done = AtomicBool::new(false);
    let (out, seen) = std::thread::scope(|scope| {
        let watcher = scope.spawn(|| {
            let mut seen = Vec::new();
            while !done.load(Ordering::Relaxed) {
                seen.extend(inspect_all(&service));
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            seen
        });
        let out = s
            .cohort()
            .env("CONTAINER_HOST", service.container_host())
            .env("OPENAI_API_KEY", KEY)
            .args([
                "run",
                "-j",
                "2",
                "--runtime",
                "podman",
                "--agent",
                "command",
                "--agent-command",
                agent,
            ])
            .arg(&req)
            .output()
            .unwrap();
        done.store(true, Ordering::Relaxed);
        (out, watcher.join().unwrap())
    });
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert_eq!(s.merged_tasks("cohort/service").len(), 3, "{}", text(&out));

    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let mut hostnames = BTreeSet::new();
    for i in 1..=3 {
        let file = s.git(&["show", &format!("cohort/service:out-00{i}.txt")]);
        let lines: Vec<&str> = file.lines().collect();
        assert_ne!(lines[0], host.trim(), "task {i} ran on the host: {file}");
        // The agent runs under the container's main process, the gateway's bridge, which
        // listens first and ends with it (no exec session beside a keeper).
        assert!(
            lines[1].starts_with("cohort __bridge --listen 127.0.0.1:8080 --socket /run/cohort/gateway.sock -- sh -c cat /proc/sys/kernel/hostname"),
            "PID 1 is the bridge running the agent: {file}"
        );
        assert_eq!(lines[2], "image-ok", "{file}");
        // Rootful engine: userns=auto, the agent is the image user (1000) in its own unprivileged
        // id range, and writes the checkout through an idmapped view (the commit has its file).
        assert_eq!(lines[3], "1000", "{file}");
        let map: Vec<&str> = lines[4].split_whitespace().collect();
        assert!(map[0] == "0" && map[1] != "0", "not an auto range: {file}");
        assert_eq!(lines[5..].to_vec(), vec!["lo"], "network none: {file}");
        use std::os::unix::fs::MetadataExt;
        let written = files_under(&s.work.join(".git/cohort/runs"))
            .into_iter()
            .find(|p| p.ends_with(format!("attempts/00{i}-1/agent-00{i}")))
            .unwrap_or_else(|| panic!("task {i} wrote nothing into its attempt directory"));
        let written = std::fs::metadata(written).unwrap();
        let owner = std::fs::metadata(s.work.join(".git")).unwrap();
        assert_eq!(
            (written.uid(), written.gid()),
            (owner.uid(), owner.gid()),
            "written as the repository's owner"
        );
        hostnames.insert(lines[0].to_string());
    }
    assert_eq!(hostnames.len(), 3, "one container per task: {hostnames:?}");

    let task_containers: BTreeSet<&str> = seen
        .iter()
        .filter(|(_, j)| j.contains("\"cohort.run\""))
        .map(|(id, _)| id.as_str())
        .collect();
    assert!(!task_containers.is_empty(), "the watcher saw no task container");
    // No container log: the agent's output reaches cohort's own log through the attach only.
    for (id, json) in seen.iter().filter(|(_, j)| j.contains("\"cohort.run\"")) {
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(v[0]["HostConfig"]["LogConfig"]["Type"], "none", "log driver of {id}");
    }
    for (id, json) in &seen {
        assert!(!json.contains(KEY), "the key is in podman inspect of {id}");
    }
    assert!(
        seen.iter()
            .any(|(_, j)| j.contains("\"/workspace\"") && j.contains("1073741824")),
        "checkout at /workspace and the memory limit"
    );
    check_task_mounts(&s, &seen);
    let left = cli_out(&service, &["ps", "-a", "-q", "--filter", "label=cohort.run"]);
    assert_eq!(left.trim(), "", "task containers left behind");
    for f in ["state.db", "state.db-wal"] {
        let p = s.work.join(".git/cohort").join(f);
        if let Ok(db) = std::fs::read(&p) {
            assert!(
                !db.windows(KEY.len()).any(|w| w == KEY.as_bytes()),
                "the key is in {}",
                p.display()
            );
        }
    }

    // --- the default runtime: podman when a socket is found, else host (said on stderr).
    let req2 = s.request("req2.md", "- nothing to do\n");
    let out = s
        .cohort()
        .env("CONTAINER_HOST", service.container_host())
        .args(["run", "--no-sync", "--agent", "command", "--agent-command", "true"])
        .arg(&req2)
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(text(&out).contains("runtime podman (socket"), "{}", text(&out));
    let empty = tempfile::tempdir().unwrap();
    let out = s
        .cohort()
        .env_remove("CONTAINER_HOST")
        .env("XDG_RUNTIME_DIR", empty.path())
        .args(["run", "--no-sync", "--agent", "command", "--agent-command", "true"])
        .arg(&req2)
        .output()
        .unwrap();
    if !Path::new("/run/podman/podman.sock").exists() {
        assert!(
            text(&out).contains("runtime host (no podman socket found)"),
            "{}",
            text(&out)
        );
    }

    // --- cohort container run / enter.
    let dev = s.tmp.path().join("dev");
    std::fs::create_dir(&dev).unwrap();
    let enter = |name: &str| {
        let mut c = s.cohort();
        c.env("CONTAINER_HOST", service.container_host())
            .args(["container", "enter", "--name", name]);
        c
    };
    let mut run = s.cohort();
    run.env("CONTAINER_HOST", service.container_host())
        .args(["container", "run", "--name", "devbox", "--mount"])
        .arg(&dev);
    let out = with_stdin(
        run,
        "echo made > /workspace/made.txt; cat /proc/sys/kernel/hostname; exit 3\n",
    );
    assert_eq!(code(&out), 3, "exit code passed through: {}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("devbox"),
        "{}",
        text(&out)
    );
    assert_eq!(std::fs::read_to_string(dev.join("made.txt")).unwrap(), "made\n");
    assert_eq!(std::fs::read_to_string(dev.join("startup.txt")).unwrap(), "started\n");
    let mut again = s.cohort();
    again
        .env("CONTAINER_HOST", service.container_host())
        .args(["container", "run", "--name", "devbox"]);
    let out = with_stdin(again, "exit 0\n");
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(text(&out).contains("container enter"), "{}", text(&out));

    // A stopped container is started again and re-entered; the workspace is still there.
    cli_out(&service, &["stop", "-t", "0", "devbox"]);
    let out = with_stdin(enter("devbox"), "cat /workspace/made.txt; exit 6\n");
    assert_eq!(code(&out), 6, "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "made\n", "{}", text(&out));
    let state = cli_out(&service, &["inspect", "--format", "{{.State.Running}}", "devbox"]);
    assert_eq!(state.trim(), "true");

    // No such container: a clear error naming `container run`.
    let out = with_stdin(enter("nope"), "");
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(
        text(&out).contains("cohort container run --name nope"),
        "{}",
        text(&out)
    );

    // The interactive path through a real pty (`script`): TTY, window size, exit code.
    let bin = env!("CARGO_BIN_EXE_cohort");
    let mut script = Command::new("script");
    script
        .args([
            "-qec",
            &format!("stty rows 30 cols 100; {bin} container enter --name devbox"),
            "/dev/null",
        ])
        .current_dir(&s.work)
        .env("CONTAINER_HOST", service.container_host());
    let out = with_stdin(script, "stty size; tty; exit 5\n");
    let screen = String::from_utf8_lossy(&out.stdout);
    assert_eq!(code(&out), 5, "{}", text(&out));
    assert!(
        screen.contains("30 100"),
        "window size reached the container: {screen:?}"
    );
    assert!(screen.contains("/dev/pts/"), "a real TTY: {screen:?}");
}

/// The real codex (pinned static binary, `fixtures/install-codex.sh`) inside per-task
/// containers, against the local OpenAI stand-in (host network to reach it on loopback).
/// In a container the container is the sandbox: codex runs with `--sandbox danger-full-access`
/// (its own sandbox would need bubblewrap, which the image does not have).
#[test]
fn codex_runs_inside_task_containers() {
    use cohort_standin::{Options, Standin};
    let codex = codex();
    let standin = Standin::start(Options::default()).unwrap();
    let service = PodmanService::start();
    let s = Scratch::new();
    let cfg = s.tmp.path().join("cohort.toml");
    std::fs::write(
        &cfg,
        format!(
            "[agent]\nkind = \"codex\"\nmodel = \"gpt-5-codex\"\ncodex_path = {codex:?}\n\n[container]\nnetwork = \"host\"\n"
        ),
    )
    .unwrap();
    let cohort = |args: &[&str]| {
        let mut c = s.cohort();
        c.env("CONTAINER_HOST", service.container_host())
            .env("OPENAI_API_KEY", KEY)
            .arg("--config")
            .arg(&cfg)
            .args(args);
        c
    };
    let out = cohort(&["image", "build"]).output().unwrap();
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(text(&out).contains("with codex"), "{}", text(&out));

    let req = s.request("req.md", "- add a greeting file\n- add a farewell file\n");
    let done = AtomicBool::new(false);
    let (out, seen) = std::thread::scope(|scope| {
        let watcher = scope.spawn(|| {
            let mut seen = Vec::new();
            while !done.load(Ordering::Relaxed) {
                seen.extend(inspect_all(&service));
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            seen
        });
        let base = standin.base_url();
        let out = cohort(&["run", "-j", "2", "--runtime", "podman", "--base-url", &base])
            .arg(&req)
            .output()
            .unwrap();
        done.store(true, Ordering::Relaxed);
        (out, watcher.join().unwrap())
    });
    let log = std::fs::read_dir(s.work.join(".git/cohort/runs"))
        .unwrap()
        .flatten()
        .map(|r| std::fs::read_to_string(r.path().join("logs/001.log")).unwrap_or_default())
        .collect::<String>();
    assert_eq!(code(&out), 0, "{}\n{log}", text(&out));
    assert_eq!(s.merged_tasks("cohort/service").len(), 2, "{}\n{log}", text(&out));
    assert!(log.contains("runtime podman"), "{log}");
    assert!(
        seen.iter().any(|(_, j)| j.contains("\"cohort.run\"")),
        "no task container seen"
    );
    for (id, json) in &seen {
        assert!(!json.contains(KEY), "the key is in podman inspect of {id}");
    }
    check_task_mounts(&s, &seen);
    let left = cli_out(&service, &["ps", "-a", "-q", "--filter", "label=cohort.run"]);
    assert_eq!(left.trim(), "", "task containers left behind");
}
