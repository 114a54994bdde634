//! A read-only OCI distribution endpoint (`/v2/...`) over cohort's image blob store, so a
//! podman host pulls the run's image by digest over its own REST API and fetches only the
//! blobs it lacks (podman checks each blob against its digest, so the content's integrity
//! does not rest on the transport).
//!
//! Only pulls: `GET /v2/`, `GET|HEAD /v2/<name>/manifests/<digest|tag>` and
//! `GET|HEAD /v2/<name>/blobs/<digest>`. Writes get 405, everything else 404 with the
//! distribution spec's error JSON. A [`Registry`] can be limited to the images of one run,
//! so whoever reaches the controller's port cannot read every image the user ever built.
//!
//! Blobs are read whole into memory: cohort's layers are tens of MB at most.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use anyhow::{Context, Result};
use bytes::Bytes;
use cohort_oci::BlobStore;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Response, StatusCode};

pub const API_VERSION_HEADER: &str = "Docker-Distribution-API-Version";
pub const DIGEST_HEADER: &str = "Docker-Content-Digest";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// The distribution spec's limit on a manifest; anything larger is not served as one.
const MAX_MANIFEST: u64 = 4 << 20;

/// The registry over one store, counting what it served.
pub struct Registry {
    store: BlobStore,
    /// `Some`: only these blobs (manifests, configs, layers) are served, and only tags
    /// naming one of these manifests.
    allowed: Option<BTreeSet<String>>,
    blob_bytes: AtomicU64,
    blob_gets: AtomicU64,
    /// Digests of the blobs served by `GET`, in order (the benchmark and tests read it).
    served: Mutex<Vec<String>>,
}

/// What a registry served so far (blob `GET`s only: manifests and `HEAD`s are not counted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Served {
    pub blob_gets: u64,
    pub blob_bytes: u64,
    pub digests: Vec<String>,
}

impl Registry {
    /// Serves every blob in `store` and every tag of its `index.json`.
    pub fn new(store: BlobStore) -> Registry {
        Registry {
            store,
            allowed: None,
            blob_bytes: AtomicU64::new(0),
            blob_gets: AtomicU64::new(0),
            served: Mutex::new(Vec::new()),
        }
    }

