//! The podman client reaching services elsewhere (issue #20), against real things: a
//! disposable podman service listening on TCP on loopback, and one reached through a real
//! sshd on loopback (russh in process, `direct-streamlocal` channels to its unix socket).
//! Needs podman + runc (`fixtures/podman-service.sh install`) and openssh-server.

#[path = "support/podman.rs"]
mod podman_support;
mod support;

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use cohort::runtime::podman::{ContainerSpec, Endpoint, ExecSpec, NetworkMode, Podman, SshTarget};
use cohort_oci::{BlobStore, BuildSpec};
use podman_support::PodmanService;
use support::remotes::SshOrigin;

const TAG: &str = "localhost/cohort-hosts-test:latest";

/// The default cohort image (shell, coreutils, git), as an oci-archive in `dir`.
fn image_archive(dir: &Path) -> PathBuf {
    let store = BlobStore::open(dir.join("store")).unwrap();
    let spec = BuildSpec {
        source_date_epoch: 1_700_000_000,
        compression: 1,
        ..Default::default()
    };
    let image = cohort_oci::build(&spec, &store).unwrap();
    let archive = dir.join("image.tar");
    cohort_oci::write_oci_archive(&store, &image, TAG, &archive, spec.source_date_epoch).unwrap();
    archive
}

fn ssh_target(ssh: &SshOrigin, service: &PodmanService, known_hosts: &Path) -> SshTarget {
    SshTarget {
        user: "root".into(),
        host: "127.0.0.1".into(),
        port: ssh.port,
        socket: service.socket().to_owned(),
        identity: Some(ssh.user_key.clone()),
        known_hosts: Some(known_hosts.to_owned()),
    }
}

