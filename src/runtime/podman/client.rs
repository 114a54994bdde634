//! The libpod REST calls. One short-lived HTTP/1.1 connection per request: connecting to a
//! unix socket costs microseconds, and it keeps upgraded (hijacked) exec streams independent.
//! Remote services ([`Endpoint`]) are reached the same way: a TCP connection per request, or
//! over ssh a channel per request in one ssh session ([`super::ssh`]).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use futures_util::TryStreamExt;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame as BodyFrame, Incoming};
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use super::endpoint::Endpoint;
use super::error::{io_err, PodmanError, Result};
use super::ssh::SshConn;
use super::transport::Transport;
use super::types::*;

/// Every libpod call is made against this API version (the oldest we support).
pub const API_PREFIX: &str = "/v4.0.0/libpod";

pub(super) type Body = BoxBody<Bytes, std::io::Error>;

/// Where to look for the socket, in order: `CONTAINER_HOST=unix://PATH` alone when set,
/// else `$XDG_RUNTIME_DIR/podman/podman.sock`, then the rootful `/run/podman/podman.sock`.
pub fn socket_candidates(container_host: Option<&str>, xdg_runtime_dir: Option<&str>) -> Result<Vec<PathBuf>> {
    if let Some(host) = container_host.filter(|h| !h.is_empty()) {
        let path = host
            .strip_prefix("unix://")
            .or_else(|| host.strip_prefix("unix:"))
            .ok_or_else(|| PodmanError::UnsupportedHost(host.to_owned()))?;
        return Ok(vec![PathBuf::from(path)]);
    }
    let mut out = Vec::new();
    if let Some(xdg) = xdg_runtime_dir.filter(|x| !x.is_empty()) {
        out.push(Path::new(xdg).join("podman/podman.sock"));
    }
    out.push(PathBuf::from("/run/podman/podman.sock"));
    Ok(out)
}

/// A connected podman service. Clones share the transport (and so one ssh session).
#[derive(Debug, Clone)]
pub struct Podman {
    endpoint: Endpoint,
    transport: Arc<Transport>,
    /// This side's address on the first TCP (or ssh) connection to the host.
    local_ip: Arc<OnceLock<IpAddr>>,
    version: VersionInfo,
    rootless: bool,
}

#[derive(Deserialize)]
struct ApiErrorBody {
    #[serde(default)]
    message: String,
    #[serde(default)]
    cause: String,
}

#[derive(Deserialize)]
pub(super) struct IdBody {
    #[serde(rename = "Id")]
    pub(super) id: String,
}

pub(super) fn empty() -> Body {
    Full::new(Bytes::new()).map_err(|never| match never {}).boxed()
}

pub(super) fn json_body(v: &impl serde::Serialize) -> Result<Body> {
    Ok(Full::new(Bytes::from(serde_json::to_vec(v)?))
        .map_err(|never| match never {})
        .boxed())
}

