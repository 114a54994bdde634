//! The runtime of a run that serves workers (`--listen`, `--host`, `[run] hosts`): resolved
//! from flags and config, with every host reached before anything changes.

use anyhow::{Context, Result};

use super::run::EngineFlags;
use crate::cli::usage;
use crate::config::{parse_duration, Config};
use crate::git::RepoPaths;

/// The remote runtime when the run serves workers (`--listen`, or `--host`/`[run] hosts`,
/// which start workers on podman hosts): its controller listens and every host answers now,
/// so that a port in use or a host out of reach is a setup error before anything changed.
pub(super) fn remote_runtime(
    paths: &RepoPaths,
    flags: &EngineFlags,
    config: &Config,
) -> Result<Option<crate::remote::runtime::RemoteRuntime>> {
    let empty = Vec::new();
    let specs = crate::remote::hosts::resolve_hosts(&flags.hosts, config.run.hosts.as_ref().unwrap_or(&empty))
        .map_err(|e| usage(e.to_string()))?;
    let listen = match (flags.listen, specs.is_empty()) {
        (Some(l), _) => l,
        (None, false) => std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
        (None, true) => return Ok(None),
    };
    let worker_timeout = match &flags.worker_timeout {
        Some(t) => parse_duration("--worker-timeout", t)?,
        None => std::time::Duration::from_secs(30),
    };
    let settings = crate::remote::controller::ControllerSettings {
        listen,
        repo: paths.common_dir.clone(),
        worker_timeout,
    };
    tokio::task::block_in_place(|| {
        tokio::runtime::Handle::current().block_on(async {
            let hosts = match specs.is_empty() {
                true => None,
                false => Some(fleet_hosts(config, specs).await?),
            };
            crate::remote::runtime::RemoteRuntime::start(settings, hosts).await
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
    let mut hosts = Vec::new();
    for spec in specs {
        let podman = crate::runtime::podman::Podman::connect_endpoint(&spec.endpoint)
            .await
            .with_context(|| format!("--host {}: cannot reach its podman service", spec.name))?;
        hosts.push(crate::remote::fleet::FleetHost {
            name: spec.name,
            controller_ip: podman.local_ip(),
            podman,
            slots: spec.slots,
        });
    }
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
