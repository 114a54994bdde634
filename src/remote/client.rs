//! A worker's HTTPS client: one connection per request (they are few and small, except the
//! job and the result), each pinned to the controller's certificate.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::token::WorkerToken;
use super::{RemoteError, TUNNEL};

pub struct Client {
    /// `host:port` of the controller.
    authority: String,
    tls: TlsConnector,
    token: WorkerToken,
}

impl Client {
    /// `controller` is `https://HOST:PORT`.
    pub fn new(controller: &str, token: WorkerToken) -> Result<Client, RemoteError> {
        let authority = controller
            .strip_prefix("https://")
            .map(|a| a.trim_end_matches('/'))
            .filter(|a| !a.is_empty() && !a.contains('/'))
            .ok_or_else(|| RemoteError::Usage(format!("--controller {controller}: give it as https://HOST:PORT")))?;
        Ok(Client {
            authority: authority.to_string(),
            tls: TlsConnector::from(super::tls::pinned_client(&token.fingerprint)?),
            token,
        })
    }

    pub fn token(&self) -> &WorkerToken {
        &self.token
    }

    async fn connect(&self) -> Result<tokio_rustls::client::TlsStream<TcpStream>, RemoteError> {
        let unreachable = |e: std::io::Error| RemoteError::Unreachable {
            controller: self.authority.clone(),
            reason: e.to_string(),
        };
        let tcp = self.connect_tcp().await.map_err(unreachable)?;
        let _ = tcp.set_nodelay(true);
        // The name is not checked (the certificate is pinned); rustls needs one to send.
        let name = rustls::pki_types::ServerName::try_from("cohort-controller")
            .map_err(|e| RemoteError::Tls(e.to_string()))?;
        self.tls.connect(name, tcp).await.map_err(unreachable)
    }

    /// A TCP connection, in attempts of 1, 2, 3 and 4 s (10 s in all), each from a new port.
    /// On podman hosts with netavark before 1.9 a connect made while containers next to this
    /// one start or stop has gone unanswered for seconds (the bridge's MAC address moves with
    /// its ports: see `fleet`'s module doc); a new socket has often got through where the
    /// kernel's retransmissions of the first, from the same port, did not.
    async fn connect_tcp(&self) -> std::io::Result<TcpStream> {
        for secs in 1..=4 {
            match tokio::time::timeout(Duration::from_secs(secs), TcpStream::connect(&self.authority)).await {
                Ok(Ok(tcp)) => return Ok(tcp),
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    tracing::debug!(
                        controller = self.authority,
                        secs,
                        "no answer to connect; trying from a new port"
                    )
                }
            }
        }
        Err(std::io::ErrorKind::TimedOut.into())
    }

    fn request(&self, path: &str, body: Vec<u8>) -> Result<Request<Full<Bytes>>, RemoteError> {
        Request::post(path)
            .header(hyper::header::HOST, &self.authority)
            .header(hyper::header::AUTHORIZATION, format!("Bearer {}", self.token.bearer()))
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| RemoteError::Protocol(e.to_string()))
    }

    /// POSTs `body` to `path`; the status and the whole answer.
    pub async fn post(&self, path: &str, body: Vec<u8>, timeout: Duration) -> Result<(StatusCode, Bytes), RemoteError> {
        let call = async {
            let stream = self.connect().await?;
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(protocol)?;
            tokio::spawn(conn);
            let resp = send.send_request(self.request(path, body)?).await.map_err(protocol)?;
            let status = resp.status();
            let bytes = resp.into_body().collect().await.map_err(protocol)?.to_bytes();
            Ok((status, bytes))
        };
        tokio::time::timeout(timeout, call)
            .await
            .map_err(|_| RemoteError::Unreachable {
                controller: self.authority.clone(),
                reason: format!("no answer in {}s", timeout.as_secs()),
            })?
    }

    /// A connection to the run's model gateway, through the controller.
    pub async fn tunnel(&self) -> Result<hyper::upgrade::Upgraded, RemoteError> {
        let stream = self.connect().await?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(protocol)?;
        tokio::spawn(conn.with_upgrades());
        let mut req = self.request("/v1/tunnel", Vec::new())?;
        req.headers_mut()
            .insert(hyper::header::UPGRADE, hyper::header::HeaderValue::from_static(TUNNEL));
        req.headers_mut().insert(
            hyper::header::CONNECTION,
            hyper::header::HeaderValue::from_static("upgrade"),
        );
        let resp = send.send_request(req).await.map_err(protocol)?;
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Err(RemoteError::Protocol(format!(
                "the tunnel was refused: {}",
                resp.status()
            )));
        }
        hyper::upgrade::on(resp).await.map_err(protocol)
    }
}

fn protocol(e: impl std::fmt::Display) -> RemoteError {
    RemoteError::Protocol(e.to_string())
}
