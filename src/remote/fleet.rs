//! Worker containers on podman hosts: each host pulls the run's image by digest from the
//! controller's registry (`/v2/`, see `registry`), gets the worker token as a podman secret,
//! and runs one `cohort worker` container per slot.
//!
//! A worker container has no bind mounts (it works in its own filesystem and talks to the
//! controller over HTTPS), no privileges, no restart policy, and the `[container]` limits.
//! The token is a podman secret given as a file ([`TOKEN_FILE`], root's, mode 0400): the
//! worker starts as the container's root (an unprivileged user on the host, in its own user
//! namespace), reads it, and drops to the image's user before it takes any job (`cohort
//! worker --token-file --user`). The agents it runs are that user too, and cannot read the
//! file; the worker makes itself non-dumpable, so they cannot read its memory either. The
//! token is neither in the create spec nor in `inspect` (podman's `type=env` secrets are:
//! podman 4.3's `inspect` shows their values in `Config.Env` once the container runs). The
//! secret is removed with the containers.
//!
//! Worker containers are podman's auto-remove kind (`--rm`): however a worker ends (the run
//! is over, it was stopped, it crashed, or it gave up on a controller that went away), podman
//! deletes its container and its files. A run's end SIGKILLs its workers and does not wait
//! for podman's deletion: that is latency (podman 4.3 takes ~0.2 s per container to notice
//! the exit and clean up), not work cohort has to see finished. A container that was created
//! but never started is removed outright.
//!
//! All of a run's workers start before its first task and go after its last. Starting them
//! while the first ones work, and removing each as the run's tail no longer needed it, were
//! tried: on the simulated hosts (podman 4.3, netavark 1.4), a container starting or
//! stopping next to a working worker cut that worker's new connections to the controller
//! for over 10 s, long enough to lose tasks to the heartbeat timeout. That matches the bug
//! netavark 1.9 fixed (containers/netavark#833): a Linux bridge takes the lowest MAC address
//! of its ports, so a veth coming or going can move it, and the containers' ARP entries for
//! their gateway point at nothing until they expire.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use anyhow::{anyhow, Context, Result};

use crate::runtime::podman::runtime::LABEL_RUN;
use crate::runtime::podman::{ContainerSpec, NetworkMode, Podman, SecretFile, UsernsMode};
use crate::secret::Secret;

pub const LABEL_COHORT: &str = "cohort";
pub const LABEL_HOST: &str = "cohort.host";
/// The worker's environment variable for its token (never argv).
pub const TOKEN_ENV: &str = "COHORT_WORKER_TOKEN";
/// Where the token's podman secret appears in a worker container.
pub const TOKEN_FILE: &str = "/run/secrets/cohort-worker-token";
/// The podman secret `secret` as [`TOKEN_FILE`], readable by `user` only (the container's
/// root: see the module's doc).
pub fn token_file(secret: &str, user: (u32, u32)) -> SecretFile {
    SecretFile {
        secret: secret.to_owned(),
        path: TOKEN_FILE.to_owned(),
        uid: user.0,
        gid: user.1,
        mode: 0o400,
    }
}

/// The repository name the controller's registry serves the image under.
pub const IMAGE_NAME: &str = "cohort";
/// How a container on a bridge network reaches its own host (podman writes it into the
/// container's /etc/hosts): the controller, when it runs on the podman host itself.
pub const HOST_GATEWAY_NAME: &str = "host.containers.internal";

/// One podman host and how many workers it runs.
#[derive(Debug, Clone)]
pub struct FleetHost {
    pub name: String,
    pub podman: Podman,
    pub slots: usize,
    /// The controller's address as this host sees it (the address of the controller's
    /// interface towards the host). `None`: loopback, right for a podman reached over a
    /// local unix socket.
    pub controller_ip: Option<IpAddr>,
}

/// What every worker container of a run gets.
#[derive(Clone, Debug)]
pub struct WorkerLaunch {
    pub run_id: String,
    /// The image's manifest digest (`sha256:...`): what hosts pull.
    pub image_digest: String,
    /// The image's id (its config digest's hex, podman's image id): a host that has it
    /// already is not asked to pull, and a pull must end with it.
    pub image_id: String,
    pub controller_port: u16,
    pub token: Secret,
    /// `Private` (bridge) or `Host`. `Host` needs a read-only bind of `/sys` under a
    /// rootful engine's user namespace (see `ContainerSpec::to_body`); `Private` has none.
    pub network: NetworkMode,
    pub memory_bytes: Option<i64>,
    pub pids_limit: Option<i64>,
}

