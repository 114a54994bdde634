//! Against a real disposable podman service (no mocks): build the image with cohort-oci,
//! load it over the REST API, run git inside a container with a repo mounted at /workspace.
//! Needs podman + runc: `fixtures/podman-service.sh install`.

#[path = "../../../tests/support/podman.rs"]
pub(super) mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;
use cohort_oci::{BlobStore, BuildSpec, ImageSettings};

pub(super) const TAG: &str = "localhost/cohort-test:latest";

pub(super) fn build_image(dir: &Path, store: &str) -> (cohort_oci::BuiltImage, PathBuf) {
    let store = BlobStore::open(dir.join(store)).unwrap();
    let spec = BuildSpec {
        settings: ImageSettings {
            source_commit: Some("abc123".into()),
            ..Default::default()
        },
        source_date_epoch: 1_700_000_000,
        compression: 1,
        ..Default::default()
    };
    let image = cohort_oci::build(&spec, &store).unwrap();
    let archive = dir.join(format!("{}.tar", image.image_id()));
    cohort_oci::write_oci_archive(&store, &image, TAG, &archive, spec.source_date_epoch).unwrap();
    (image, archive)
}

/// Runtime settings for tests: `image`, no network, no limits, no mounts.
pub(super) fn test_settings(image: &str) -> PodmanSettings {
    PodmanSettings {
        image: image.into(),
        network: NetworkMode::None,
        memory_bytes: None,
        pids_limit: None,
        mounts: Vec::new(),
    }
}

/// `tmp/repo`, a new repository (with `files`), all of `tmp` given to the rootless test user;
/// returns the checkout's canonical path.
pub(super) fn rootless_repo(tmp: &Path, files: &[(&str, &str)]) -> PathBuf {
    let repo = tmp.join("repo");
    std::fs::create_dir(&repo).unwrap();
    host_git(&repo, &["init", "-q", "-b", "main"]);
    for (name, text) in files {
        std::fs::write(repo.join(name), text).unwrap();
    }
    let chown = Command::new("chown")
        .arg("-R")
        .arg(support::ROOTLESS_USER)
        .arg(tmp)
        .status();
    assert!(chown.unwrap().success());
    repo.canonicalize().unwrap()
}

