//! Egress by allow-list: the gateway is also the agents' HTTP proxy.
//!
//! `CONNECT host:port` is tunnelled, and a plain `GET http://host/...` is
//! forwarded, only for a task's token (the proxy password:
//! `http://cohort:<token>@127.0.0.1:PORT`) and only to hosts on the list.
//! Anything else is refused before any name is resolved or any connection
//! made, and reported as a [`GatewayEvent::Refused`].
//!
//! What a tunnel carries (TLS) is not looked into: a client could send a
//! different TLS server name to an allowed host's address (domain fronting).
//! The list decides where connections go, not what is said on them.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::proxy::strip_hop_by_hop;
use super::server::{empty, text, Body};
use super::{GatewayError, GatewayEvent, RefusalReason, Shared, TaskKey};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Hosts agents may reach. An entry is a host name or IP address, compared
/// case-insensitively (`github.com`, `127.0.0.1`, `[::1]`), optionally with a
/// port (`github.com:443`; without one, every port). `*.example.com` allows
/// every subdomain of example.com at any depth, but not example.com itself.
#[derive(Debug, Clone, Default)]
pub struct AllowList {
    entries: Vec<Entry>,
}

#[derive(Debug, Clone)]
struct Entry {
    /// Lowercase, no trailing dot, no brackets; for a wildcard, the part after `*.`.
    host: String,
    subdomains: bool,
    port: Option<u16>,
}

impl AllowList {
    pub fn parse(entries: &[String]) -> Result<AllowList, GatewayError> {
        let entries = entries.iter().map(|e| parse_entry(e)).collect::<Result<_, _>>()?;
        Ok(AllowList { entries })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn allows(&self, host: &str, port: u16) -> bool {
        let host = normal_host(host);
        self.entries.iter().any(|e| {
            let host_ok = if e.subdomains {
                host.strip_suffix(e.host.as_str())
                    .is_some_and(|head| head.len() > 1 && head.ends_with('.'))
            } else {
                host == e.host
            };
            host_ok && e.port.is_none_or(|p| p == port)
        })
    }
}

fn normal_host(host: &str) -> String {
    let h = host.trim();
    let h = h.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(h);
    h.trim_end_matches('.').to_ascii_lowercase()
}

fn parse_entry(entry: &str) -> Result<Entry, GatewayError> {
    let bad = |reason| GatewayError::Allow {
        entry: entry.to_string(),
        reason,
    };
    let e = entry.trim();
    if e.is_empty() {
        return Err(bad("it is empty"));
    }
    if e.contains('/') || e.contains('@') {
        return Err(bad("write a host name (e.g. github.com), not a URL"));
    }
    // `[v6]`, `[v6]:port`, a bare v6 address (several colons), `host`, `host:port`.
    let (host, port) = if let Some(rest) = e.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or_else(|| bad("an unclosed ["))?;
        match after {
            "" => (h, None),
            _ => (h, Some(after.strip_prefix(':').ok_or_else(|| bad("junk after ]"))?)),
        }
    } else if e.matches(':').count() > 1 {
        (e, None)
    } else {
        match e.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (e, None),
        }
    };
    let port = match port {
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => Some(n),
            _ => return Err(bad("the port is not a number from 1 to 65535")),
        },
        None => None,
    };
    let (host, subdomains) = match host.strip_prefix("*.") {
        Some(rest) => (rest, true),
        None => (host, false),
    };
    let host = normal_host(host);
    if host.is_empty() {
        return Err(bad("the host is empty"));
    }
    if host.contains('*') {
        return Err(bad("only a leading *. (every subdomain) is supported"));
    }
    if !host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | ':'))
    {
        return Err(bad("a host name has letters, digits, -, _ and . only"));
    }
    Ok(Entry { host, subdomains, port })
}

/// The token in `Proxy-Authorization: Basic base64(user:token)` (the user name is not checked).
fn proxy_token(headers: &HeaderMap) -> Result<String, RefusalReason> {
    let value = headers.get(header::PROXY_AUTHORIZATION).ok_or(RefusalReason::NoToken)?;
    let value = value.to_str().map_err(|_| RefusalReason::BadToken)?.trim();
    let (scheme, encoded) = value.split_once(' ').ok_or(RefusalReason::BadToken)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(RefusalReason::BadToken);
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| RefusalReason::BadToken)?;
    let decoded = String::from_utf8(decoded).map_err(|_| RefusalReason::BadToken)?;
    let (_user, token) = decoded.split_once(':').ok_or(RefusalReason::BadToken)?;
    Ok(token.to_string())
}