/// One started worker container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub host: String,
    pub container: String,
    pub id: String,
}

/// A host's started workers.
struct Started {
    host: FleetHost,
    secret: String,
    containers: Vec<Placement>,
}

/// The run's worker containers on all hosts.
pub struct Fleet {
    run_id: String,
    hosts: Vec<Started>,
}

/// A name part podman accepts for containers and secrets (`[a-zA-Z0-9_.-]`).
fn name_part(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect()
}

pub fn secret_name(run_id: &str, host: &str) -> String {
    format!("cohort-worker-{}-{}", name_part(run_id), name_part(host))
}

pub fn container_name(run_id: &str, host: &str, n: usize) -> String {
    format!("cohort-worker-{}-{}-{n}", name_part(run_id), name_part(host))
}

/// `ip:port`, bracketed for IPv6.
fn socket_text(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

impl FleetHost {
    fn controller_ip(&self) -> IpAddr {
        self.controller_ip.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
    }

    /// What the host's podman pulls.
    pub fn image_reference(&self, launch: &WorkerLaunch) -> String {
        image_reference(self.controller_ip(), launch)
    }

    pub fn worker_controller_url(&self, launch: &WorkerLaunch) -> String {
        worker_controller_url(self.controller_ip(), launch)
    }
}

/// `IP:PORT/cohort@sha256:...`: the image at the controller's registry.
pub fn image_reference(controller_ip: IpAddr, launch: &WorkerLaunch) -> String {
    let addr = socket_text(&controller_ip.to_string(), launch.controller_port);
    format!("{addr}/{IMAGE_NAME}@{}", launch.image_digest)
}

/// The controller's URL as a worker container sees it: a loopback controller address is
/// the container's own loopback on a bridge network, so there it is the host's name.
pub fn worker_controller_url(controller_ip: IpAddr, launch: &WorkerLaunch) -> String {
    let host = if controller_ip.is_loopback() && launch.network != NetworkMode::Host {
        HOST_GATEWAY_NAME.to_owned()
    } else {
        controller_ip.to_string()
    };
    format!("https://{}", socket_text(&host, launch.controller_port))
}

impl Fleet {
    /// On every host at once: pull the image (unless the host has it), create the token's
    /// secret, create and start the host's slots. When any host fails, what was started on
    /// every host is removed again and the error names each failed host.
    pub async fn start(hosts: Vec<FleetHost>, launch: &WorkerLaunch) -> Result<Fleet> {
        let mut set = tokio::task::JoinSet::new();
        for (i, host) in hosts.into_iter().enumerate() {
            let launch = launch.clone();
            set.spawn(async move {
                let mut started = Started {
                    secret: secret_name(&launch.run_id, &host.name),
                    host,
                    containers: Vec::new(),
                };
                let r = start_host(&mut started, &launch).await;
                (i, started, r)
            });
        }
        let mut done = Vec::new();
        let mut errors = Vec::new();
        while let Some(joined) = set.join_next().await {
            let (i, started, r) = joined.context("a worker host's start panicked")?;
            if let Err(e) = r {
                errors.push(format!("{:#}", e));
            }
            done.push((i, started));
        }
        done.sort_by_key(|(i, _)| *i);
        let fleet = Fleet {
            run_id: launch.run_id.clone(),
            hosts: done.into_iter().map(|(_, s)| s).collect(),
        };
        if errors.is_empty() {
            return Ok(fleet);
        }
        // Removed, not just killed: a container whose start failed may not be running, and
        // then podman's auto-remove never comes.
        if let Err(e) = fleet.end(End::Remove).await {
            tracing::warn!("removing the workers after a failed start: {e:#}");
        }
        Err(anyhow!("{}", errors.join("\n")))
    }

    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// Each worker container: host name, container name and id, in host then slot order.
    pub fn placement(&self) -> Vec<Placement> {
        self.hosts.iter().flat_map(|h| h.containers.iter().cloned()).collect()
    }

    /// End every container and remove each host's secret, on all hosts at once: a running
    /// worker is killed and podman deletes it (auto-remove); one that never started is
    /// removed. One host's failure does not stop the others; the error lists every failure.
    pub async fn stop(self) -> Result<()> {
        self.end(End::Kill).await
    }

    async fn end(self, how: End) -> Result<()> {
        let mut set = tokio::task::JoinSet::new();
        for started in self.hosts {
            set.spawn(async move { stop_host(&started, how).await });
        }
        let mut errors = Vec::new();
        while let Some(joined) = set.join_next().await {
            match joined {
                Ok(r) => errors.extend(r),
                Err(e) => errors.push(format!("a worker host's stop panicked: {e}")),
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(anyhow!("{}", errors.join("\n")))
        }
    }

    /// Remove what a crashed run left on `podman`: its worker containers (by label) and
    /// its token secrets (by name). Returns how many containers were removed.
    pub async fn cleanup_run(podman: &Podman, run_id: &str) -> Result<usize> {
        let found = podman
            .list_containers(&[(LABEL_COHORT, "worker"), (LABEL_RUN, run_id)])
            .await
            .context("cannot list the run's worker containers")?;
        for c in &found {
            remove_worker(podman, &c.id)
                .await
                .with_context(|| format!("cannot remove worker container {}", c.names.join(",")))?;
        }
        let prefix = format!("cohort-worker-{}-", name_part(run_id));
        for s in podman.list_secrets().await.context("cannot list podman secrets")? {
            if s.spec.name.starts_with(&prefix) {
                podman
                    .remove_secret(&s.spec.name)
                    .await
                    .with_context(|| format!("cannot remove podman secret {}", s.spec.name))?;
            }
        }
        Ok(found.len())
    }
}

async fn start_host(started: &mut Started, launch: &WorkerLaunch) -> Result<()> {
    let host = &started.host;
    let name = &host.name;
    let podman = &host.podman;
    let has_image = podman
        .image_exists(&launch.image_id)
        .await
        .with_context(|| format!("worker host {name}: cannot reach its podman"))?;
    if !has_image {
        let reference = host.image_reference(launch);
        let id = podman.pull(&reference, false).await.with_context(|| {
            format!(
                "worker host {name}: pulling {reference} failed; is port {} of {} reachable from that host \
                 (firewall, or the controller listening on another address)?",
                launch.controller_port,
                host.controller_ip()
            )
        })?;
        anyhow::ensure!(
            id.trim_start_matches("sha256:") == launch.image_id.trim_start_matches("sha256:"),
            "worker host {name}: pulled {reference} as image {id}, expected {}",
            launch.image_id
        );
    }
    // A secret of the same name is a leftover of this run's crashed start: replace it.
    podman.remove_secret(&started.secret).await.ok();
    podman
        .create_secret(&started.secret, &launch.token)
        .await
        .with_context(|| format!("worker host {name}: cannot create podman secret {}", started.secret))?;
    let userns = if podman.rootless() {
        // The rootless engine's own user namespace: root in the container is the user.
        UsernsMode::Host
    } else {
        UsernsMode::Auto
    };
    let url = host.worker_controller_url(launch);
    // The worker drops to the user the image runs as; the token file stays root's.
    let image = podman
        .image_inspect_raw(&launch.image_id)
        .await
        .with_context(|| format!("worker host {name}: cannot inspect image {}", launch.image_id))?;
    let user = crate::runtime::podman::runtime::parse_image_user(image["Config"]["User"].as_str().unwrap_or(""))
        .unwrap_or((0, 0));
    // One slot after another: with a host's slots created and started at once, podman 4.3
    // deadlocked (a `userns=auto` create and a start both waiting forever on containers/
    // storage's layer-store lock). Removals stay concurrent, as the local runtime's are.
    for n in 0..host.slots {
        let container = container_name(&launch.run_id, name, n);
        let labels: BTreeMap<String, String> = [
            (LABEL_COHORT, "worker".to_owned()),
            (LABEL_RUN, launch.run_id.clone()),
            (LABEL_HOST, name.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let spec = ContainerSpec {
            name: Some(container.clone()),
            image: launch.image_id.clone(),
            command: Some(vec![
                "cohort".into(),
                "worker".into(),
                "--controller".into(),
                url.clone(),
                "--name".into(),
                format!("{name}/{n}"),
                "--token-file".into(),
                TOKEN_FILE.into(),
                "--user".into(),
                format!("{}:{}", user.0, user.1),
            ]),
            user: Some("0:0".into()),
            secret_files: vec![token_file(&started.secret, (0, 0))],
            // The image's WORKDIR volume would be an anonymous volume on the host: the
            // worker's files stay in its container and go with it.
            ignore_image_volumes: true,
            auto_remove: true,
            userns: Some(userns.clone()),
            network: launch.network,
            memory_bytes: launch.memory_bytes,
            pids_limit: launch.pids_limit,
            labels,
            ..Default::default()
        };
        let id = podman
            .create_container(&spec)
            .await
            .with_context(|| format!("worker host {name}: cannot create container {container}"))?;
        started.containers.push(Placement {
            host: name.clone(),
            container: container.clone(),
            id: id.clone(),
        });
        podman
            .start_container(&id)
            .await
            .with_context(|| format!("worker host {name}: cannot start container {container}"))?;
    }
    Ok(())
}

/// Force-removes a worker container. One that is exiting on its own just then (its worker
/// was told the run is over) makes podman 4.3 answer "container state improper": asked
/// again a moment later, it is gone or stopped and the removal goes through.
async fn remove_worker(podman: &Podman, id: &str) -> Result<(), crate::runtime::podman::PodmanError> {
    let mut tries = 0;
    loop {
        match podman.remove_container(id, true).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) if tries < 10 => {
                tries += 1;
                tracing::debug!("removing worker container {id}: {e}; trying again");
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Ends worker container `id`: SIGKILL, after which podman deletes it. A container that is
/// not running is either on its way out already (it exited, and auto-remove is under way)
/// or was never started, and is removed here.
async fn end_worker(podman: &Podman, id: &str) -> Result<(), crate::runtime::podman::PodmanError> {
    let killed = match podman.kill_container(id, "SIGKILL").await {
        Ok(()) => return Ok(()),
        Err(e) if e.is_not_found() => return Ok(()),
        Err(e) => e,
    };
    match podman.inspect_container(id).await {
        Err(e) if e.is_not_found() => Ok(()),
        Err(e) => Err(e),
        Ok(c) if matches!(c.state.status.as_str(), "created" | "configured") => remove_worker(podman, id).await,
        Ok(c) if c.state.running => Err(killed),
        Ok(_) => Ok(()),
    }
}

/// How a fleet's containers go.
#[derive(Clone, Copy)]
enum End {
    /// [`end_worker`]: killed, and deleted by podman in its own time.
    Kill,
    /// [`remove_worker`]: removed, and waited for.
    Remove,
}

/// Every failure on one host, each naming it. The containers go at once.
async fn stop_host(started: &Started, how: End) -> Vec<String> {
    let name = &started.host.name;
    let podman = &started.host.podman;
    let mut set = tokio::task::JoinSet::new();
    for c in started.containers.clone() {
        let podman = podman.clone();
        set.spawn(async move {
            let ended = match how {
                End::Kill => end_worker(&podman, &c.id).await,
                End::Remove => remove_worker(&podman, &c.id).await,
            };
            ended.map_err(|e| (c.container, e))
        });
    }
    let mut errors = Vec::new();
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(Ok(())) => {}
            Ok(Err((container, e))) => {
                errors.push(format!("worker host {name}: cannot stop container {container}: {e}"))
            }
            Err(e) => errors.push(format!("worker host {name}: stopping a container panicked: {e}")),
        }
    }
    // The containers keep their copy of the secret until podman deletes them.
    if let Err(e) = podman.remove_secret(&started.secret).await {
        errors.push(format!(
            "worker host {name}: cannot remove podman secret {}: {e}",
            started.secret
        ));
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_addresses() {
        assert_eq!(container_name("r1", "build box/2", 0), "cohort-worker-r1-build-box-2-0");
        assert_eq!(secret_name("r1", "a.b"), "cohort-worker-r1-a.b");
        let launch = WorkerLaunch {
            run_id: "r".into(),
            image_digest: format!("sha256:{}", "a".repeat(64)),
            image_id: "b".repeat(64),
            controller_port: 8443,
            token: Secret::new("t"),
            network: NetworkMode::Private,
            memory_bytes: None,
            pids_limit: None,
        };
        assert_eq!(socket_text("::1", 1), "[::1]:1");
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let remote: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(
            image_reference(remote, &launch),
            format!("192.0.2.7:8443/cohort@sha256:{}", "a".repeat(64))
        );
        assert_eq!(
            worker_controller_url(lo, &launch),
            "https://host.containers.internal:8443"
        );
        assert_eq!(worker_controller_url(remote, &launch), "https://192.0.2.7:8443");
        let host_net = WorkerLaunch {
            network: NetworkMode::Host,
            ..launch.clone()
        };
        assert_eq!(worker_controller_url(lo, &host_net), "https://127.0.0.1:8443");
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(worker_controller_url(v6, &host_net), "https://[2001:db8::1]:8443");
        assert!(format!("{launch:?}").contains("***"), "the token never prints");
    }
}