pub(super) fn host_git(repo: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(["-c", "safe.directory=*", "-C"])
        .arg(repo)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_loads_and_git_runs_inside_without_network() {
    let tmp = tempfile::tempdir().unwrap();
    let (image, archive) = build_image(tmp.path(), "s1");
    let (again, _) = build_image(tmp.path(), "s2");
    assert_eq!(image.manifest_digest, again.manifest_digest, "two builds, one digest");

    let service = support::PodmanService::start();
    let podman = Podman::connect_to(service.socket())
        .await
        .unwrap_or_else(|e| panic!("{e}: {}", service.log()));
    let v = podman.version();
    assert!(v.version.starts_with('4') || v.version.starts_with('5'));
    // The libpod API version (what doctor shows), not the Docker-compatible 1.x of /version.
    assert_eq!(v.api_version.split('.').next(), v.version.split('.').next(), "{v:?}");

    let names = podman.load_image(&archive).await.unwrap();
    assert!(names.iter().any(|n| n.contains("cohort-test")), "{names:?}");
    assert!(podman.image_exists(TAG).await.unwrap());
    let info = podman.image_inspect(TAG).await.unwrap();
    assert_eq!(info.id, image.image_id(), "podman's image ID is our config digest");
    assert_eq!(
        info.labels
            .unwrap_or_default()
            .get(cohort_oci::LABEL_REVISION)
            .map(String::as_str),
        Some("abc123")
    );

    // A scratch repository on the host, mounted at /workspace.
    let repo = tmp.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    host_git(&repo, &["init", "-q", "-b", "main"]);
    std::fs::write(repo.join("a.txt"), "hello\n").unwrap();

    let mut labels = BTreeMap::new();
    labels.insert("cohort.test".to_string(), "git".to_string());
    let spec = ContainerSpec {
        image: TAG.into(),
        // Rootful `userns=auto` maps the container user to an unprivileged host range; `U`
        // hands the checkout to it (rootless `keep-id` needs no such thing).
        mounts: vec![BindMount {
            options: if podman.rootless() { vec![] } else { vec!["U".into()] },
            ..BindMount::new(repo.display().to_string(), "/workspace")
        }],
        network: NetworkMode::None,
        memory_bytes: Some(512 << 20),
        pids_limit: Some(256),
        labels,
        ..Default::default()
    };
    let id = podman.create_container(&spec).await.unwrap();
    podman.start_container(&id).await.unwrap();

    let git = |args: &[&str]| {
        let mut s = ExecSpec::new(["git"].iter().chain(args.iter()).copied());
        // Identity only through the exec's environment, never the create spec.
        s.env = vec![
            "GIT_AUTHOR_NAME=Agent".into(),
            "GIT_AUTHOR_EMAIL=a@x".into(),
            "GIT_COMMITTER_NAME=Agent".into(),
            "GIT_COMMITTER_EMAIL=a@x".into(),
        ];
        s
    };
    let whoami = podman.exec(&id, &ExecSpec::new(["id", "-u"])).await.unwrap();
    eprintln!("uid in container: {}", whoami.stdout_str());
    let st = podman.exec(&id, &git(&["status", "--porcelain"])).await.unwrap();
    assert_eq!(st.exit_code, 0, "{}", st.stderr_str());
    assert_eq!(st.stdout_str(), "?? a.txt\n");
    let add = podman.exec(&id, &git(&["add", "a.txt"])).await.unwrap();
    assert_eq!(add.exit_code, 0, "{}", add.stderr_str());
    let commit = podman
        .exec(&id, &git(&["commit", "-q", "-m", "from the container"]))
        .await
        .unwrap();
    assert_eq!(commit.exit_code, 0, "{}", commit.stderr_str());
    assert_eq!(
        host_git(&repo, &["log", "--format=%an %s"]),
        "Agent from the container\n"
    );

    // A failing command's exit code and stderr come through.
    let fail = podman
        .exec(&id, &ExecSpec::new(["sh", "-c", "echo out; echo oops >&2; exit 3"]))
        .await
        .unwrap();
    assert_eq!(
        (fail.exit_code, fail.stdout_str(), fail.stderr_str()),
        (3, "out\n".into(), "oops\n".into())
    );
    // No network: loopback only.
    let net = podman
        .exec(&id, &ExecSpec::new(["ls", "/sys/class/net"]))
        .await
        .unwrap();
    assert_eq!(net.stdout_str().split_whitespace().collect::<Vec<_>>(), vec!["lo"]);

    // A secret passed as exec environment reaches the process and is not in the container's spec.
    let mut secret = ExecSpec::new(["sh", "-c", "printf %s \"$COHORT_TEST_KEY\""]);
    secret.env = vec!["COHORT_TEST_KEY=sk-test-0123456789".into()];
    let exec_id = podman.exec_create(&id, &secret).await.unwrap();
    let (out, _) = podman
        .exec_start(&exec_id, false)
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out), "sk-test-0123456789");
    let raw = podman.inspect_container_raw(&id).await.unwrap().to_string();
    assert!(raw.contains("cohort.test") && !raw.contains("sk-test-0123456789"));
    let exec_raw: serde_json::Value = podman
        .get_json(&format!("{API_PREFIX}/exec/{exec_id}/json"))
        .await
        .unwrap();
    assert!(!exec_raw.to_string().contains("sk-test-0123456789"), "{exec_raw}");

    // stdin is streamed to the process and half-closed; the exit code comes from exec inspect.
    let exec_id = podman
        .exec_create(
            &id,
            &ExecSpec {
                stdin: true,
                ..ExecSpec::new(["sh", "-c", "tr a-z A-Z; exit 5"])
            },
        )
        .await
        .unwrap();
    let mut session = podman.exec_start(&exec_id, false).await.unwrap();
    session.write_stdin(b"hello\n").await.unwrap();
    session.close_stdin().await.unwrap();
    let (out, _) = session.collect().await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out), "HELLO\n");
    assert_eq!(podman.exec_exit_code(&exec_id).await.unwrap(), 5);

    // A TTY exec: raw stream, a real pty, and resize reaches it.
    let exec_id = podman
        .exec_create(
            &id,
            &ExecSpec {
                stdin: true,
                tty: true,
                ..ExecSpec::new(["sh", "-c", "read x; stty size; tty"])
            },
        )
        .await
        .unwrap();
    let mut session = podman.exec_start(&exec_id, true).await.unwrap();
    podman.exec_resize(&exec_id, 30, 100).await.unwrap();
    session.write_stdin(b"go\n").await.unwrap();
    let mut screen = Vec::new();
    while let Some(f) = session.next_frame().await.unwrap() {
        screen.extend(f.data);
    }
    let screen = String::from_utf8_lossy(&screen);
    assert!(screen.contains("30 100") && screen.contains("/dev/pts/"), "{screen:?}");
    assert_eq!(podman.exec_exit_code(&exec_id).await.unwrap(), 0);

    // The main process's exit code, through wait + inspect, and its logs.
    let spec2 = ContainerSpec {
        image: TAG.into(),
        command: Some(vec!["sh".into(), "-c".into(), "echo hi; echo err >&2; exit 7".into()]),
        network: NetworkMode::None,
        ..Default::default()
    };
    let id2 = podman.create_container(&spec2).await.unwrap();
    podman.start_container(&id2).await.unwrap();
    assert_eq!(podman.wait_container(&id2).await.unwrap(), 7);
    let (out, err) = podman.logs(&id2).await.unwrap();
    assert_eq!(
        (
            String::from_utf8_lossy(&out).as_ref(),
            String::from_utf8_lossy(&err).as_ref()
        ),
        ("hi\n", "err\n")
    );
    podman.remove_container(&id2, false).await.unwrap();

    let listed = podman.list_containers(&[("cohort.test", "git")]).await.unwrap();
    assert_eq!(
        listed.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
        vec![id.as_str()]
    );
    // Kill: the signal's exit code (128 + 9) comes back through wait.
    let id3 = podman
        .create_container(&ContainerSpec {
            image: TAG.into(),
            network: NetworkMode::None,
            ..Default::default()
        })
        .await
        .unwrap();
    podman.start_container(&id3).await.unwrap();
    podman.kill_container(&id3, "SIGKILL").await.unwrap();
    assert_eq!(podman.wait_container(&id3).await.unwrap(), 137);
    podman.remove_container(&id3, false).await.unwrap();

    // Stop: `sleep` as PID 1 ignores SIGTERM, so podman kills it after the timeout.
    podman.stop_container(&id, 1).await.unwrap();
    let state = podman.inspect_container(&id).await.unwrap().state;
    assert!(!state.running, "{state:?}");
    assert_eq!(state.exit_code, 137, "{state:?}");
    podman.remove_container(&id, true).await.unwrap();
    assert!(!podman.container_exists(&id).await.unwrap());
    let gone = podman.inspect_container(&id).await.unwrap_err();
    assert!(gone.is_not_found(), "{gone}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_on_an_exported_base_image() {
    let tmp = tempfile::tempdir().unwrap();
    let store = BlobStore::open(tmp.path().join("s")).unwrap();
    let base_spec = BuildSpec {
        programs: ["/bin/sh", "/usr/bin/cat", "/usr/bin/grep"]
            .iter()
            .map(PathBuf::from)
            .collect(),
        source_date_epoch: 1,
        ..Default::default()
    };
    let base = cohort_oci::build(&base_spec, &store).unwrap();
    let base_archive = tmp.path().join("base.tar");
    cohort_oci::write_oci_archive(&store, &base, "localhost/base:1", &base_archive, 1).unwrap();

    let service = support::PodmanService::start();
    let podman = Podman::connect_to(service.socket()).await.unwrap();
    podman.load_image(&base_archive).await.unwrap();
    let exported = tmp.path().join("exported.tar");
    podman.export_image("localhost/base:1", &exported).await.unwrap();

    let marker = tmp.path().join("marker");
    std::fs::write(&marker, "on top\n").unwrap();
    let spec = BuildSpec {
        programs: Vec::new(),
        base: Some(exported),
        files: vec![(marker, "/opt/marker".into())],
        settings: ImageSettings {
            user: "agent".into(),
            uid: 2000,
            gid: 2000,
            ..Default::default()
        },
        source_date_epoch: 1,
        ..Default::default()
    };
    let store2 = BlobStore::open(tmp.path().join("s2")).unwrap();
    let derived = cohort_oci::build(&spec, &store2).unwrap();
    assert_eq!(
        derived.layers[..base.layers.len()]
            .iter()
            .map(|l| &l.diff_id)
            .collect::<Vec<_>>(),
        base.layers.iter().map(|l| &l.diff_id).collect::<Vec<_>>()
    );
    let archive = tmp.path().join("derived.tar");
    cohort_oci::write_oci_archive(&store2, &derived, "localhost/derived:1", &archive, 1).unwrap();
    podman.load_image(&archive).await.unwrap();

    let c = ContainerSpec {
        image: "localhost/derived:1".into(),
        command: Some(vec![
            "sh".into(),
            "-c".into(),
            "cat /opt/marker; grep -c -e ^cohort: -e ^agent: /etc/passwd".into(),
        ]),
        network: NetworkMode::None,
        ..Default::default()
    };
    let id = podman.create_container(&c).await.unwrap();
    podman.start_container(&id).await.unwrap();
    assert_eq!(podman.wait_container(&id).await.unwrap(), 0);
    let (out, err) = podman.logs(&id).await.unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out),
        "on top\n2\n",
        "{}",
        String::from_utf8_lossy(&err)
    );
    podman.remove_container(&id, true).await.unwrap();
}