/// The task behind the proxy credentials, or the refusal (407, or 403 for a
/// host not on the list), reported.
fn admit(
    shared: &Shared,
    headers: &HeaderMap,
    host: &str,
    port: u16,
) -> Result<(TaskKey, CancellationToken), Box<Response<Body>>> {
    let found = proxy_token(headers).and_then(|t| shared.task_for(&t).ok_or(RefusalReason::BadToken));
    let (task, revoked) = match found {
        Ok(found) => found,
        Err(reason) => return Err(Box::new(refuse(shared, None, host, port, reason))),
    };
    if !shared.allow.allows(host, port) {
        return Err(Box::new(refuse(
            shared,
            Some(task),
            host,
            port,
            RefusalReason::NotAllowed,
        )));
    }
    Ok((task, revoked))
}

fn refuse(shared: &Shared, task: Option<TaskKey>, host: &str, port: u16, reason: RefusalReason) -> Response<Body> {
    tracing::info!(task = ?task.as_ref().map(ToString::to_string), host, port, ?reason, "refused egress");
    shared.emit(GatewayEvent::Refused {
        task,
        host: host.to_string(),
        port,
        at: SystemTime::now(),
        reason,
    });
    match reason {
        RefusalReason::NotAllowed => text(
            StatusCode::FORBIDDEN,
            format!("cohort: {host}:{port} is not on this run's allow-list ([container] allow)"),
        ),
        RefusalReason::NoToken | RefusalReason::BadToken => {
            let mut r = text(
                StatusCode::PROXY_AUTHENTICATION_REQUIRED,
                "cohort: the proxy needs this task's token (http://cohort:<token>@host:port)".to_string(),
            );
            r.headers_mut().insert(
                header::PROXY_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"cohort\""),
            );
            r
        }
    }
}

/// Connects to an allowed destination, with a time limit.
async fn dial(host: &str, port: u16) -> Result<TcpStream, Box<Response<Body>>> {
    let target = normal_host(host);
    let failed = |why: String| {
        tracing::info!(host, port, "egress connect failed: {why}");
        Box::new(text(
            StatusCode::BAD_GATEWAY,
            format!("cohort: cannot connect to {host}:{port}: {why}"),
        ))
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((target.as_str(), port))).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(e)) => Err(failed(e.to_string())),
        Err(_) => Err(failed("timed out".to_string())),
    }
}

/// `CONNECT host:port`: a tunnel to an allowed host.
pub(crate) async fn connect(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let Some((host, port)) = req
        .uri()
        .authority()
        .map(|a| (a.host().to_string(), a.port_u16().unwrap_or(443)))
    else {
        return text(StatusCode::BAD_REQUEST, "cohort: CONNECT needs host:port".to_string());
    };
    let (task, revoked) = match admit(shared, req.headers(), &host, port) {
        Ok(found) => found,
        Err(refused) => return *refused,
    };
    let mut upstream = match dial(&host, port).await {
        Ok(s) => s,
        Err(failed) => return *failed,
    };
    tracing::debug!(%task, host, port, "tunnel");
    let stop = shared.stop.clone();
    shared.tasks.spawn(async move {
        // The client gets the 200 first, then its connection becomes the tunnel.
        let Ok(upgraded) = hyper::upgrade::on(req).await else {
            return;
        };
        let mut client = TokioIo::new(upgraded);
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
            _ = revoked.cancelled() => {}
            _ = stop.cancelled() => {}
        }
    });
    Response::new(empty())
}

