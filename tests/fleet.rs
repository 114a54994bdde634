//! Worker hosts (issue #20) against real disposable podman services: the controller's
//! read-only registry (`remote::registry`) served over plain HTTP on loopback, podman pulling
//! cohort images from it by digest (a second image sends only what the first lacked), and a
//! `Fleet` of worker containers started and stopped on a host.
//! Needs podman + runc: `bash fixtures/podman-service.sh install`.

#[path = "support/podman.rs"]
mod podman_support;

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use cohort::remote::fleet::{self, Fleet, FleetHost, WorkerLaunch};
use cohort::remote::registry::Registry;
use cohort::runtime::podman::{ContainerSpec, NetworkMode, Podman, UsernsMode};
use cohort::secret::Secret;
use cohort_oci::{BlobStore, BuildSpec, BuiltImage};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use podman_support::PodmanService;

/// Two images in one store: `first` (programs, skeleton, cohort) and `second`, the same
/// plus one layer of files. Built once per test binary, in a store kept under the target
/// dir so later runs reuse the layers.
fn images() -> &'static (BlobStore, BuiltImage, BuiltImage) {
    static IMAGES: OnceLock<(BlobStore, BuiltImage, BuiltImage)> = OnceLock::new();
    IMAGES.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fleet-images");
        let store = BlobStore::open(&dir).unwrap();
        let cohort = PathBuf::from(env!("CARGO_BIN_EXE_cohort"));
        let spec = BuildSpec {
            // Enough to print an environment variable (the secret probe) and run cohort.
            programs: ["/usr/bin/dash", "/usr/bin/sh", "/usr/bin/printenv"]
                .into_iter()
                .map(PathBuf::from)
                .collect(),
            cohort: Some((cohort, "/usr/local/bin/cohort".into())),
            source_date_epoch: 1,
            ..Default::default()
        };
        let first = cohort_oci::build(&spec, &store).unwrap();
        let marker = dir.join("marker.txt");
        std::fs::write(&marker, "only in the second image\n").unwrap();
        let second = cohort_oci::build(
            &BuildSpec {
                files: vec![(marker, "/etc/cohort-second".into())],
                ..spec
            },
            &store,
        )
        .unwrap();
        (store, first, second)
    })
}

