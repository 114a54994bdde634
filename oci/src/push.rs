//! Push an image from the blob store to a registry over the OCI distribution API.
//!
//! For each blob (layers, then config): `HEAD /v2/<name>/blobs/<digest>`, skipped when the
//! registry has it, else `POST /v2/<name>/blobs/uploads/` and one monolithic
//! `PUT <location>?digest=…`. Then `PUT /v2/<name>/manifests/<tag>` with the manifest's own
//! media type. A `401` answer's `WWW-Authenticate` challenge is met once per request:
//! `Bearer` (a token fetched from the challenge's realm, with Basic credentials when there are
//! some) or `Basic` (the credentials themselves). Credentials come from the caller (see
//! [`crate::auth`]) and are never logged or put in an error message.

use std::fs::File;
use std::time::Duration;

use base64::Engine as _;
use reqwest::blocking::{Body, Client, RequestBuilder, Response};
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode, Url};
use serde_json::Value;

use crate::auth::Credentials;
use crate::blob::BlobStore;
use crate::reference::Reference;

/// What went wrong pushing. Messages name the registry and what to do; never a credential.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("cannot reach the registry at {url}: {reason}{hint}")]
    Unreachable { url: String, reason: String, hint: String },
    #[error("the registry refused {what}: HTTP {status}{detail}")]
    Refused { what: String, status: u16, detail: String },
    #[error(
        "the registry {registry} wants credentials ({what}): log in with `podman login {registry}` \
         (cohort reads containers' auth.json), or check the account may push there"
    )]
    Unauthorized { registry: String, what: String },
    #[error("the image store: {0}")]
    Store(#[from] crate::Error),
    #[error("{0}")]
    Protocol(String),
}

pub type PushResult<T> = std::result::Result<T, PushError>;

/// How to reach the registry.
#[derive(Debug, Clone, Default)]
pub struct PushOptions {
    /// `false`: the registry's certificate is not checked, and plain HTTP is used when it does
    /// not speak TLS at all (a local test registry). `true` (the default): HTTPS, verified.
    pub insecure: bool,
    pub credentials: Option<Credentials>,
}

/// One step, for a progress line.
#[derive(Debug, Clone, Copy)]
pub enum PushEvent<'a> {
    /// A blob: `pushed` when it was uploaded, else the registry had it already.
    Blob { digest: &'a str, size: u64, pushed: bool },
    /// The manifest, stored under the tag.
    Manifest { digest: &'a str, size: u64 },
}

/// What a push did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PushReport {
    pub pushed: usize,
    pub pushed_bytes: u64,
    pub existed: usize,
    pub existed_bytes: u64,
    pub manifest_digest: String,
    /// The config blob's digest: the image id an engine shows after pulling it.
    pub config_digest: String,
    /// `https` or `http`: what the registry was reached with.
    pub scheme: String,
}