/// An absolute-form request (`GET http://host/...`): forwarded to an allowed host.
pub(crate) async fn plain(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let uri = req.uri().clone();
    if uri.scheme_str() != Some("http") {
        return text(
            StatusCode::BAD_REQUEST,
            "cohort: the proxy forwards http:// only; https goes through CONNECT".to_string(),
        );
    }
    let Some(authority) = uri.authority().cloned() else {
        return text(StatusCode::BAD_REQUEST, "cohort: the request names no host".to_string());
    };
    let (host, port) = (authority.host().to_string(), authority.port_u16().unwrap_or(80));
    let (task, revoked) = match admit(shared, req.headers(), &host, port) {
        Ok(found) => found,
        Err(refused) => return *refused,
    };
    let stream = match dial(&host, port).await {
        Ok(s) => s,
        Err(failed) => return *failed,
    };
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
        Ok(pair) => pair,
        Err(e) => return text(StatusCode::BAD_GATEWAY, format!("cohort: {host}:{port}: {e}")),
    };
    let stop = shared.stop.clone();
    shared.tasks.spawn(async move {
        tokio::select! {
            _ = conn => {}
            _ = revoked.cancelled() => {}
            _ = stop.cancelled() => {}
        }
    });
    let (mut parts, body) = req.into_parts();
    parts.uri = match uri.path_and_query().map(|pq| pq.as_str()).unwrap_or("/").parse::<Uri>() {
        Ok(u) => u,
        Err(_) => return text(StatusCode::BAD_REQUEST, "cohort: a bad path".to_string()),
    };
    strip_hop_by_hop(&mut parts.headers);
    // The allowed host, whatever the client's Host said: on a shared address
    // another Host would reach another site.
    match HeaderValue::from_str(authority.as_str()) {
        Ok(v) => {
            parts.headers.insert(header::HOST, v);
        }
        Err(_) => return text(StatusCode::BAD_REQUEST, "cohort: a bad host".to_string()),
    }
    tracing::debug!(%task, host, port, "plain proxy request");
    match sender.send_request(Request::from_parts(parts, body)).await {
        Ok(answer) => {
            let (mut parts, body) = answer.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, body.map_err(Into::into).boxed_unsync())
        }
        Err(e) => text(StatusCode::BAD_GATEWAY, format!("cohort: {host}:{port}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> AllowList {
        AllowList::parse(&entries.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn exact_hosts_any_case_and_ports() {
        let l = list(&["GitHub.com", "pkgs.internal:8443", "127.0.0.1", "[::1]:80"]);
        assert!(l.allows("github.com", 443));
        assert!(l.allows("GITHUB.COM.", 22));
        assert!(!l.allows("api.github.com", 443));
        assert!(!l.allows("github.com.evil.com", 443));
        assert!(l.allows("pkgs.internal", 8443));
        assert!(!l.allows("pkgs.internal", 443));
        assert!(l.allows("127.0.0.1", 9));
        assert!(l.allows("[::1]", 80));
        assert!(!l.allows("::1", 81));
        assert!(!AllowList::default().allows("github.com", 443));
    }

    #[test]
    fn wildcards_are_subdomains_only() {
        let l = list(&["*.example.com"]);
        assert!(l.allows("a.example.com", 443));
        assert!(l.allows("a.b.Example.com", 443));
        assert!(!l.allows("example.com", 443));
        assert!(!l.allows("badexample.com", 443));
        assert!(!l.allows(".example.com", 443));
    }

    #[test]
    fn bad_entries_are_refused_with_a_reason() {
        for (entry, why) in [
            ("", "it is empty"),
            ("https://github.com", "write a host name (e.g. github.com), not a URL"),
            ("github.com:x", "the port is not a number from 1 to 65535"),
            ("git*.com", "only a leading *. (every subdomain) is supported"),
            ("a b", "a host name has letters, digits, -, _ and . only"),
            ("[::1", "an unclosed ["),
        ] {
            match AllowList::parse(&[entry.to_string()]) {
                Err(GatewayError::Allow { reason, .. }) => assert_eq!(reason, why, "{entry:?}"),
                other => panic!("{entry:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn proxy_credentials() {
        let mut h = HeaderMap::new();
        assert_eq!(proxy_token(&h), Err(RefusalReason::NoToken));
        let b = base64::engine::general_purpose::STANDARD.encode("cohort:tok-1");
        h.insert(header::PROXY_AUTHORIZATION, format!("Basic {b}").parse().unwrap());
        assert_eq!(proxy_token(&h).as_deref(), Ok("tok-1"));
        h.insert(header::PROXY_AUTHORIZATION, "Basic !!!".parse().unwrap());
        assert_eq!(proxy_token(&h), Err(RefusalReason::BadToken));
    }
}
