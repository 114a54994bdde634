//! Tasks at `-j N` on a rootless engine: creates go one at a time (rootless podman 5 crashed
//! on concurrent keep-id creates, see `PodmanRuntime::creates`), while the agents themselves
//! run at the same time. Against a real disposable rootless podman service.

use std::sync::atomic::Ordering;

use super::tests::{build_image, rootless_repo, support, test_settings, TAG};
use super::*;
use crate::agent::Invocation;
use crate::runtime::{Exit, Output, Runtime, Spawn};
use tokio_util::sync::CancellationToken;

const TASKS: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_tasks_create_one_at_a_time_and_run_together() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, archive) = build_image(tmp.path(), "s");
    let service = support::PodmanService::start_rootless(support::ROOTLESS_USER);
    let podman = Podman::connect_to(service.socket()).await.unwrap();
    podman.load_image(&archive).await.unwrap();
    let checkout = rootless_repo(tmp.path(), &[]);
    let rt = std::sync::Arc::new(PodmanRuntime::new(podman.clone(), test_settings(TAG)).await.unwrap());

    // Each agent announces itself in the shared checkout, then waits (up to 60 s) until all
    // have: it exits 0 only if every container was running at the same time.
    let script = format!(
        "touch ready-$N; i=0; while [ $(ls ready-* | wc -l) -lt {TASKS} ]; do \
         i=$((i+1)); [ $i -gt 600 ] && exit 9; sleep 0.1; done; echo together"
    );
    let mut runs = tokio::task::JoinSet::new();
    for n in 0..TASKS {
        let spawn = Spawn {
            invocation: Invocation {
                program: "sh".into(),
                args: vec!["-c".into(), script.clone()],
                env: vec![("COHORT_RUN_ID".into(), "parallel".into()), ("N".into(), n.to_string())],
                ..Default::default()
            },
            workdir: checkout.clone(),
            timeout: Some(std::time::Duration::from_secs(120)),
            binds: Vec::new(),
            run_id: "parallel".into(),
            task: 1,
            gateway_socket: None,
            role: Default::default(),
            caches: Vec::new(),
            tree: None,
            scratch: None,
        };
        let rt = rt.clone();
        runs.spawn(async move {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let exit = rt.run(spawn, tx, CancellationToken::new()).await;
            let mut lines = Vec::new();
            while let Ok(Output::Stdout(l) | Output::Stderr(l)) = rx.try_recv() {
                lines.push(l);
            }
            (exit, lines)
        });
    }
    while let Some(done) = runs.join_next().await {
        let (exit, lines) = done.unwrap();
        assert_eq!(exit.unwrap(), Exit::Code(0), "{lines:?}\n{}", service.log());
        assert_eq!(lines, vec!["together"]);
    }
    assert_eq!(
        rt.creating.1.load(Ordering::SeqCst),
        1,
        "two creates were in flight at once"
    );
    rt.removals_done().await;
    assert!(podman
        .list_containers(&[("cohort.run", "parallel")])
        .await
        .unwrap()
        .is_empty());
}