/// Pushes the image whose manifest is `manifest_digest` in `store` to `reference`.
pub fn push(
    store: &BlobStore,
    manifest_digest: &str,
    reference: &Reference,
    options: &PushOptions,
    progress: &mut dyn FnMut(PushEvent<'_>),
) -> PushResult<PushReport> {
    let manifest = store.read(manifest_digest)?;
    let parsed: Value = serde_json::from_slice(&manifest).map_err(crate::Error::from)?;
    let media_type = parsed["mediaType"]
        .as_str()
        .unwrap_or("application/vnd.oci.image.manifest.v1+json")
        .to_owned();
    let mut blobs: Vec<(String, u64)> = Vec::new();
    for d in parsed["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(std::iter::once(&parsed["config"]))
    {
        let digest = d["digest"]
            .as_str()
            .ok_or_else(|| PushError::Protocol(format!("manifest {manifest_digest} names a blob without a digest")))?;
        blobs.push((digest.to_owned(), d["size"].as_u64().unwrap_or(0)));
    }
    for (digest, _) in &blobs {
        if !store.contains(digest) {
            return Err(PushError::Protocol(format!(
                "blob {digest} of {manifest_digest} is missing from the image store: build the image again"
            )));
        }
    }

    let mut session = Session::open(reference, options)?;
    let mut report = PushReport {
        manifest_digest: manifest_digest.to_owned(),
        config_digest: blobs.last().map(|(d, _)| d.clone()).unwrap_or_default(),
        scheme: session.base.scheme().to_owned(),
        ..Default::default()
    };
    for (digest, _) in &blobs {
        let size = std::fs::metadata(store.path(digest))
            .map_err(|source| crate::Error::Io {
                path: store.path(digest),
                source,
            })?
            .len();
        let pushed = if session.has_blob(digest)? {
            false
        } else {
            session.upload_blob(store, digest, size)?;
            true
        };
        if pushed {
            report.pushed += 1;
            report.pushed_bytes += size;
        } else {
            report.existed += 1;
            report.existed_bytes += size;
        }
        progress(PushEvent::Blob { digest, size, pushed });
    }
    session.put_manifest(&manifest, &media_type, manifest_digest)?;
    progress(PushEvent::Manifest {
        digest: manifest_digest,
        size: manifest.len() as u64,
    });
    Ok(report)
}

/// One registry conversation: the client, the base URL, and the authorization earned so far.
struct Session<'a> {
    client: Client,
    base: Url,
    reference: &'a Reference,
    credentials: Option<&'a Credentials>,
    authorization: Option<HeaderValue>,
}

/// A request that can be built again (after an auth challenge, with a new header).
type Build<'b> = dyn Fn(&Client) -> PushResult<RequestBuilder> + 'b;

impl<'a> Session<'a> {
    fn open(reference: &'a Reference, options: &'a PushOptions) -> PushResult<Session<'a>> {
        let client = Client::builder()
            .connect_timeout(Duration::from_secs(30))
            // Layers are hundreds of MB: no overall limit (the blocking client's is 30 s).
            .timeout(None)
            .danger_accept_invalid_certs(options.insecure)
            .user_agent(concat!("cohort-oci/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| PushError::Protocol(format!("cannot set up the HTTP client: {e}")))?;
        let mut session = Session {
            client,
            base: base_url("https", &reference.registry)?,
            reference,
            credentials: options.credentials.as_ref(),
            authorization: None,
        };
        // `GET /v2/` first: whether the registry speaks TLS, and it may answer with the
        // challenge every later request would get.
        match session.ping() {
            Ok(()) => Ok(session),
            Err(PushError::Unreachable { .. }) if options.insecure => {
                session.base = base_url("http", &reference.registry)?;
                session.ping()?;
                Ok(session)
            }
            Err(e) => Err(e),
        }
    }

    fn url(&self, path: &str) -> PushResult<Url> {
        self.base
            .join(path)
            .map_err(|e| PushError::Protocol(format!("bad URL path {path:?}: {e}")))
    }

    fn ping(&mut self) -> PushResult<()> {
        let url = self.url("/v2/")?;
        let resp = self.send("the version check (GET /v2/)", &|c| Ok(c.get(url.clone())))?;
        match resp.status() {
            s if s.is_success() => Ok(()),
            s => Err(refused("the version check (GET /v2/)", s, resp)),
        }
    }

    fn has_blob(&mut self, digest: &str) -> PushResult<bool> {
        let url = self.url(&format!("/v2/{}/blobs/{digest}", self.reference.repository))?;
        let what = format!("HEAD blob {digest}");
        let resp = self.send(&what, &|c| Ok(c.head(url.clone())))?;
        match resp.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            s => Err(refused(&what, s, resp)),
        }
    }

    fn upload_blob(&mut self, store: &BlobStore, digest: &str, size: u64) -> PushResult<()> {
        let start = self.url(&format!("/v2/{}/blobs/uploads/", self.reference.repository))?;
        let what = format!("an upload of {digest} (POST)");
        let resp = self.send(&what, &|c| Ok(c.post(start.clone()).header(CONTENT_LENGTH, "0")))?;
        if resp.status() != StatusCode::ACCEPTED {
            let s = resp.status();
            return Err(refused(&what, s, resp));
        }
        let location = resp
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| PushError::Protocol(format!("{what}: the registry gave no Location")))?;
        // Relative (`/v2/…/uploads/<uuid>?_state=…`) or absolute; it may carry a query already.
        let mut put = start
            .join(location)
            .map_err(|e| PushError::Protocol(format!("{what}: bad Location {location:?}: {e}")))?;
        put.query_pairs_mut().append_pair("digest", digest);
        let path = store.path(digest);
        let what = format!("the upload of {digest} (PUT)");
        let resp = self.send(&what, &|c| {
            let file = File::open(&path).map_err(|source| crate::Error::Io {
                path: path.clone(),
                source,
            })?;
            Ok(c.put(put.clone())
                .header(CONTENT_TYPE, "application/octet-stream")
                .header(CONTENT_LENGTH, size)
                .body(Body::sized(file, size)))
        })?;
        match resp.status() {
            StatusCode::CREATED | StatusCode::NO_CONTENT | StatusCode::OK => Ok(()),
            s => Err(refused(&what, s, resp)),
        }
    }

    fn put_manifest(&mut self, manifest: &[u8], media_type: &str, digest: &str) -> PushResult<()> {
        let url = self.url(&format!(
            "/v2/{}/manifests/{}",
            self.reference.repository, self.reference.tag
        ))?;
        let what = format!("the manifest for tag {}", self.reference.tag);
        let resp = self.send(&what, &|c| {
            Ok(c.put(url.clone())
                .header(CONTENT_TYPE, media_type)
                .body(manifest.to_vec()))
        })?;
        if !matches!(
            resp.status(),
            StatusCode::CREATED | StatusCode::OK | StatusCode::ACCEPTED
        ) {
            let s = resp.status();
            return Err(refused(&what, s, resp));
        }
        // The registry hashes what it stored: a different digest means it rewrote the manifest.
        if let Some(got) = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
        {
            if got != digest {
                return Err(PushError::Protocol(format!(
                    "the registry stored the manifest as {got}, not {digest}"
                )));
            }
        }
        Ok(())
    }

    /// Sends the request; on a `401` meets its challenge once and sends it again.
    fn send(&mut self, what: &str, build: &Build<'_>) -> PushResult<Response> {
        let resp = self.send_once(build)?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let challenge = resp
            .headers()
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .unwrap_or_default();
        self.authorization = Some(self.answer(&challenge, what)?);
        let resp = self.send_once(build)?;
        if resp.status() == StatusCode::UNAUTHORIZED || resp.status() == StatusCode::FORBIDDEN {
            return Err(PushError::Unauthorized {
                registry: self.reference.registry.clone(),
                what: what.to_owned(),
            });
        }
        Ok(resp)
    }

    fn send_once(&self, build: &Build<'_>) -> PushResult<Response> {
        let mut req = build(&self.client)?;
        if let Some(a) = &self.authorization {
            req = req.header(AUTHORIZATION, a.clone());
        }
        req.send().map_err(|e| unreachable(&self.base, &e))
    }

    /// The `Authorization` value a challenge asks for.
    fn answer(&self, challenge: &str, what: &str) -> PushResult<HeaderValue> {
        let unauthorized = || PushError::Unauthorized {
            registry: self.reference.registry.clone(),
            what: what.to_owned(),
        };
        let (scheme, params) = parse_challenge(challenge).ok_or_else(unauthorized)?;
        if scheme.eq_ignore_ascii_case("basic") {
            let c = self.credentials.ok_or_else(unauthorized)?;
            return sensitive(&c.basic());
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(PushError::Protocol(format!(
                "the registry asks for {scheme} authentication, which cohort does not speak"
            )));
        }
        let realm = params
            .iter()
            .find(|(k, _)| k == "realm")
            .map(|(_, v)| v.as_str())
            .ok_or_else(|| PushError::Protocol("a Bearer challenge without a realm".into()))?;
        let mut url = Url::parse(realm).map_err(|e| PushError::Protocol(format!("bad token realm {realm:?}: {e}")))?;
        {
            let mut q = url.query_pairs_mut();
            if let Some((_, service)) = params.iter().find(|(k, _)| k == "service") {
                q.append_pair("service", service);
            }
            // The challenge names the scope this request needs; push needs pull and push.
            let scope = params
                .iter()
                .find(|(k, _)| k == "scope")
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| format!("repository:{}:pull,push", self.reference.repository));
            q.append_pair("scope", &scope);
        }
        let mut req = self.client.request(Method::GET, url.clone());
        if let Some(c) = self.credentials {
            req = req.header(AUTHORIZATION, sensitive(&c.basic())?);
        }
        let resp = req.send().map_err(|e| unreachable(&url, &e))?;
        match resp.status() {
            s if s.is_success() => {}
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => return Err(unauthorized()),
            s => return Err(refused("a token request", s, resp)),
        }
        // Read as bytes and parsed here: the crate alone has no reqwest `json` feature.
        let body: Value = resp
            .bytes()
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| PushError::Protocol("the token service answered no JSON".into()))?;
        let token = body["token"]
            .as_str()
            .or(body["access_token"].as_str())
            .ok_or_else(|| PushError::Protocol("the token service answered no token".into()))?;
        sensitive(&format!("Bearer {token}"))
    }
}

