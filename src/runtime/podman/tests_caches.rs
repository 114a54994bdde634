//! Caches: podman named volumes that outlive a task's containers and the run. Two verify
//! containers in turn hold the same two caches (one in the workspace, one in the image user's
//! home): the first writes, the second reads, appends and writes into what the first made.
//! The checkout keeps only an empty mount point, and the volumes survive `cleanup_run`.
//! Against real disposable podman services in each mode the runtime uses: rootful with
//! idmapped views (`userns=auto`, each container its own range), rootful without them (the
//! owner pinned, or on podman 4.3 the host user namespace), rootless (`keep-id`).

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::tests::{build_image, host_git, rootless_repo, support, test_settings, TAG};
use super::*;
use crate::agent::Invocation;
use crate::runtime::{Cache, CachePath, Exit, Output, Role, Runtime, Spawn};
use tokio_util::sync::CancellationToken;

const OWNER: (u32, u32) = (4321, 4322);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Idmapped,
    WithoutIdmap,
    Rootless,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caches_persist_rootful_userns_auto_idmapped() {
    caches_persist(Mode::Idmapped).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caches_persist_rootful_without_idmapped_mounts() {
    caches_persist(Mode::WithoutIdmap).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caches_persist_rootless_keep_id() {
    caches_persist(Mode::Rootless).await;
}

/// `tmp/repo` with one file, owned by [`OWNER`] (the rootful tests' ordinary user).
fn rootful_repo(tmp: &Path) -> PathBuf {
    let repo = tmp.join("repo");
    std::fs::create_dir(&repo).unwrap();
    host_git(&repo, &["init", "-q", "-b", "main"]);
    std::fs::write(repo.join("a.txt"), "a\n").unwrap();
    let owner = format!("{}:{}", OWNER.0, OWNER.1);
    let ok = Command::new("chown").args(["-R", &owner]).arg(&repo).status().unwrap();
    assert!(ok.success());
    repo.canonicalize().unwrap()
}

/// Runs a spawn; its exit and output lines (stderr marked).
async fn run(rt: &PodmanRuntime, spawn: Spawn) -> (anyhow::Result<Exit>, Vec<String>) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let exit = rt.run(spawn, tx, CancellationToken::new()).await;
    let mut lines = Vec::new();
    while let Ok(l) = rx.try_recv() {
        lines.push(match l {
            Output::Stdout(s) => s,
            Output::Stderr(s) => format!("err: {s}"),
            Output::Placed(w) => format!("on: {w}"),
        });
    }
    (exit, lines)
}

async fn caches_persist(mode: Mode) {
    let run_id = format!("caches-{mode:?}").to_lowercase();
    let tmp = tempfile::tempdir().unwrap();
    let (_, archive) = build_image(tmp.path(), "s");
    let service = match mode {
        Mode::Rootless => support::PodmanService::start_rootless(support::ROOTLESS_USER),
        _ => support::PodmanService::start(),
    };
    let podman = Podman::connect_to(service.socket()).await.unwrap();
    assert_eq!(podman.rootless(), mode == Mode::Rootless);
    podman.load_image(&archive).await.unwrap();
    let (checkout, owner) = match mode {
        Mode::Rootless => {
            let repo = rootless_repo(tmp.path(), &[("a.txt", "a\n")]);
            let m = std::fs::metadata(&repo).unwrap();
            (repo, (m.uid(), m.gid()))
        }
        _ => (rootful_repo(tmp.path()), OWNER),
    };
    let mut rt = PodmanRuntime::new(podman.clone(), test_settings(TAG)).await.unwrap();
    assert_eq!(
        rt.uses_idmap(),
        mode != Mode::Rootless,
        "root here makes idmapped mounts"
    );
    if mode == Mode::WithoutIdmap {
        rt = rt.without_idmap();
    }

    // Unique per test: the service is disposable, but a volume name is a cache's identity.
    let unique = format!("{}-{:08x}", std::process::id(), rand::random::<u32>());
    let caches = vec![
        Cache {
            volume: format!("cohort-cache-test-{unique}-work"),
            host_dir: tmp.path().join("unused-work"),
            at: CachePath::Workdir("target/cache".into()),
        },
        Cache {
            volume: format!("cohort-cache-test-{unique}-home"),
            host_dir: tmp.path().join("unused-home"),
            at: CachePath::Home(".cache/tool".into()),
        },
    ];
    let spawn = |script: &str, caches: Vec<Cache>| Spawn {
        invocation: Invocation {
            program: "sh".into(),
            args: vec!["-c".into(), script.into()],
            env: vec![("COHORT_RUN_ID".into(), run_id.clone())],
            ..Default::default()
        },
        workdir: checkout.clone(),
        timeout: Some(Duration::from_secs(120)),
        binds: Vec::new(),
        run_id: run_id.clone(),
        task: 1,
        gateway_socket: None,
        role: Role::Verify,
        caches,
        tree: None,
        scratch: None,
    };

    // The first writes into both caches (and makes a directory in each), seen from outside
    // while it runs: a verify container's name and labels.
    let first = "set -e; echo one >> target/cache/w.txt; mkdir target/cache/sub; echo x > target/cache/sub/f; \
                 echo one >> \"$HOME/.cache/tool/h.txt\"; mkdir \"$HOME/.cache/tool/sub\"; echo ok; sleep 1";
    // Each container says its user namespace (`container host size` ranges).
    let uid_map = "; tr -s ' ' </proc/self/uid_map | sed 's/^ //' | tr '\\n' ';'; echo";
    let watch = async {
        for _ in 0..200 {
            let list = podman
                .list_containers(&[("cohort.run", run_id.as_str())])
                .await
                .unwrap();
            if !list.is_empty() {
                return list;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Vec::new()
    };
    let ((exit, lines), seen) = tokio::join!(run(&rt, spawn(&format!("{first}{uid_map}"), caches.clone())), watch);
    assert_eq!(exit.unwrap(), Exit::Code(0), "{lines:?}\n{}", service.log());
    assert_eq!(lines[..1], ["ok"]);
    let first_map = lines[1].clone();
    let [c] = &seen[..] else {
        panic!("one container expected: {seen:?}")
    };
    let name = c.names.first().map(String::as_str).unwrap_or("");
    assert!(name.starts_with(&format!("cohort-{run_id}-001-verify-")), "{name}");
    let labels = c.labels.clone().unwrap_or_default();
    assert_eq!(
        labels.get("cohort.role").map(String::as_str),
        Some("verify"),
        "{labels:?}"
    );

    // The second, a new container, reads what the first wrote, appends to it and writes into
    // the directories it made. Under `userns=auto` it gets another id range: the first's is
    // free again once it is removed, so a container made in between takes it.
    rt.removals_done().await;
    let blocker = match mode {
        Mode::Idmapped => Some(
            podman
                .create_container(&ContainerSpec {
                    image: TAG.into(),
                    network: NetworkMode::None,
                    ..Default::default()
                })
                .await
                .unwrap(),
        ),
        _ => None,
    };
    let second = "set -e; cat target/cache/w.txt \"$HOME/.cache/tool/h.txt\" target/cache/sub/f; \
                  echo two >> target/cache/w.txt; echo y > target/cache/sub/g; \
                  echo two >> \"$HOME/.cache/tool/h.txt\"; echo y > \"$HOME/.cache/tool/sub/g\"; echo ok";
    let (exit, lines) = run(&rt, spawn(&format!("{second}{uid_map}"), caches.clone())).await;
    assert_eq!(exit.unwrap(), Exit::Code(0), "{lines:?}\n{}", service.log());
    assert_eq!(lines[..4], ["one", "one", "x", "ok"]);
    // Only `userns=auto` with idmapped views moves the image user between host ids.
    assert_eq!(
        lines[4] != first_map,
        mode == Mode::Idmapped,
        "{first_map} then {}",
        lines[4]
    );
    if let Some(id) = blocker {
        podman.remove_container(&id, true).await.unwrap();
    }

    // The content is in the volumes, and nothing of it in the checkout: only the empty
    // mount point, the checkout owner's.
    for (cache, file) in caches.iter().zip(["w.txt", "h.txt"]) {
        let vol = podman.inspect_volume(&cache.volume).await.unwrap();
        let data = Path::new(&vol.mountpoint);
        assert_eq!(std::fs::read_to_string(data.join(file)).unwrap(), "one\ntwo\n");
        assert_eq!(std::fs::read_to_string(data.join("sub/g")).unwrap(), "y\n");
    }
    let entries = |dir: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(entries(&checkout), [".git", "a.txt", "target"]);
    assert_eq!(entries(&checkout.join("target")), ["cache"]);
    assert!(entries(&checkout.join("target/cache")).is_empty());
    for dir in ["target", "target/cache"] {
        let m = std::fs::symlink_metadata(checkout.join(dir)).unwrap();
        assert_eq!((m.uid(), m.gid()), owner, "{dir}");
    }
    assert_eq!(host_git(&checkout, &["status", "--porcelain"]), "?? a.txt\n");

    // A cache path that leaves the workspace fails the spawn before any container.
    for bad in [CachePath::Workdir("../out".into()), CachePath::Home("/etc".into())] {
        let bad = vec![Cache {
            at: bad,
            ..caches[0].clone()
        }];
        let (exit, _) = run(&rt, spawn("echo never", bad)).await;
        let err = format!("{:#}", exit.unwrap_err());
        assert!(err.contains("cache path"), "{err}");
    }
    assert!(!tmp.path().join("out").exists());

    // The run's cleanup removes its containers, never its caches.
    rt.cleanup_run(&run_id).await.unwrap();
    assert!(podman
        .list_containers(&[("cohort.run", run_id.as_str())])
        .await
        .unwrap()
        .is_empty());
    for cache in &caches {
        assert!(
            podman.volume_exists(&cache.volume).await.unwrap(),
            "{} removed",
            cache.volume
        );
        let vol = podman.inspect_volume(&cache.volume).await.unwrap();
        let labels = vol.labels.unwrap_or_default();
        assert_eq!(
            labels,
            BTreeMap::from([("cohort".to_string(), "cache".to_string())]),
            "{}",
            cache.volume
        );
        podman.remove_volume(&cache.volume, true).await.unwrap();
        assert!(!podman.volume_exists(&cache.volume).await.unwrap());
    }
}