/// The developer's path: a rootless service, `keep-id` mapping the host user onto the
/// image's user, so files written in /workspace belong to the host user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rootless_keep_id_owns_the_checkout() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, archive) = build_image(tmp.path(), "s");
    let service = support::PodmanService::start_rootless(support::ROOTLESS_USER);
    let (uid, _) = support::user_ids(support::ROOTLESS_USER).unwrap();
    let podman = Podman::connect_to(service.socket())
        .await
        .unwrap_or_else(|e| panic!("{e}: {}", service.log()));
    assert!(podman.rootless());
    podman.load_image(&archive).await.unwrap();

    let repo = rootless_repo(tmp.path(), &[("a.txt", "hello\n")]);

    let spec = ContainerSpec {
        image: TAG.into(),
        workspace: Some(repo.display().to_string()),
        image_user: Some((1000, 1000)),
        network: NetworkMode::None,
        ..Default::default()
    };
    let id = podman.create_container(&spec).await.unwrap();
    podman.start_container(&id).await.unwrap();
    let mut commit = ExecSpec::new(["sh", "-c", "git add -A && git commit -qm rootless && echo new > b.txt"]);
    commit.env = vec![
        "GIT_AUTHOR_NAME=R".into(),
        "GIT_AUTHOR_EMAIL=r@x".into(),
        "GIT_COMMITTER_NAME=R".into(),
        "GIT_COMMITTER_EMAIL=r@x".into(),
    ];
    let out = podman.exec(&id, &commit).await.unwrap();
    assert_eq!(out.exit_code, 0, "{}", out.stderr_str());
    assert_eq!(host_git(&repo, &["log", "--format=%an %s"]), "R rootless\n");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(repo.join("b.txt")).unwrap().uid(),
        uid,
        "written as the host user"
    );
    podman.remove_container(&id, true).await.unwrap();
}

