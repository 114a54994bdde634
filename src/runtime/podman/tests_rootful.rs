//! The runtime on a rootful engine: `userns=auto` plus idmapped views of the git dir and the
//! checkout. Against a real disposable podman service run as root (so rootful), with a checkout
//! owned by an ordinary uid: the agent runs as the image user in its own id range, writes and
//! commits, and on the host everything it wrote belongs to the checkout's owner; nothing is
//! chowned. Needs podman + runc and a `containers` entry in /etc/subuid and /etc/subgid:
//! `fixtures/podman-service.sh install`.

use super::tests::support;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;
use crate::agent::Invocation;
use crate::runtime::{Exit, Output, Runtime, Spawn};
use cohort_oci::{BlobStore, BuildSpec, ImageSettings};
use tokio_util::sync::CancellationToken;

const TAG: &str = "localhost/cohort-rootful:latest";
const OWNER: (u32, u32) = (4321, 4322);

/// Every path under `dir` (itself included) whose owner is not `owner`.
fn foreign_owned(dir: &Path, owner: (u32, u32), out: &mut Vec<PathBuf>) {
    let m = std::fs::symlink_metadata(dir).unwrap();
    if (m.uid(), m.gid()) != owner {
        out.push(dir.to_owned());
    }
    if m.is_dir() {
        for e in std::fs::read_dir(dir).unwrap() {
            foreign_owned(&e.unwrap().path(), owner, out);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rootful_userns_auto_with_idmapped_checkout() {
    agent_writes_as_owner(true).await;
}

/// Where cohort cannot make idmapped views (the hardened system service: no capabilities),
/// the container still gets `userns=auto`, with the image user pinned to the checkout's owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rootful_userns_auto_pinned_without_idmapped_mounts() {
    agent_writes_as_owner(false).await;
}

async fn agent_writes_as_owner(idmap: bool) {
    let run_id = if idmap { "rootful-idmap" } else { "rootful-pinned" };
    let tmp = tempfile::tempdir().unwrap();
    let store = BlobStore::open(tmp.path().join("s")).unwrap();
    let spec = BuildSpec {
        settings: ImageSettings::default(),
        source_date_epoch: 1,
        ..Default::default()
    };
    let image = cohort_oci::build(&spec, &store).unwrap();
    let archive = tmp.path().join("image.tar");
    cohort_oci::write_oci_archive(&store, &image, TAG, &archive, 1).unwrap();
    let service = support::PodmanService::start();
    let podman = Podman::connect_to(service.socket()).await.unwrap();
    assert!(!podman.rootless());
    podman.load_image(&archive).await.unwrap();

    let repo = tmp.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .args(["-c", "safe.directory=*", "-C"])
            .arg(&repo)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    git(&["init", "-q", "-b", "main"]);
    std::fs::write(repo.join("a.txt"), "a\n").unwrap();
    let owner = format!("{}:{}", OWNER.0, OWNER.1);
    assert!(Command::new("chown")
        .args(["-R", &owner])
        .arg(&repo)
        .status()
        .unwrap()
        .success());
    let checkout = repo.canonicalize().unwrap();
    let settings = super::tests::test_settings(TAG);
    let mut rt = PodmanRuntime::new(podman.clone(), settings).await.unwrap();
    assert!(rt.uses_idmap(), "running as root here, idmapped mounts must work");
    if !idmap {
        rt = rt.without_idmap();
    }

    let script = "id -u; id -g; tr -s ' ' </proc/self/uid_map | sed 's/^ //' | tr '\\n' ';'; echo; \
                  git status --porcelain; echo new > b.txt; git add -A; \
                  git -c user.name=Agent -c user.email=a@x commit -qm 'from the container'; echo done";
    let spawn = Spawn {
        invocation: Invocation {
            program: "sh".into(),
            args: vec!["-c".into(), script.into()],
            env: vec![
                ("COHORT_RUN_ID".into(), run_id.into()),
                ("COHORT_TASK_ID".into(), "001".into()),
            ],
            ..Default::default()
        },
        workdir: checkout.clone(),
        timeout: None,
        binds: Vec::new(),
        run_id: run_id.into(),
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
    assert_eq!(lines.len(), 5, "{lines:?}");
    let ranges: Vec<Vec<u64>> = (lines[2].split(';').filter(|r| !r.is_empty()))
        .map(|r| r.split(' ').map(|n| n.parse().unwrap()).collect())
        .collect();
    let root = ranges.iter().find(|r| r[0] == 0).expect("container root is mapped");
    let pinned = ranges.iter().any(|r| r[..] == [1000, OWNER.0 as u64, 1]);
    if idmap || rt.pinned_ok() {
        assert_eq!(&lines[..2], ["1000", "1000"], "the image user runs the agent");
        // userns=auto: container 0 is some unprivileged host id, not host root.
        assert!(root[1] >= 65536, "not an auto range: {lines:?}");
        assert_eq!(
            pinned, !idmap,
            "the image user is the owner only without idmapped views: {lines:?}"
        );
    } else {
        // The engine refused the pinned mapping (podman 4.3 here): the last resort.
        let owner = [OWNER.0.to_string(), OWNER.1.to_string()];
        assert_eq!(&lines[..2], owner, "the checkout's owner runs the agent");
        assert_eq!(ranges, [vec![0, 0, 4294967295]], "the host user namespace: {lines:?}");
    }
    assert_eq!(&lines[3..], ["?? a.txt", "done"]);

    assert_eq!(git(&["log", "--format=%an %s"]), "Agent from the container\n");
    assert_eq!(git(&["show", "HEAD:b.txt"]), "new\n");
    let b = std::fs::metadata(checkout.join("b.txt")).unwrap();
    assert_eq!((b.uid(), b.gid()), OWNER, "written as the checkout's owner");
    // Nothing chowned, nothing the agent wrote (objects, index, refs) owned by anyone else.
    let mut foreign = Vec::new();
    foreign_owned(&checkout, OWNER, &mut foreign);
    assert!(foreign.is_empty(), "not owned by {owner}: {foreign:?}");

    rt.removals_done().await;
    assert!(podman
        .list_containers(&[("cohort.run", run_id)])
        .await
        .unwrap()
        .is_empty());
    let left: Vec<_> = std::fs::read_dir(runtime::IDMAP_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("cohort-{run_id}-"))
        })
        .collect();
    assert!(left.is_empty(), "staging directories left: {left:?}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&format!("cohort-{run_id}-")),
        "idmapped views left mounted"
    );
}