fn base_url(scheme: &str, registry: &str) -> PushResult<Url> {
    Url::parse(&format!("{scheme}://{registry}/"))
        .map_err(|e| PushError::Protocol(format!("bad registry address {registry:?}: {e}")))
}

/// A header value marked sensitive (left out of any debug output of the request).
fn sensitive(v: &str) -> PushResult<HeaderValue> {
    let mut h = HeaderValue::from_str(v)
        .map_err(|_| PushError::Protocol("a credential or token is not a valid header value".into()))?;
    h.set_sensitive(true);
    Ok(h)
}

fn unreachable(url: &Url, e: &reqwest::Error) -> PushError {
    use std::error::Error as _;
    let mut reason = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        reason = format!("{reason}: {s}");
        source = s.source();
    }
    let hint = if url.scheme() == "https" {
        "; a registry without a certificate this host trusts, or one that speaks plain HTTP, \
         needs --tls-verify=false"
            .to_owned()
    } else {
        String::new()
    };
    PushError::Unreachable {
        url: format!("{}://{}", url.scheme(), url.authority()),
        reason,
        hint,
    }
}

fn refused(what: &str, status: StatusCode, resp: Response) -> PushError {
    // The distribution API's error body: {"errors":[{"code","message","detail"}]}.
    let text = resp.text().unwrap_or_default();
    let detail = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| {
            let msgs: Vec<String> = v["errors"]
                .as_array()?
                .iter()
                .map(|e| {
                    format!(
                        "{} {}",
                        e["code"].as_str().unwrap_or(""),
                        e["message"].as_str().unwrap_or("")
                    )
                })
                .collect();
            Some(msgs.join("; "))
        })
        .unwrap_or_else(|| text.chars().take(200).collect());
    PushError::Refused {
        what: what.to_owned(),
        status: status.as_u16(),
        detail: if detail.trim().is_empty() {
            String::new()
        } else {
            format!(" ({})", detail.trim())
        },
    }
}

