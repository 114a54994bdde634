//! The runtime of a run that serves workers (`--listen`, `--host`, `[run] hosts`): resolved
//! from flags and config, with every host reached before anything changes.

use anyhow::{Context, Result};

use super::run::EngineFlags;
use crate::cli::usage;
use crate::config::{parse_duration, Config};
use crate::git::RepoPaths;

/// The podman hosts given: `--host` flags, which replace `[run] hosts`.
pub(super) fn given_hosts(flags: &EngineFlags, config: &Config) -> Option<Vec<String>> {
    match flags.hosts.is_empty() {
        false => Some(flags.hosts.clone()),
        true => config.run.hosts.clone().filter(|h| !h.is_empty()),
    }
}

/// What a run that serves workers keeps for `resume` (see [`remote_runtime`]).
pub(super) fn stored_options(flags: &EngineFlags, config: &Config) -> serde_json::Value {
    serde_json::json!({
        "hosts": given_hosts(flags, config),
        "listen": flags.listen.map(|l| l.to_string()).or(config.run.listen.clone()),
        "worker_timeout": flags.worker_timeout.clone().or(config.run.worker_timeout.clone()),
    })
}

/// The remote runtime when the run serves workers (`--listen`, or `--host`/`[run] hosts`,
/// which start workers on podman hosts): its controller listens and every host answers now,
/// so that a port in use or a host out of reach is a setup error before anything changed.
///
/// Each setting (`--host`/`[run] hosts`, `--listen`/`[run] listen`, `--worker-timeout`/
/// `[run] worker_timeout`) comes from the flags, then config, then what the run was started with
/// (`stored`), so a resumed run keeps its workers. `--runtime` given without `--host` or
/// `--listen` sets the stored ones aside: the tasks left run here.
pub(super) fn remote_runtime(
    paths: &RepoPaths,
    flags: &EngineFlags,
    config: &Config,
    stored: &serde_json::Value,
) -> Result<Option<crate::remote::runtime::RemoteRuntime>> {
    let local = flags.runtime.is_some() && flags.hosts.is_empty() && flags.listen.is_none();
    let hosts = given_hosts(flags, config)
        .or_else(|| match local {
            true => None,
            false => serde_json::from_value(stored["hosts"].clone()).ok(),
        })
        .unwrap_or_default();
    let specs = crate::remote::hosts::resolve_hosts(&hosts, &[]).map_err(|e| usage(e.to_string()))?;
    let configured = match &config.run.listen {
        Some(a) => Some(a.parse::<std::net::SocketAddr>().map_err(|_| {
            usage(format!(
                "[run] listen = {a:?} is not an address; give IP:PORT, e.g. \"0.0.0.0:7443\" (port 0: any free one)"
            ))
        })?),
        None => None,
    };
    let stored_listen = stored["listen"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .filter(|_| !local);
    let listen = match (flags.listen.or(configured).or(stored_listen), specs.is_empty()) {
        (Some(l), _) => l,
        (None, false) => std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
        (None, true) => return Ok(None),
    };
    let worker_timeout = match (&flags.worker_timeout, &config.run.worker_timeout) {
        (Some(t), _) => parse_duration("--worker-timeout", t)?,
        (None, Some(t)) => parse_duration("[run] worker_timeout", t)?,
        _ => match stored["worker_timeout"].as_str() {
            Some(t) => parse_duration("--worker-timeout", t)?,
            None => std::time::Duration::from_secs(30),
        },
    };
    let settings = crate::remote::controller::ControllerSettings {
        listen,
        repo: paths.common_dir.clone(),
        worker_timeout,
    };
    tokio::task::block_in_place(|| {
        tokio::runtime::Handle::current().block_on(async {
            let t0 = std::time::Instant::now();
            let hosts = match specs.is_empty() {
                true => None,
                false => Some(fleet_hosts(config, specs).await?),
            };
            let runtime = crate::remote::runtime::RemoteRuntime::start(settings, hosts).await;
            tracing::debug!(ms = t0.elapsed().as_millis() as u64, "controller listening");
            runtime
        })
    })
    .map(Some)
    .map_err(|e| usage(format!("workers: {e:#}")))
}

/// Connects to every podman host, and finds the image their workers run in cohort's blob
/// store (`cohort image build` puts it there).
async fn fleet_hosts(
    config: &Config,
    specs: Vec<crate::remote::hosts::HostSpec>,
) -> Result<crate::remote::runtime::Hosts> {
    let tag = config
        .image
        .tag
        .clone()
        .unwrap_or_else(|| crate::runtime::podman::DEFAULT_IMAGE.into());
    let store_dir = super::image::image_cache_dir()?.join("blobs");
    let store = cohort_oci::BlobStore::open(&store_dir)?;
    let Some((digest, _)) = store.tags().ok().and_then(|mut t| t.remove(&tag)) else {
        return Err(usage(format!(
            "--host: the workers' image {tag} is not in cohort's image store ({}); build it with `cohort image build`",
            store_dir.display()
        )));
    };
    let image_id = crate::remote::registry::image_id_of(&store, &digest)?;
    // Every host at once: an ssh handshake or a slow service costs its own wait, not a sum.
    let t0 = std::time::Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for (i, spec) in specs.into_iter().enumerate() {
        set.spawn(async move {
            let podman = crate::runtime::podman::Podman::connect_endpoint(&spec.endpoint)
                .await
                .with_context(|| format!("--host {}: cannot reach its podman service", spec.name))?;
            anyhow::Ok((
                i,
                crate::remote::fleet::FleetHost {
                    name: spec.name,
                    controller_ip: podman.local_ip(),
                    podman,
                    slots: spec.slots,
                },
            ))
        });
    }
    let mut hosts = Vec::new();
    while let Some(joined) = set.join_next().await {
        hosts.push(joined.context("connecting to a podman host panicked")??);
    }
    hosts.sort_by_key(|(i, _)| *i);
    let hosts = hosts.into_iter().map(|(_, h)| h).collect::<Vec<_>>();
    tracing::debug!(
        hosts = hosts.len(),
        ms = t0.elapsed().as_millis() as u64,
        "podman hosts connected"
    );
    Ok(crate::remote::runtime::Hosts {
        hosts,
        store,
        image_digest: digest,
        image_id,
        network: crate::runtime::podman::NetworkMode::Private,
        memory_bytes: config.container.memory_bytes()?,
        pids_limit: config.container.pids,
    })
}