/// `PodmanRuntime` itself: the secret only in the exec (and out of inspect), stdin streamed,
/// stdout/stderr lines, the real exit code, timeout and cancel kill the container, and the
/// container is removed after each of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_runs_one_container_per_spawn() {
    use crate::agent::Invocation;
    use crate::runtime::{Exit, Output, Runtime, Spawn};
    use crate::secret::Secret;
    use tokio_util::sync::CancellationToken;

    let tmp = tempfile::tempdir().unwrap();
    let (_, archive) = build_image(tmp.path(), "s");
    let service = support::PodmanService::start();
    let podman = Podman::connect_to(service.socket()).await.unwrap();
    podman.load_image(&archive).await.unwrap();
    let repo = tmp.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    host_git(&repo, &["init", "-q", "-b", "main"]);
    let checkout = repo.canonicalize().unwrap();
    let settings = PodmanSettings {
        image: TAG.into(),
        network: NetworkMode::None,
        memory_bytes: Some(512 << 20),
        pids_limit: Some(128),
        mounts: Vec::new(),
    };
    let rt = PodmanRuntime::new(podman.clone(), settings).await.unwrap();
    let spawn = |script: &str, stdin: Option<&str>, timeout: Option<std::time::Duration>| Spawn {
        invocation: Invocation {
            program: "/usr/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            env: vec![
                ("COHORT_RUN_ID".into(), "rt-test".into()),
                ("COHORT_TASK_ID".into(), "001".into()),
                ("WHERE".into(), checkout.join("sub").display().to_string()),
            ],
            secret_env: vec![("SECRET_KEY".into(), Secret::new("sk-runtime-0123456789"))],
            stdin: stdin.map(|s| s.as_bytes().to_vec()),
        },
        workdir: checkout.clone(),
        binds: Vec::new(),
        run_id: "rt-test".into(),
        task: 1,
        gateway_socket: None,
        role: Default::default(),
        caches: Vec::new(),
        tree: None,
        scratch: None,
        timeout,
    };
    let leftovers = |podman: Podman| async move { podman.list_containers(&[("cohort.run", "rt-test")]).await.unwrap() };

    // Output, stdin, secret, path translation, exit code; inspected from outside while running.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let script = "printf '%s\\n' \"$SECRET_KEY\"; tr a-z A-Z; echo; echo \"$WHERE $(pwd)\"; echo oops >&2; \
                  echo file > made.txt; sleep 1; exit 3";
    let running = {
        let s = spawn(script, Some("hello"), None);
        let rt = &rt;
        async move { rt.run(s, tx, CancellationToken::new()).await }
    };
    let watch = async {
        let mut raw = String::new();
        for _ in 0..100 {
            for c in leftovers(podman.clone()).await {
                raw.push_str(&podman.inspect_container_raw(&c.id).await.unwrap().to_string());
            }
            if !raw.is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        raw
    };
    let (exit, raw) = tokio::join!(running, watch);
    assert_eq!(exit.unwrap(), Exit::Code(3));
    assert!(raw.contains("cohort.task") && raw.contains("\"001\""), "{raw}");
    // The agent is the main process, and podman keeps no second copy of its output.
    assert!(raw.contains("SECRET_KEY") && raw.contains("\"Type\":\"none\""), "{raw}");
    assert!(
        !raw.contains("sk-runtime-0123456789"),
        "the secret is in the create spec"
    );
    let mut out = Vec::new();
    let mut err = Vec::new();
    while let Ok(line) = rx.try_recv() {
        match line {
            Output::Stdout(l) => out.push(l),
            Output::Stderr(l) => err.push(l),
            Output::Placed(_) => {}
        }
    }
    assert_eq!(out, vec!["sk-runtime-0123456789", "HELLO", "/workspace/sub /workspace"]);
    assert_eq!(err, vec!["oops"]);
    assert_eq!(std::fs::read_to_string(checkout.join("made.txt")).unwrap(), "file\n");
    // Removed in the background, and always by the time the run asks.
    rt.removals_done().await;
    assert!(leftovers(podman.clone()).await.is_empty(), "container not removed");

    // Timeout and cancel: killed, reported, removed.
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let t0 = std::time::Instant::now();
    let exit = rt
        .run(
            spawn("sleep 60", None, Some(std::time::Duration::from_secs(1))),
            tx,
            CancellationToken::new(),
        )
        .await
        .unwrap();
    assert!(matches!(exit, Exit::TimedOut(_)), "{exit:?}");
    assert!(t0.elapsed().as_secs() < 30);
    rt.removals_done().await;
    assert!(leftovers(podman.clone()).await.is_empty());
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let cancel = CancellationToken::new();
    let c2 = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        c2.cancel();
    });
    let exit = rt.run(spawn("sleep 60", None, None), tx, cancel).await.unwrap();
    assert_eq!(exit, Exit::Cancelled);
    rt.removals_done().await;
    assert!(leftovers(podman.clone()).await.is_empty());

    // cleanup_run removes what a crashed run left.
    let mut labels = BTreeMap::new();
    labels.insert("cohort.run".to_string(), "rt-test".to_string());
    let id = podman
        .create_container(&ContainerSpec {
            image: TAG.into(),
            network: NetworkMode::None,
            labels,
            ..Default::default()
        })
        .await
        .unwrap();
    podman.start_container(&id).await.unwrap();
    assert_eq!(rt.cleanup_run("rt-test").await.unwrap(), 1);
    assert!(leftovers(podman.clone()).await.is_empty());
}