/// Serves `registry` over plain HTTP on an ephemeral loopback port; returns the port.
async fn serve(registry: Arc<Registry>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let registry = registry.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let r = registry.respond(req.method(), req.uri().path());
                    async move { Ok::<_, Infallible>(r) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    port
}

/// The answer to one request line (with `Connection: close`), as text.
async fn raw_request(port: u16, line: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(format!("{line}\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    String::from_utf8_lossy(&out)
        .to_lowercase()
        .replace("http/1.1", "HTTP/1.1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_pulls_by_digest_and_only_what_it_lacks() {
    let (store, first, second) = images();
    let service = PodmanService::start();
    let podman = Podman::connect_to(service.socket()).await.unwrap();
    let registry = Arc::new(
        Registry::only(
            store.clone(),
            &[first.manifest_digest.clone(), second.manifest_digest.clone()],
        )
        .unwrap(),
    );
    let port = serve(registry.clone()).await;

    let id = podman
        .pull(&format!("127.0.0.1:{port}/cohort@{}", first.manifest_digest), false)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", service.log()));
    assert_eq!(id, first.image_id(), "podman's image id is the config digest");
    let served = registry.served();
    let expected: BTreeSet<String> = first
        .layers
        .iter()
        .map(|l| l.digest.clone())
        .chain([first.config_digest.clone()])
        .collect();
    assert_eq!(served.digests.iter().cloned().collect::<BTreeSet<_>>(), expected);
    let sizes: u64 =
        first.layers.iter().map(|l| l.size).sum::<u64>() + store.read(&first.config_digest).unwrap().len() as u64;
    assert_eq!(served.blob_bytes, sizes);
    assert!(served.blob_bytes > 1 << 20, "the cohort layer was sent");

    // The second image shares every layer but its last: only that and its config travel.
    let id = podman
        .pull(&format!("127.0.0.1:{port}/cohort@{}", second.manifest_digest), false)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", service.log()));
    assert_eq!(id, second.image_id());
    let new_layer = second.layers.last().unwrap();
    assert!(
        !first.layers.contains(new_layer),
        "the test's images differ in their top layer"
    );
    let after = registry.served();
    let sent: BTreeSet<String> = after.digests[served.digests.len()..].iter().cloned().collect();
    assert_eq!(
        sent,
        [new_layer.digest.clone(), second.config_digest.clone()]
            .into_iter()
            .collect()
    );
    let second_bytes = after.blob_bytes - served.blob_bytes;
    assert_eq!(
        second_bytes,
        new_layer.size + store.read(&second.config_digest).unwrap().len() as u64
    );
    assert!(second_bytes < 64 << 10, "{second_bytes} bytes for one small file");

    assert!(podman.image_exists(first.image_id()).await.unwrap());

    // Through hyper, a HEAD keeps the length of what a GET would send, and sends nothing.
    let layer = &first.layers[0];
    let head = raw_request(port, &format!("HEAD /v2/cohort/blobs/{} HTTP/1.1", layer.digest)).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains(&format!("content-length: {}\r\n", layer.size)), "{head}");
    assert!(head.ends_with("\r\n\r\n"), "a body after a HEAD: {head}");
    assert!(
        head.contains(&format!("docker-content-digest: {}\r\n", layer.digest)),
        "{head}"
    );
    assert!(podman.image_exists(second.image_id()).await.unwrap());

    // A digest the registry does not serve fails with podman's reason.
    let missing = format!("sha256:{}", "0".repeat(64));
    let err = podman
        .pull(&format!("127.0.0.1:{port}/cohort@{missing}"), false)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("pulling") && err.contains(&missing), "{err}");
}

fn launch(run_id: &str, image: &BuiltImage, port: u16, token: &str) -> WorkerLaunch {
    WorkerLaunch {
        run_id: run_id.into(),
        image_digest: image.manifest_digest.clone(),
        image_id: image.image_id().into(),
        controller_port: port,
        token: Secret::new(token),
        network: NetworkMode::Private,
        memory_bytes: Some(256 << 20),
        pids_limit: Some(128),
    }
}

async fn host(service: &PodmanService, name: &str, slots: usize) -> FleetHost {
    FleetHost {
        name: name.into(),
        podman: Podman::connect_to(service.socket()).await.unwrap(),
        slots,
        controller_ip: None,
    }
}

/// The stderr of container `id` once it holds `needle` (60 s at most).
async fn logs_until(podman: &Podman, id: &str, needle: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let (_, err) = podman.logs(id).await.unwrap();
        let err = String::from_utf8_lossy(&err).into_owned();
        if err.contains(needle) {
            return err;
        }
        assert!(std::time::Instant::now() < deadline, "no {needle:?} in the log: {err}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Waits (60 s at most) until no container of `run` is left on `podman`.
async fn gone(podman: &Podman, run: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while left(podman, run).await.0 > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "run {run}'s containers are still there"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Worker containers and the secrets of `run` on `podman`.
async fn left(podman: &Podman, run: &str) -> (usize, Vec<String>) {
    let containers = podman.list_containers(&[("cohort.run", run)]).await.unwrap().len();
    let secrets = podman
        .list_secrets()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.spec.name)
        .filter(|n| n.starts_with(&format!("cohort-worker-{run}-")))
        .collect();
    (containers, secrets)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_starts_workers_without_mounts_or_token_and_stops_them() {
    let (store, first, second) = images();
    let service = PodmanService::start();
    let podman = Podman::connect_to(service.socket()).await.unwrap();
    let registry = Arc::new(Registry::only(store.clone(), std::slice::from_ref(&first.manifest_digest)).unwrap());
    // The registry is where the controller would listen: the pull works, and the workers
    // (HTTPS to a plain-HTTP server, on a bridge network) reach no controller.
    let port = serve(registry.clone()).await;
    // A token of the right form (no controller has it): the workers read it, then keep trying
    // to reach a controller, which is plain HTTP here, until they are stopped.
    let token = &*format!(
        "cohort-worker.{}.cohort-test-token-5f2c9a81d7e3-0000000000",
        "ab".repeat(32)
    );

    let fleet = Fleet::start(vec![host(&service, "box", 2).await], &launch("r1", first, port, token))
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", service.log()));
    assert!(registry.served().blob_gets > 0, "the host pulled the image");
    let placement = fleet.placement();
    let names: Vec<&str> = placement.iter().map(|p| p.container.as_str()).collect();
    assert_eq!(names, ["cohort-worker-r1-box-0", "cohort-worker-r1-box-1"]);
    assert!(placement.iter().all(|p| p.host == "box"));
    let listed = podman
        .list_containers(&[("cohort", "worker"), ("cohort.run", "r1")])
        .await
        .unwrap();
    assert_eq!(listed.len(), 2);
    for p in &placement {
        let raw = podman.inspect_container_raw(&p.id).await.unwrap();
        let text = raw.to_string();
        assert!(!text.contains(token), "the token is in inspect: {text}");
        assert_eq!(raw["Config"]["Labels"]["cohort.host"], "box");
        assert_eq!(raw["Config"]["Labels"]["cohort.run"], "r1");
        assert_eq!(raw["Config"]["Labels"]["cohort"], "worker");
        assert_eq!(raw["Mounts"], serde_json::json!([]), "{text}");
        let binds = &raw["HostConfig"]["Binds"];
        assert!(binds.is_null() || binds == &serde_json::json!([]), "{binds}");
        assert_eq!(raw["HostConfig"]["Privileged"], false);
        let restart = raw["HostConfig"]["RestartPolicy"]["Name"].as_str().unwrap_or("");
        assert!(restart.is_empty() || restart == "no", "{restart}");
        assert_eq!(raw["HostConfig"]["Memory"], 256 << 20);
        let cmd = raw["Config"]["Cmd"].to_string();
        let n = p.container.rsplit('-').next().unwrap();
        assert!(
            cmd.contains("\"worker\"") && cmd.contains(&format!("\"box/{n}\"")) && cmd.contains(&format!(":{port}\"")),
            "{cmd}"
        );
        assert_eq!(raw["Image"], first.image_id(), "the container runs the pulled image");
        assert_eq!(raw["HostConfig"]["AutoRemove"], true, "podman deletes it once it exits");
    }
    // `cohort worker` read the token from its file: with none, or a bad one, it would have
    // exited (2) instead of saying where it takes jobs from.
    let worker = &placement[0].id;
    let err = logs_until(&podman, worker, "taking jobs from https://").await;
    assert!(!err.contains(token), "{err}");
    assert_eq!(left(&podman, "r1").await.1, [fleet::secret_name("r1", "box")]);

    // The token file is root's: the worker, which starts as the container's root, reads it;
    // the image user, which the worker drops to (and runs agents as), cannot.
    for (user, readable) in [("0:0", true), ("1000:1000", false)] {
        let probe = podman
            .create_container(&ContainerSpec {
                image: first.image_id().into(),
                // The image has a shell, not cat.
                command: Some(vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    format!(
                        "IFS= read -r t < {} || [ -n \"$t\" ] || exit 9; printf %s \"$t\"",
                        fleet::TOKEN_FILE
                    ),
                ]),
                user: Some(user.into()),
                secret_files: vec![fleet::token_file(&fleet::secret_name("r1", "box"), (0, 0))],
                userns: Some(UsernsMode::Auto),
                network: NetworkMode::None,
                ..Default::default()
            })
            .await
            .unwrap();
        podman.start_container(&probe).await.unwrap();
        let code = podman.wait_container(&probe).await.unwrap();
        let (out, _) = podman.logs(&probe).await.unwrap();
        let out = String::from_utf8_lossy(&out);
        if readable {
            assert_eq!((code, out.trim()), (0, token), "as {user}");
        } else {
            assert!(code != 0 && out.is_empty(), "as {user}: {code} {out}");
        }
        podman.remove_container(&probe, true).await.unwrap();
    }

    // Stopping kills the workers and removes the secret at once; podman deletes the
    // containers in its own time.
    fleet.stop().await.unwrap();
    assert_eq!(left(&podman, "r1").await.1, Vec::<String>::new());
    gone(&podman, "r1").await;

    // A crashed run's leftovers go by label and name; the image is there: no pull.
    let before = registry.served().blob_gets;
    let crashed = Fleet::start(vec![host(&service, "box", 2).await], &launch("r2", first, port, token))
        .await
        .unwrap();
    assert_eq!(registry.served().blob_gets, before, "the host had the image");
    drop(crashed);
    assert_eq!(left(&podman, "r2").await.0, 2);
    assert_eq!(Fleet::cleanup_run(&podman, "r2").await.unwrap(), 2);
    assert_eq!(left(&podman, "r2").await, (0, vec![]));

    // A worker that ends on its own (here: with a token it cannot read) is deleted by podman;
    // stopping its fleet then finds nothing to kill and removes the secret.
    let bad = Fleet::start(
        vec![host(&service, "box", 1).await],
        &launch("r4", first, port, "not-a-worker-token"),
    )
    .await
    .unwrap();
    gone(&podman, "r4").await;
    bad.stop().await.unwrap();
    assert_eq!(left(&podman, "r4").await, (0, vec![]));

    // A host that cannot pull: the error names it and the port, and nothing is left.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = Fleet::start(
        vec![host(&service, "far", 1).await],
        &launch("r3", second, closed, token),
    )
    .await
    .err()
    .unwrap();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("worker host far") && msg.contains(&format!("port {closed}")) && msg.contains("reachable"),
        "{msg}"
    );
    assert!(!msg.contains(token));
    assert_eq!(left(&podman, "r3").await, (0, vec![]));
}
