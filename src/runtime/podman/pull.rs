//! Pulling an image from a registry, and podman secrets: what a worker host needs (issue #20).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Method;
use serde::Deserialize;

use super::client::{empty, enc, Podman, API_PREFIX};
use super::error::{PodmanError, Result};
use crate::secret::Secret;

/// One line of `images/pull`'s answer stream.
#[derive(Deserialize, Default)]
struct PullLine {
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    images: Option<Vec<String>>,
}

/// `GET /libpod/secrets/json`, one row (subset).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SecretInfo {
    #[serde(rename = "ID", default)]
    pub id: String,
    #[serde(rename = "Spec", default)]
    pub spec: SecretSpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct SecretSpec {
    #[serde(rename = "Name", default)]
    pub name: String,
}

/// The image id a finished pull's lines name, or the error one of them reports.
fn pull_result(reference: &str, body: &[u8]) -> Result<String> {
    let mut id = None;
    // Lines are concatenated JSON values (newline-separated in practice, not guaranteed).
    for line in serde_json::Deserializer::from_slice(body).into_iter::<PullLine>() {
        let line = line?;
        if let Some(e) = line.error.filter(|e| !e.is_empty()) {
            return Err(PodmanError::Protocol(format!("pulling {reference}: {}", e.trim())));
        }
        if let Some(i) = line.id.filter(|i| !i.is_empty()) {
            id = Some(i);
        } else if let Some(i) = line.images.and_then(|v| v.into_iter().next()) {
            id = Some(i);
        }
    }
    id.ok_or_else(|| PodmanError::Protocol(format!("pulling {reference}: podman named no image")))
}

impl Podman {
    /// Pull `reference` (`HOST:PORT/NAME@sha256:...`) unless podman has it already; returns
    /// the image id. `tls_verify = false` also lets podman fall back to plain HTTP: only for a
    /// pull by digest, whose content podman checks against the digest whatever the transport.
    pub async fn pull(&self, reference: &str, tls_verify: bool) -> Result<String> {
        let path = format!(
            "{API_PREFIX}/images/pull?reference={}&tlsVerify={tls_verify}&policy=missing&quiet=false",
            enc(reference)
        );
        // podman answers 200 at once and reports a failure in the stream, so the whole
        // stream is read (it is short: progress lines and the result).
        let body = self.call(Method::POST, &path, empty(), None).await?;
        pull_result(reference, &body)
    }

    /// Create podman secret `name` holding `value` (a podman secret is stored by the engine
    /// and given to a container without being in its create spec or `inspect`).
    pub async fn create_secret(&self, name: &str, value: &Secret) -> Result<()> {
        let path = format!("{API_PREFIX}/secrets/create?name={}&driver=file", enc(name));
        let body = Full::new(Bytes::copy_from_slice(value.expose().as_bytes()))
            .map_err(|never| match never {})
            .boxed();
        self.call(Method::POST, &path, body, Some("application/octet-stream"))
            .await
            .map(|_| ())
    }

    /// Remove secret `name`; one already gone is no error.
    pub async fn remove_secret(&self, name: &str) -> Result<()> {
        let path = format!("{API_PREFIX}/secrets/{}", enc(name));
        match self.call(Method::DELETE, &path, empty(), None).await {
            Err(e) if !e.is_not_found() => Err(e),
            _ => Ok(()),
        }
    }

    /// Every secret podman holds (names and ids; never values).
    pub async fn list_secrets(&self) -> Result<Vec<SecretInfo>> {
        self.get_json(&format!("{API_PREFIX}/secrets/json")).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pull_stream_results() {
        let ok = b"{\"stream\":\"Trying to pull...\\n\"}\n{\"images\":[\"abc\"],\"id\":\"abc\"}\n";
        assert_eq!(pull_result("r", ok).unwrap(), "abc");
        let failed = b"{\"stream\":\"Trying\\n\"}\n{\"error\":\"connection refused\"}\n";
        let e = pull_result("r", failed).unwrap_err().to_string();
        assert!(e.contains("connection refused") && e.contains("pulling r"), "{e}");
        assert!(pull_result("r", b"{\"stream\":\"x\"}").is_err());
    }

    #[test]
    fn secrets_go_by_name_in_the_create_spec() {
        let spec = super::super::ContainerSpec {
            image: "i".into(),
            secret_files: vec![super::super::SecretFile {
                secret: "cohort-secret".into(),
                path: "/run/secrets/t".into(),
                uid: 1000,
                gid: 1000,
                mode: 0o400,
            }],
            ignore_image_volumes: true,
            ..Default::default()
        };
        let v = serde_json::to_value(spec.to_body(false)).unwrap();
        assert_eq!(
            v["secrets"],
            serde_json::json!([{"Source": "cohort-secret", "Target": "/run/secrets/t", "UID": 1000, "GID": 1000, "Mode": 256}])
        );
        assert_eq!(v["image_volume_mode"], "ignore");
        assert!(v.get("env").is_none(), "{v}");
        let v = serde_json::to_value(super::super::ContainerSpec::default().to_body(false)).unwrap();
        assert!(
            v.get("secrets").is_none() && v.get("image_volume_mode").is_none(),
            "{v}"
        );
    }
}
