//! Named volumes: the persistent caches of task containers (`[verify] caches`).

use std::collections::BTreeMap;

use hyper::Method;
use serde::{Deserialize, Serialize};

use super::client::{empty, enc, json_body, Podman, API_PREFIX};
use super::error::Result;

/// `GET /libpod/volumes/{name}/json` (subset).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct VolumeInspect {
    #[serde(rename = "Name", default)]
    pub name: String,
    /// The volume's directory on the engine's host.
    #[serde(rename = "Mountpoint", default)]
    pub mountpoint: String,
    #[serde(rename = "Labels", default)]
    pub labels: Option<BTreeMap<String, String>>,
}

/// libpod's `VolumeCreateOptions` (Go field names, no JSON tags upstream). The labels go in
/// both fields: `Label` is the one every libpod v4 reads, later ones prefer `Labels`.
#[derive(Serialize)]
struct VolumeCreateBody<'a> {
    #[serde(rename = "Name")]
    name: &'a str,
    #[serde(rename = "Label")]
    label: &'a BTreeMap<String, String>,
    #[serde(rename = "Labels")]
    labels: &'a BTreeMap<String, String>,
}

impl Podman {
    pub async fn volume_exists(&self, name: &str) -> Result<bool> {
        self.exists(&format!("{API_PREFIX}/volumes/{}/exists", enc(name))).await
    }

    pub async fn inspect_volume(&self, name: &str) -> Result<VolumeInspect> {
        self.get_json(&format!("{API_PREFIX}/volumes/{}/json", enc(name))).await
    }

    /// Create a named volume (local driver) with these labels.
    pub async fn create_volume(&self, name: &str, labels: &BTreeMap<String, String>) -> Result<VolumeInspect> {
        let path = format!("{API_PREFIX}/volumes/create");
        let body = json_body(&VolumeCreateBody {
            name,
            label: labels,
            labels,
        })?;
        let bytes = self.call(Method::POST, &path, body, Some("application/json")).await?;
        Ok(serde_json::from_slice(&bytes)?)
    }

    /// Make sure a named volume exists, creating it with `labels` if not; an existing one is
    /// kept as it is, content and all (that is what a cache is for).
    pub async fn ensure_volume(&self, name: &str, labels: &BTreeMap<String, String>) -> Result<()> {
        if self.volume_exists(name).await? {
            return Ok(());
        }
        match self.create_volume(name, labels).await {
            Ok(_) => Ok(()),
            // Another cohort created it between the check and the create: ask again rather
            // than match the status of that error, which is not the same in every podman.
            Err(e) if self.volume_exists(name).await.unwrap_or(false) => {
                tracing::debug!("volume {name} appeared while creating it: {e}");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Remove a named volume (`force`: also the containers using it).
    pub async fn remove_volume(&self, name: &str, force: bool) -> Result<()> {
        let path = format!("{API_PREFIX}/volumes/{}?force={force}", enc(name));
        self.call(Method::DELETE, &path, empty(), None).await.map(|_| ())
    }
}