/// A container created by the podman CLI in the service's storage, from a scratch image
/// imported from an empty tarball: the client must list what it did not create.
fn cli_container(service: &PodmanService, dir: &Path, name: &str) {
    let tar = dir.join("empty.tar");
    let ok = std::process::Command::new("tar")
        .arg("-cf")
        .arg(&tar)
        .arg("-T")
        .arg("/dev/null")
        .status()
        .unwrap();
    assert!(ok.success());
    for args in [
        vec![
            "import".to_owned(),
            tar.display().to_string(),
            "localhost/empty:1".to_owned(),
        ],
        vec![
            "create".into(),
            "--name".into(),
            name.into(),
            "--label".into(),
            "cohort-hosts-test=1".into(),
            "localhost/empty:1".into(),
            "/nothing".into(),
        ],
    ] {
        let out = service.cli().args(&args).output().unwrap();
        assert!(
            out.status.success(),
            "podman {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_endpoint_answers_and_knows_the_local_address() {
    let tmp = tempfile::tempdir().unwrap();
    let service = PodmanService::start_tcp();
    cli_container(&service, tmp.path(), "made-by-cli");
    let endpoint = Endpoint::parse(&service.tcp_uri()).unwrap();
    let podman = Podman::connect_endpoint(&endpoint).await.unwrap();
    assert!(
        podman.version().version.starts_with(|c: char| c.is_ascii_digit()),
        "{:?}",
        podman.version()
    );
    assert!(!podman.rootless());
    assert_eq!(podman.local_ip(), Some(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    assert_eq!(podman.describe(), service.tcp_uri());
    assert_eq!(podman.socket(), None);
    let listed = podman.list_containers(&[("cohort-hosts-test", "1")]).await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].names, ["made-by-cli"]);
    assert!(podman
        .list_containers(&[("cohort-hosts-test", "2")])
        .await
        .unwrap()
        .is_empty());
    assert!(podman.image_exists("localhost/empty:1").await.unwrap());

    // Nothing listening: the error names the endpoint and says what to start.
    drop(service);
    let e = Podman::connect_endpoint(&endpoint).await.unwrap_err().to_string();
    assert!(
        e.contains(&endpoint.to_string()) && e.contains("podman system service tcp://"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_endpoint_runs_containers_over_one_session() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = image_archive(tmp.path());
    let service = PodmanService::start();
    let ssh = SshOrigin::start();
    let target = ssh_target(&ssh, &service, &ssh.known_hosts);
    let endpoint = Endpoint::Ssh(target.clone());
    let podman = Podman::connect_endpoint(&endpoint).await.unwrap();
    assert_eq!(podman.local_ip(), Some(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    assert_eq!(
        podman.describe(),
        format!("ssh://root@127.0.0.1:{}{}", ssh.port, service.socket().display())
    );
    assert!(!podman.describe().contains("ed25519"), "no key path in messages");

    // A streamed upload (the image), an attached exec (an upgraded connection with stdin),
    // and requests in parallel: every one a channel of the same ssh session.
    let names = podman.load_image(&archive).await.unwrap();
    assert!(names.iter().any(|n| n == TAG), "{names:?}");
    let id = podman
        .create_container(&ContainerSpec {
            image: TAG.into(),
            network: NetworkMode::None,
            ..Default::default()
        })
        .await
        .unwrap();
    podman.start_container(&id).await.unwrap();
    let mut exec = ExecSpec::new(["sh", "-c", "cat; echo done >&2"]);
    exec.stdin = true;
    let exec_id = podman.exec_create(&id, &exec).await.unwrap();
    let mut session = podman.exec_start(&exec_id, false).await.unwrap();
    session.write_stdin(b"through ssh\n").await.unwrap();
    session.close_stdin().await.unwrap();
    let (out, err) = session.collect().await.unwrap();
    assert_eq!(
        (out.as_slice(), err.as_slice()),
        (&b"through ssh\n"[..], &b"done\n"[..])
    );
    assert_eq!(podman.exec_exit_code(&exec_id).await.unwrap(), 0);
    let many = (0..8).map(|_| {
        let p = podman.clone();
        let id = id.clone();
        tokio::spawn(async move { p.inspect_container(&id).await })
    });
    for h in many {
        assert!(h.await.unwrap().unwrap().state.running);
    }
    podman.remove_container(&id, true).await.unwrap();
    let logins = ssh.log().matches("Accepted publickey").count();
    assert_eq!(logins, 1, "one ssh login for all requests: {}", ssh.log());

    // A socket that is not there: the channel is refused with a hint.
    let mut missing = target.clone();
    missing.socket = tmp.path().join("no.sock");
    let e = Podman::connect_endpoint(&Endpoint::Ssh(missing))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("refused a channel") && e.contains("no.sock"), "{e}");

    // A key the server does not accept: refused, saying which key was tried.
    let mut wrong_user = target.clone();
    wrong_user.identity = Some(ssh.wrong_key.clone());
    let e = Podman::connect_endpoint(&Endpoint::Ssh(wrong_user))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("login as root refused") && e.contains("wrong_ed25519"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_refuses_unknown_and_changed_host_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let service = PodmanService::start();
    let ssh = SshOrigin::start();

    let empty = tmp.path().join("known_hosts_empty");
    std::fs::write(&empty, "").unwrap();
    let e = Podman::connect_endpoint(&Endpoint::Ssh(ssh_target(&ssh, &service, &empty)))
        .await
        .unwrap_err()
        .to_string();
    let fix = format!("ssh-keyscan -p {} 127.0.0.1 >> {}", ssh.port, empty.display());
    assert!(
        e.contains("is not in") && e.contains("SHA256:") && e.contains(&fix),
        "{e}"
    );
    assert_eq!(std::fs::read_to_string(&empty).unwrap(), "", "never learnt");

    // Another ed25519 key recorded for the host: a changed key, refused.
    let other = std::fs::read_to_string(ssh.wrong_key.with_extension("pub")).unwrap();
    let other: Vec<&str> = other.split_whitespace().take(2).collect();
    let changed = tmp.path().join("known_hosts_changed");
    std::fs::write(&changed, format!("[127.0.0.1]:{} {}\n", ssh.port, other.join(" "))).unwrap();
    let e = Podman::connect_endpoint(&Endpoint::Ssh(ssh_target(&ssh, &service, &changed)))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("HAS CHANGED") && e.contains("ssh-keygen -R") && e.contains(":1"),
        "{e}"
    );

    // The right key under the port-22 name does not vouch for another port.
    let host = std::fs::read_to_string(&ssh.known_hosts).unwrap();
    let key = host.split_once(' ').unwrap().1;
    let wrong_port = tmp.path().join("known_hosts_port22");
    std::fs::write(&wrong_port, format!("127.0.0.1 {key}")).unwrap();
    let e = Podman::connect_endpoint(&Endpoint::Ssh(ssh_target(&ssh, &service, &wrong_port)))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("is not in"), "{e}");
    assert_eq!(ssh.log().matches("Accepted publickey").count(), 0, "{}", ssh.log());
}