/// `Bearer realm="…",service="…",scope="…"` → `("Bearer", [(realm, …), …])`.
/// Values may be quoted (with `\"` escapes) or bare tokens.
pub(crate) fn parse_challenge(header: &str) -> Option<(String, Vec<(String, String)>)> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    if scheme.is_empty() {
        return None;
    }
    let mut params = Vec::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=' && *c != ',')).collect();
        if key.is_empty() {
            break;
        }
        if chars.next() != Some('=') {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            value = std::iter::from_fn(|| chars.next_if(|c| *c != ',')).collect();
        }
        params.push((key.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
    Some((scheme.to_owned(), params))
}

/// Base64 of `user:password`, the `Basic` scheme's value.
pub(crate) fn basic_value(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_challenge() {
        let (scheme, p) = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        )
        .unwrap();
        assert_eq!(scheme, "Bearer");
        assert_eq!(
            p,
            vec![
                ("realm".into(), "https://auth.example/token".into()),
                ("service".into(), "registry.example".into()),
                ("scope".into(), "repository:a/b:pull,push".into()),
            ]
        );
    }

    #[test]
    fn basic_challenge_and_bare_values() {
        let (scheme, p) = parse_challenge(r#"Basic realm="basic-realm""#).unwrap();
        assert_eq!(scheme, "Basic");
        assert_eq!(p, vec![("realm".into(), "basic-realm".into())]);
        let (_, p) = parse_challenge(r#"Bearer realm=x, error="insufficient_scope", a="q\"uote""#).unwrap();
        assert_eq!(p[0], ("realm".into(), "x".into()));
        assert_eq!(p[1], ("error".into(), "insufficient_scope".into()));
        assert_eq!(p[2], ("a".into(), "q\"uote".into()));
        assert!(parse_challenge("").is_none());
    }

    #[test]
    fn basic_value_is_base64() {
        assert_eq!(basic_value("user", "pa:ss"), "Basic dXNlcjpwYTpzcw==");
    }
}