/// Percent-encode a query value or path segment (RFC 3986 unreserved kept).
pub(super) fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Podman {
    /// Find the socket (see [`socket_candidates`]) and connect.
    pub async fn connect() -> Result<Self> {
        let candidates = socket_candidates(
            std::env::var("CONTAINER_HOST").ok().as_deref(),
            std::env::var("XDG_RUNTIME_DIR").ok().as_deref(),
        )?;
        match candidates.iter().find(|p| p.exists()) {
            Some(p) => Self::connect_to(p).await,
            None => Err(PodmanError::NoSocket { tried: candidates }),
        }
    }

    /// Connect to a given socket: ping it, check the API version, learn whether it is rootless.
    pub async fn connect_to(socket: impl Into<PathBuf>) -> Result<Self> {
        let socket = socket.into();
        if !socket.exists() {
            return Err(PodmanError::NoSocket { tried: vec![socket] });
        }
        Self::handshake(Endpoint::Unix(socket.clone()), Transport::Unix(socket)).await
    }

    /// Connect to a service anywhere: a unix socket here, `tcp://` (plain HTTP, unencrypted
    /// and unauthenticated: for trusted networks only) or `ssh://` (in-process ssh, see
    /// [`super::ssh`]). Then as [`Self::connect_to`].
    pub async fn connect_endpoint(endpoint: &Endpoint) -> Result<Self> {
        let transport = match endpoint {
            Endpoint::Unix(p) => return Self::connect_to(p).await,
            Endpoint::Tcp { host, port } => Transport::Tcp {
                host: host.clone(),
                port: *port,
            },
            Endpoint::Ssh(t) => Transport::Ssh(SshConn::new(t.clone())),
        };
        Self::handshake(endpoint.clone(), transport).await
    }

    /// Ping, check the API version, learn whether the service is rootless.
    async fn handshake(endpoint: Endpoint, transport: Transport) -> Result<Self> {
        let mut me = Podman {
            endpoint,
            transport: Arc::new(transport),
            local_ip: Arc::new(OnceLock::new()),
            version: VersionInfo::default(),
            rootless: false,
        };
        let ping = me.send(Method::GET, "/libpod/_ping", empty(), None).await?;
        let ping = me.check(Method::GET, "/libpod/_ping", ping).await?;
        let api = ping
            .headers()
            .get("Libpod-API-Version")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let major = |v: &str| v.split('.').next().and_then(|m| m.parse::<u32>().ok()).unwrap_or(0);
        if !api.is_empty() && major(&api) < 4 {
            return Err(PodmanError::TooOld { version: api });
        }
        // `/info` has the version too: `/version` is not asked, since podman answers it by
        // running conmon and the OCI runtime (~0.4 s), and every run connects.
        #[derive(Deserialize)]
        struct Info {
            host: InfoHost,
            #[serde(default)]
            version: InfoVersion,
        }
        #[derive(Deserialize)]
        struct InfoHost {
            security: InfoSecurity,
        }
        #[derive(Deserialize)]
        struct InfoSecurity {
            rootless: bool,
        }
        #[derive(Deserialize, Default)]
        struct InfoVersion {
            #[serde(rename = "Version", default)]
            version: String,
            #[serde(rename = "APIVersion", default)]
            api_version: String,
        }
        let info: Info = me.get_json(&format!("{API_PREFIX}/info")).await?;
        // The libpod API version, the one cohort speaks, is the ping's header.
        me.version = VersionInfo {
            api_version: if api.is_empty() { info.version.api_version } else { api },
            version: info.version.version,
        };
        if major(&me.version.api_version) < 4 && major(&me.version.version) < 4 {
            return Err(PodmanError::TooOld {
                version: format!("{} (podman {})", me.version.api_version, me.version.version),
            });
        }
        me.rootless = info.host.security.rootless;
        Ok(me)
    }

    /// The local socket, for a unix endpoint.
    pub fn socket(&self) -> Option<&Path> {
        match &*self.transport {
            Transport::Unix(p) => Some(p),
            _ => None,
        }
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The endpoint for messages: its URI (which holds nothing secret).
    pub fn describe(&self) -> String {
        self.endpoint.to_string()
    }

    /// This side's address on the connection to a remote host (TCP or ssh): the
    /// controller's address as that host sees it. `None` for a unix socket.
    pub fn local_ip(&self) -> Option<IpAddr> {
        self.local_ip.get().copied()
    }

    pub fn version(&self) -> &VersionInfo {
        &self.version
    }

    pub fn rootless(&self) -> bool {
        self.rootless
    }

    // ---- transport ----

    pub(super) async fn open(&self) -> Result<hyper::client::conn::http1::SendRequest<Body>> {
        let stream = self.transport.stream(&self.endpoint, &self.local_ip).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        // Upgrades must be enabled on the connection for exec's hijacked stream.
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        Ok(sender)
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Body,
        content_type: Option<&str>,
    ) -> Result<Response<Incoming>> {
        let mut sender = self.open().await?;
        let mut req = Request::builder().method(method).uri(path).header(HOST, "d");
        if let Some(ct) = content_type {
            req = req.header(CONTENT_TYPE, ct);
        }
        Ok(sender.send_request(req.body(body)?).await?)
    }

    /// Turn a non-success status into [`PodmanError::Api`] with podman's own message.
    pub(super) async fn check(
        &self,
        method: Method,
        path: &str,
        res: Response<Incoming>,
    ) -> Result<Response<Incoming>> {
        let status = res.status();
        if status.is_success() || status == StatusCode::NOT_MODIFIED || status == StatusCode::SWITCHING_PROTOCOLS {
            return Ok(res);
        }
        let body = res.into_body().collect().await?.to_bytes();
        let message = match serde_json::from_slice::<ApiErrorBody>(&body) {
            Ok(e) if !e.message.is_empty() => e.message,
            Ok(e) if !e.cause.is_empty() => e.cause,
            _ => String::from_utf8_lossy(&body).trim().to_owned(),
        };
        Err(PodmanError::Api {
            method: method.to_string(),
            path: path.to_owned(),
            status: status.as_u16(),
            message,
        })
    }

    pub(super) async fn call(
        &self,
        method: Method,
        path: &str,
        body: Body,
        content_type: Option<&str>,
    ) -> Result<Bytes> {
        let res = self.send(method.clone(), path, body, content_type).await?;
        let res = self.check(method, path, res).await?;
        Ok(res.into_body().collect().await?.to_bytes())
    }

    pub(super) async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        Ok(serde_json::from_slice(
            &self.call(Method::GET, path, empty(), None).await?,
        )?)
    }

    /// `GET .../exists`: 204 yes, 404 no.
    pub(super) async fn exists(&self, path: &str) -> Result<bool> {
        match self.call(Method::GET, path, empty(), None).await {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    // ---- images ----

    /// Load an oci-archive (or docker-archive) file; returns the names podman gave it.
    /// The file is streamed, not read into memory (images with codex are hundreds of MB).
    pub async fn load_image(&self, archive: &Path) -> Result<Vec<String>> {
        let file = tokio::fs::File::open(archive)
            .await
            .map_err(io_err(format!("opening {}", archive.display())))?;
        let stream = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20).map_ok(BodyFrame::data);
        let body = BodyExt::boxed(StreamBody::new(stream));
        let path = format!("{API_PREFIX}/images/load");
        let bytes = self.call(Method::POST, &path, body, Some("application/x-tar")).await?;
        #[derive(Deserialize)]
        struct Loaded {
            #[serde(rename = "Names", default)]
            names: Vec<String>,
        }
        Ok(serde_json::from_slice::<Loaded>(&bytes)?.names)
    }

    pub async fn image_exists(&self, name: &str) -> Result<bool> {
        self.exists(&format!("{API_PREFIX}/images/{}/exists", enc(name))).await
    }

    pub async fn image_inspect(&self, name: &str) -> Result<ImageInspect> {
        self.get_json(&format!("{API_PREFIX}/images/{}/json", enc(name))).await
    }

    /// The full image inspect document (e.g. `Config.User`).
    pub async fn image_inspect_raw(&self, name: &str) -> Result<serde_json::Value> {
        self.get_json(&format!("{API_PREFIX}/images/{}/json", enc(name))).await
    }

    /// Export an image as an oci-archive file (the base-image option builds on its layers).
    pub async fn export_image(&self, name: &str, out: &Path) -> Result<()> {
        let path = format!(
            "{API_PREFIX}/images/{}/get?format=oci-archive&compress=false",
            enc(name)
        );
        let res = self.send(Method::GET, &path, empty(), None).await?;
        let mut body = self.check(Method::GET, &path, res).await?.into_body();
        let ctx = || format!("writing {}", out.display());
        let mut file = tokio::fs::File::create(out).await.map_err(io_err(ctx()))?;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                file.write_all(&data).await.map_err(io_err(ctx()))?;
            }
        }
        file.flush().await.map_err(io_err(ctx()))
    }

    pub async fn remove_image(&self, name: &str, force: bool) -> Result<()> {
        let path = format!("{API_PREFIX}/images/{}?force={force}", enc(name));
        self.call(Method::DELETE, &path, empty(), None).await.map(|_| ())
    }

    // ---- containers ----

    /// Create a container; returns its ID. The user namespace defaults from [`Self::rootless`].
    pub async fn create_container(&self, spec: &ContainerSpec) -> Result<String> {
        let path = format!("{API_PREFIX}/containers/create");
        let body = json_body(&spec.to_body(self.rootless))?;
        let bytes = self.call(Method::POST, &path, body, Some("application/json")).await?;
        Ok(serde_json::from_slice::<IdBody>(&bytes)?.id)
    }

    /// Start (a no-op for a running container).
    pub async fn start_container(&self, id: &str) -> Result<()> {
        let path = format!("{API_PREFIX}/containers/{}/start", enc(id));
        self.call(Method::POST, &path, empty(), None).await.map(|_| ())
    }

    pub async fn container_exists(&self, id: &str) -> Result<bool> {
        self.exists(&format!("{API_PREFIX}/containers/{}/exists", enc(id)))
            .await
    }

    pub async fn inspect_container(&self, id: &str) -> Result<ContainerInspect> {
        self.get_json(&format!("{API_PREFIX}/containers/{}/json", enc(id)))
            .await
    }

    /// The full inspect document, for what [`ContainerInspect`] does not carry.
    pub async fn inspect_container_raw(&self, id: &str) -> Result<serde_json::Value> {
        self.get_json(&format!("{API_PREFIX}/containers/{}/json", enc(id)))
            .await
    }

    /// Wait until the container stops and return its exit code, read by inspecting it
    /// afterwards (the authoritative value, whatever the wait endpoint's body says).
    pub async fn wait_container(&self, id: &str) -> Result<i64> {
        let path = format!(
            "{API_PREFIX}/containers/{}/wait?condition=stopped&condition=exited&interval=10ms",
            enc(id)
        );
        let body = self.call(Method::POST, &path, empty(), None).await?;
        // libpod answers the exit code itself; anything else, ask the container's state.
        match std::str::from_utf8(&body)
            .ok()
            .and_then(|b| b.trim().parse::<i64>().ok())
        {
            Some(code) => Ok(code),
            None => Ok(self.inspect_container(id).await?.state.exit_code),
        }
    }

    /// The container's stdout and stderr so far (non-TTY containers).
    pub async fn logs(&self, id: &str) -> Result<(Vec<u8>, Vec<u8>)> {
        let path = format!("{API_PREFIX}/containers/{}/logs?stdout=true&stderr=true", enc(id));
        let bytes = self.call(Method::GET, &path, empty(), None).await?;
        let (mut out, mut err) = (Vec::new(), Vec::new());
        for f in super::stream::demux(&bytes)? {
            match f.stream {
                super::stream::StreamKind::Stderr => err.extend(f.data),
                _ => out.extend(f.data),
            }
        }
        Ok((out, err))
    }

    pub async fn stop_container(&self, id: &str, timeout_secs: u32) -> Result<()> {
        let path = format!("{API_PREFIX}/containers/{}/stop?timeout={timeout_secs}", enc(id));
        self.call(Method::POST, &path, empty(), None).await.map(|_| ())
    }

    pub async fn kill_container(&self, id: &str, signal: &str) -> Result<()> {
        let path = format!("{API_PREFIX}/containers/{}/kill?signal={}", enc(id), enc(signal));
        self.call(Method::POST, &path, empty(), None).await.map(|_| ())
    }

    /// Remove the container (`force` also kills it at once) and its anonymous volumes.
    ///
    /// `timeout=0` with `force`: a PID 1 that ignores SIGTERM (`sleep infinity`, or an agent
    /// killed at its timeout) would make podman's default stop wait its full 10 s before
    /// SIGKILL. Nothing in the container needs a graceful stop (the work is in the
    /// bind-mounted checkout).
    pub async fn remove_container(&self, id: &str, force: bool) -> Result<()> {
        let path = if force {
            format!("{API_PREFIX}/containers/{}?force=true&v=true&timeout=0", enc(id))
        } else {
            format!("{API_PREFIX}/containers/{}?force=false&v=true", enc(id))
        };
        match self.call(Method::DELETE, &path, empty(), None).await {
            Ok(_) => Ok(()),
            // Podman 4.3 with a user namespace sometimes fails to unlink the container's
            // `userdata/shm` (EBUSY) after it has already removed the container: the error is
            // about a leftover empty directory, and the container is gone.
            Err(e) if !e.is_not_found() && !self.container_exists(id).await.unwrap_or(true) => {
                tracing::debug!("container {id} removed, with an error from podman: {e}");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// All containers (running or not) carrying every given `key=value` label.
    pub async fn list_containers(&self, labels: &[(&str, &str)]) -> Result<Vec<ContainerSummary>> {
        let filters = serde_json::json!({
            "label": labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>()
        });
        let path = format!(
            "{API_PREFIX}/containers/json?all=true&filters={}",
            enc(&filters.to_string())
        );
        self.get_json(&path).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_discovery_order() {
        let c = socket_candidates(Some("unix:///tmp/a.sock"), Some("/run/user/1")).unwrap();
        assert_eq!(c, vec![PathBuf::from("/tmp/a.sock")]);
        let c = socket_candidates(None, Some("/run/user/1")).unwrap();
        assert_eq!(
            c,
            vec![
                PathBuf::from("/run/user/1/podman/podman.sock"),
                PathBuf::from("/run/podman/podman.sock")
            ]
        );
        assert!(matches!(
            socket_candidates(Some("ssh://h/x"), None),
            Err(PodmanError::UnsupportedHost(_))
        ));
    }

    #[tokio::test]
    async fn missing_socket_says_how_to_start_one() {
        let err = Podman::connect_to("/nonexistent/podman.sock").await.unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("systemctl --user enable --now podman.socket"), "{msg}");
    }

    #[test]
    fn exec_spec_debug_hides_env_values() {
        let mut s = ExecSpec::new(["codex"]);
        s.env.push("OPENAI_API_KEY=sk-secret".into());
        let d = format!("{s:?}");
        assert!(d.contains("OPENAI_API_KEY") && !d.contains("sk-secret"), "{d}");
    }

    #[test]
    fn create_body_modes() {
        let spec = ContainerSpec {
            image: "i".into(),
            workspace: Some("/w".into()),
            network: NetworkMode::None,
            memory_bytes: Some(1 << 30),
            pids_limit: Some(256),
            ..Default::default()
        };
        let v = serde_json::to_value(spec.to_body(true)).unwrap();
        assert_eq!(v["userns"]["nsmode"], "keep-id");
        assert!(v["userns"].get("value").is_none());
        let mapped = ContainerSpec {
            image_user: Some((1000, 1000)),
            ..spec.clone()
        };
        let v = serde_json::to_value(mapped.to_body(true)).unwrap();
        assert_eq!(v["userns"]["value"], "uid=1000,gid=1000");
        assert_eq!(v["netns"]["nsmode"], "none");
        assert_eq!(v["mounts"][0]["destination"], "/workspace");
        assert_eq!(v["resource_limits"]["pids"]["limit"], 256);
        let v = serde_json::to_value(spec.to_body(false)).unwrap();
        assert_eq!(v["userns"]["nsmode"], "auto");
        // podman 4.3's API makes no user namespace from the nsmode alone.
        assert_eq!(v["idmappings"]["AutoUserNs"], true);
        assert!(v["idmappings"].get("AutoUserNsOpts").is_none());
        let pinned = ContainerSpec {
            userns: Some(UsernsMode::AutoPinned {
                user: (1000, 1001),
                owner: (4321, 4322),
            }),
            ..spec.clone()
        };
        let v = serde_json::to_value(pinned.to_body(false)).unwrap();
        assert_eq!(v["userns"]["nsmode"], "auto");
        assert_eq!(v["idmappings"]["AutoUserNs"], true);
        let opts = &v["idmappings"]["AutoUserNsOpts"];
        assert_eq!(
            opts["AdditionalUIDMappings"],
            serde_json::json!([{"container_id": 1000, "host_id": 4321, "size": 1}])
        );
        assert_eq!(
            opts["AdditionalGIDMappings"],
            serde_json::json!([{"container_id": 1001, "host_id": 4322, "size": 1}])
        );
        let v = serde_json::to_value(mapped.to_body(true)).unwrap();
        assert!(v.get("idmappings").is_none());
        let host_net = ContainerSpec {
            network: NetworkMode::Host,
            ..spec.clone()
        };
        let v = serde_json::to_value(host_net.to_body(false)).unwrap();
        assert_eq!(v["mounts"][1]["destination"], "/sys", "{v}");
        assert!(v.get("volumes").is_none(), "{v}");
        let cached = ContainerSpec {
            volumes: vec![VolumeMount {
                name: "cohort-cache-x".into(),
                destination: "/workspace/target".into(),
                options: vec!["U".into()],
            }],
            ..spec.clone()
        };
        let v = serde_json::to_value(cached.to_body(false)).unwrap();
        assert_eq!(
            v["volumes"],
            serde_json::json!([{"Name": "cohort-cache-x", "Dest": "/workspace/target", "Options": ["U"]}])
        );
        // Auto-remove only when asked for (a task container is removed by cohort, which
        // reads its exit first).
        assert!(v.get("remove").is_none(), "{v}");
        let removed = ContainerSpec {
            auto_remove: true,
            ..spec.clone()
        };
        let v = serde_json::to_value(removed.to_body(false)).unwrap();
        assert_eq!(v["remove"], true, "{v}");
    }
}
