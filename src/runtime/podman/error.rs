//! Errors of the podman client; each says what to do where there is something to do.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum PodmanError {
    #[error(
        "no podman socket found (tried {}); start one with `systemctl --user enable --now podman.socket` \
         (as root: `systemctl enable --now podman.socket`), or point CONTAINER_HOST=unix:///path/to/podman.sock at one",
        .tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    NoSocket { tried: Vec<PathBuf> },
    #[error("CONTAINER_HOST={0} is not supported: only unix:///path sockets are")]
    UnsupportedHost(String),
    #[error("cannot connect to podman socket {path}: {source}; is the service running? (`systemctl --user enable --now podman.socket`)")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("podman API {version} is too old: libpod API 4.0 or newer is needed")]
    TooOld { version: String },
    #[error("podman {method} {path}: HTTP {status}: {message}")]
    Api {
        method: String,
        path: String,
        status: u16,
        message: String,
    },
    #[error("podman HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("podman request: {0}")]
    Request(#[from] hyper::http::Error),
    #[error("podman response JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("podman protocol: {0}")]
    Protocol(String),
    #[error("podman endpoint {0}")]
    Endpoint(String),
    /// Anything on the way to a remote podman: TCP connect, ssh login, host key, channel.
    #[error("{endpoint}: {message}")]
    Remote { endpoint: String, message: String },
}

impl PodmanError {
    /// True for an API 404 (no such container, image or exec session).
    pub fn is_not_found(&self) -> bool {
        matches!(self, PodmanError::Api { status: 404, .. })
    }
}

pub type Result<T, E = PodmanError> = std::result::Result<T, E>;

pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> PodmanError {
    let context = context.into();
    move |source| PodmanError::Io { context, source }
}