    /// Serves only the images whose manifest digests are given: their manifests, configs
    /// and layers. Fails when a manifest is not in the store.
    pub fn only(store: BlobStore, manifests: &[String]) -> Result<Registry> {
        let mut allowed = BTreeSet::new();
        for digest in manifests {
            anyhow::ensure!(is_digest(digest), "{digest} is not a sha256 digest");
            let bytes = store
                .read(digest)
                .with_context(|| format!("image manifest {digest} is not in {}", store.root().display()))?;
            let m: serde_json::Value =
                serde_json::from_slice(&bytes).with_context(|| format!("manifest {digest} is not JSON"))?;
            let blobs = m["config"]["digest"].as_str().into_iter().chain(
                m["layers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|l| l["digest"].as_str()),
            );
            allowed.extend(blobs.map(str::to_owned));
            allowed.insert(digest.clone());
        }
        let mut me = Registry::new(store);
        me.allowed = Some(allowed);
        Ok(me)
    }

    pub fn store(&self) -> &BlobStore {
        &self.store
    }

    /// What was served so far.
    pub fn served(&self) -> Served {
        Served {
            blob_gets: self.blob_gets.load(Ordering::Relaxed),
            blob_bytes: self.blob_bytes.load(Ordering::Relaxed),
            digests: self.served.lock().map(|s| s.clone()).unwrap_or_default(),
        }
    }

    /// Answers one request; `path` is the request's path (a query is ignored).
    pub fn respond(&self, method: &Method, path: &str) -> Response<Full<Bytes>> {
        let path = path.split('?').next().unwrap_or("");
        if method != Method::GET && method != Method::HEAD {
            return error(
                StatusCode::METHOD_NOT_ALLOWED,
                "UNSUPPORTED",
                "this registry is read-only",
            );
        }
        let head = method == Method::HEAD;
        let Some(rest) = path.strip_prefix("/v2") else {
            return error(StatusCode::NOT_FOUND, "NAME_UNKNOWN", "not a registry path");
        };
        if rest.is_empty() || rest == "/" {
            return with_api(Response::builder().status(StatusCode::OK))
                .header(CONTENT_TYPE, "application/json")
                .header(CONTENT_LENGTH, 2)
                .body(Full::new(if head { Bytes::new() } else { Bytes::from_static(b"{}") }))
                .unwrap_or_else(|_| internal());
        }
        let Some(rest) = rest.strip_prefix('/') else {
            return error(StatusCode::NOT_FOUND, "NAME_UNKNOWN", "not a registry path");
        };
        if let Some((name, reference)) = split(rest, "/manifests/") {
            if !is_name(name) {
                return error(StatusCode::NOT_FOUND, "NAME_INVALID", "invalid repository name");
            }
            return self.manifest(name, reference, head);
        }
        if let Some((name, digest)) = split(rest, "/blobs/") {
            if !is_name(name) {
                return error(StatusCode::NOT_FOUND, "NAME_INVALID", "invalid repository name");
            }
            return self.blob(digest, head);
        }
        error(
            StatusCode::NOT_FOUND,
            "UNSUPPORTED",
            "only manifests and blobs are served",
        )
    }

    fn allows(&self, digest: &str) -> bool {
        self.allowed.as_ref().is_none_or(|a| a.contains(digest))
    }

    /// The manifest digest a tag names: `name:tag` in the store's index, or
    /// `localhost/name:tag` (how cohort records its default tags).
    fn resolve_tag(&self, name: &str, tag: &str) -> Option<String> {
        let tags = self.store.tags().ok()?;
        [format!("{name}:{tag}"), format!("localhost/{name}:{tag}")]
            .iter()
            .find_map(|r| tags.get(r).map(|(d, _)| d.clone()))
    }

    fn manifest(&self, name: &str, reference: &str, head: bool) -> Response<Full<Bytes>> {
        let unknown = || {
            error(
                StatusCode::NOT_FOUND,
                "MANIFEST_UNKNOWN",
                "manifest unknown to registry",
            )
        };
        let digest = if is_digest(reference) {
            reference.to_owned()
        } else if is_tag(reference) {
            match self.resolve_tag(name, reference) {
                Some(d) if is_digest(&d) => d,
                _ => return unknown(),
            }
        } else if reference.contains(':') {
            return error(
                StatusCode::BAD_REQUEST,
                "DIGEST_INVALID",
                "only sha256 digests are served",
            );
        } else {
            return error(StatusCode::BAD_REQUEST, "TAG_INVALID", "invalid tag");
        };
        if !self.allows(&digest) {
            return unknown();
        }
        let path = self.store.path(&digest);
        match std::fs::metadata(&path) {
            Ok(m) if m.is_file() && m.len() <= MAX_MANIFEST => {}
            _ => return unknown(),
        }
        let Ok(bytes) = std::fs::read(&path) else {
            return unknown();
        };
        // A config or a small layer is no manifest, even when asked for by its digest.
        let Ok(doc) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            return unknown();
        };
        if doc.get("schemaVersion").is_none() {
            return unknown();
        }
        let media_type = doc["mediaType"].as_str().unwrap_or(OCI_MANIFEST).to_owned();
        ok(bytes.into(), &media_type, &digest, head)
    }

    fn blob(&self, digest: &str, head: bool) -> Response<Full<Bytes>> {
        let unknown = || error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN", "blob unknown to registry");
        if !is_digest(digest) {
            return error(
                StatusCode::BAD_REQUEST,
                "DIGEST_INVALID",
                "only sha256 digests are served",
            );
        }
        if !self.allows(digest) {
            return unknown();
        }
        let path = self.store.path(digest);
        if head {
            return match std::fs::metadata(&path) {
                Ok(m) if m.is_file() => head_ok(m.len(), "application/octet-stream", digest),
                _ => unknown(),
            };
        }
        match std::fs::read(&path) {
            Ok(bytes) => {
                self.blob_gets.fetch_add(1, Ordering::Relaxed);
                self.blob_bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                if let Ok(mut s) = self.served.lock() {
                    s.push(digest.to_owned());
                }
                ok(bytes.into(), "application/octet-stream", digest, false)
            }
            Err(_) => unknown(),
        }
    }
}