/// The runtime on a rootless engine (a developer's `systemctl --user` socket): keep-id maps
/// the host user onto the image user, git works in the checkout, files stay the user's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_rootless_keep_id() {
    use crate::agent::Invocation;
    use crate::runtime::{Exit, Output, Runtime, Spawn};
    use std::os::unix::fs::MetadataExt;
    use tokio_util::sync::CancellationToken;

    let tmp = tempfile::tempdir().unwrap();
    let (_, archive) = build_image(tmp.path(), "s");
    let service = support::PodmanService::start_rootless(support::ROOTLESS_USER);
    let (uid, _) = support::user_ids(support::ROOTLESS_USER).unwrap();
    let podman = Podman::connect_to(service.socket()).await.unwrap();
    assert!(podman.rootless());
    podman.load_image(&archive).await.unwrap();
    let checkout = rootless_repo(tmp.path(), &[("a.txt", "a\n")]);
    let rt = PodmanRuntime::new(podman.clone(), test_settings(TAG)).await.unwrap();
    let spawn = Spawn {
        invocation: Invocation {
            program: "sh".into(),
            args: vec![
                "-c".into(),
                "git status --porcelain && echo new > b.txt && id -u".into(),
            ],
            env: vec![("COHORT_RUN_ID".into(), "rootless".into())],
            ..Default::default()
        },
        workdir: checkout.clone(),
        timeout: None,
        binds: Vec::new(),
        run_id: "rootless".into(),
        task: 1,
        gateway_socket: None,
        role: Default::default(),
        caches: Vec::new(),
        tree: None,
        scratch: None,
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let exit = rt.run(spawn, tx, CancellationToken::new()).await.unwrap();
    let mut lines = Vec::new();
    while let Ok(l) = rx.try_recv() {
        lines.push(match l {
            Output::Stdout(s) => s,
            Output::Stderr(s) => format!("err: {s}"),
            Output::Placed(w) => format!("on: {w}"),
        });
    }
    assert_eq!(exit, Exit::Code(0), "{lines:?}");
    assert_eq!(lines, vec!["?? a.txt", "1000"]);
    assert_eq!(
        std::fs::metadata(checkout.join("b.txt")).unwrap().uid(),
        uid,
        "written as the host user"
    );
    rt.removals_done().await;
    assert!(podman
        .list_containers(&[("cohort.run", "rootless")])
        .await
        .unwrap()
        .is_empty());
}