/// Podman's image id (the config digest's hex) of the image whose manifest is `manifest`.
pub fn image_id_of(store: &BlobStore, manifest: &str) -> Result<String> {
    anyhow::ensure!(is_digest(manifest), "{manifest} is not a sha256 digest");
    let bytes = store
        .read(manifest)
        .with_context(|| format!("image manifest {manifest} is not in {}", store.root().display()))?;
    let m: serde_json::Value =
        serde_json::from_slice(&bytes).with_context(|| format!("manifest {manifest} is not JSON"))?;
    let config = m["config"]["digest"]
        .as_str()
        .filter(|d| is_digest(d))
        .with_context(|| format!("manifest {manifest} names no sha256 config"))?;
    Ok(config.trim_start_matches("sha256:").to_owned())
}

/// Answers one request over every image in the store at `store` (no counting, no limit to
/// one run's images: for both, keep a [`Registry`] and call its `respond`).
pub fn respond(store: &Path, method: &Method, path: &str) -> Response<Full<Bytes>> {
    if !store.join("blobs").is_dir() {
        return error(StatusCode::NOT_FOUND, "NAME_UNKNOWN", "no image store");
    }
    match BlobStore::open(store) {
        Ok(store) => Registry::new(store).respond(method, path),
        Err(_) => internal(),
    }
}

/// `(name, reference)` around the last `sep`.
fn split<'a>(rest: &'a str, sep: &str) -> Option<(&'a str, &'a str)> {
    let at = rest.rfind(sep)?;
    Some((&rest[..at], &rest[at + sep.len()..]))
}

/// `sha256:` and 64 lowercase hex digits: checked before any path is built from it.
pub fn is_digest(s: &str) -> bool {
    s.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

/// The spec's tag grammar: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
fn is_tag(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || b"._-".contains(c))
}

/// The spec's repository name grammar: `/`-separated components of `[a-z0-9]+` joined by
/// `.`, `_`, `__` or `-`s.
fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.split('/').all(|c| {
            let b = c.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._-".contains(c))
        })
}

fn with_api(b: hyper::http::response::Builder) -> hyper::http::response::Builder {
    b.header(API_VERSION_HEADER, HeaderValue::from_static("registry/2.0"))
}

fn internal() -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    r
}

fn ok(body: Bytes, content_type: &str, digest: &str, head: bool) -> Response<Full<Bytes>> {
    if head {
        return head_ok(body.len() as u64, content_type, digest);
    }
    with_api(Response::builder().status(StatusCode::OK))
        .header(CONTENT_TYPE, content_type)
        .header(CONTENT_LENGTH, body.len())
        .header(DIGEST_HEADER, digest)
        .body(Full::new(body))
        .unwrap_or_else(|_| internal())
}

/// A `HEAD` answer: the length of what a `GET` would send, and no body.
fn head_ok(len: u64, content_type: &str, digest: &str) -> Response<Full<Bytes>> {
    with_api(Response::builder().status(StatusCode::OK))
        .header(CONTENT_TYPE, content_type)
        .header(CONTENT_LENGTH, len)
        .header(DIGEST_HEADER, digest)
        .body(Full::new(Bytes::new()))
        .unwrap_or_else(|_| internal())
}

/// The distribution spec's error body.
fn error(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({"errors": [{"code": code, "message": message}]}).to_string();
    with_api(Response::builder().status(status))
        .header(CONTENT_TYPE, "application/json")
        .header(CONTENT_LENGTH, body.len())
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| internal())
}

#[cfg(test)]
#[path = "registry_tests.rs"]
mod tests;
