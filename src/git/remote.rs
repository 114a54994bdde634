//! Talking to origin, in-process: the transport as git would configure it from the user's
//! config (https through reqwest with rustls: `http.proxy` and `https_proxy`,
//! `http.sslCAInfo`, `http.sslVerify`, `http.extraHeader`, redirects; ssh through the
//! user's `ssh`, as git does), and the credentials.
//!
//! Credentials come from one of two places:
//! - the service's own keys (`cohort keys place git_token` / `git_ssh_key`), given as
//!   [`Access`]; the token is offered only to origin's host, never after a redirect to
//!   another one;
//! - otherwise the user's git credential configuration (`credential.helper`, and through
//!   the `store` helper `~/.git-credentials`), as git would use it.
//!
//! Errors say which remote and what to do, and never carry a password: URLs are shown
//! without their user info.

use std::any::Any;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use gix::bstr::{BStr, ByteSlice};
use gix::protocol::transport::client::blocking_io::{self as transport, http, Transport};

use crate::secret::Secret;

/// The service's own credentials for origin (none for an interactive run, which uses the
/// user's git credential helpers and ssh agent).
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// An https token for origin's host: sent as the password of basic auth, with the
    /// origin URL's user name, or `x-access-token` (what GitHub and GitLab accept).
    pub token: Option<Secret>,
    /// A deploy key, as an identity file in the service's private runtime directory.
    pub ssh_identity: Option<PathBuf>,
    /// Whether a credential helper that has nothing may ask on the terminal, as git would
    /// (a run from a terminal); never for the service, which has nobody to answer.
    pub prompt: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("origin ({url}) refused cohort's credentials: {fix} (nothing was changed)")]
    Auth { url: String, fix: String },
    #[error("cannot reach origin ({url}): {cause}; check the network and the URL (`git remote -v`), or pass --no-sync to skip the pull (nothing was changed)")]
    Unreachable { url: String, cause: String },
    #[error("cannot {what} origin ({url}): {cause}")]
    Other {
        what: &'static str,
        url: String,
        cause: String,
    },
}

impl RemoteError {
    /// Exit code: credentials are the user's to fix (2); a network that failed may work
    /// on the next try (1).
    pub fn exit_code(&self) -> u8 {
        match self {
            RemoteError::Auth { .. } => 2,
            _ => 1,
        }
    }
}

/// A remote URL fit for messages and the state: no user name or password.
pub fn display_url(url: &gix::Url) -> String {
    let mut u = url.clone();
    u.set_user(None);
    u.set_password(None);
    u.to_bstring().to_string()
}

/// The URL of `origin` for `direction`.
pub fn origin_url(repo: &gix::Repository, direction: gix::remote::Direction) -> Option<gix::Url> {
    let remote = repo.find_remote("origin").ok()?;
    remote.url(direction).cloned()
}

/// A transport to `url`, configured as git would configure it for origin (see
/// [`http_options`]). For push, which drives the transport itself.
pub fn connect(
    repo: &gix::Repository,
    url: &gix::Url,
    access: &Access,
) -> Result<Box<dyn Transport + Send>, RemoteError> {
    let mut t = unconfigured(repo, url, access)?;
    if let Some(options) = http_options(repo, url)? {
        t.configure(&*options)
            .map_err(|e| other("configure the connection to", url, e))?;
    }
    Ok(t)
}

/// A fetch connection to origin: gix's, with our transport options and credentials
/// (gix would otherwise configure the transport from the config alone, dropping the
/// proxy and CA bundle for reqwest).
pub fn fetch_connection<'r>(
    remote: &'r gix::Remote<'r>,
    url: &gix::Url,
    access: &Access,
) -> Result<gix::remote::Connection<'r, 'static, 'r, Box<dyn Transport + Send>>, RemoteError> {
    let repo = remote.repo();
    let t = unconfigured(repo, url, access)?;
    let mut conn = remote
        .to_connection_with_transport(t)
        .with_credentials(authenticate(repo, url, access)?);
    if let Some(options) = http_options(repo, url)? {
        conn = conn.with_transport_options(options);
    }
    Ok(conn)
}

/// The transport to `url` with the protocol version and ssh program git's config names
/// (with the deploy key, when the service has one), not yet given its http options.
fn unconfigured(
    repo: &gix::Repository,
    url: &gix::Url,
    access: &Access,
) -> Result<Box<dyn Transport + Send>, RemoteError> {
    let version = match repo.config_snapshot().integer("protocol.version") {
        Some(0) => gix::protocol::transport::Protocol::V0,
        Some(1) => gix::protocol::transport::Protocol::V1,
        _ => gix::protocol::transport::Protocol::V2,
    };
    let mut opts = transport::connect::Options {
        version,
        ..Default::default()
    };
    if url.scheme == gix::url::Scheme::Ssh {
        opts.ssh = repo
            .ssh_connect_options()
            .map_err(|e| other("configure ssh for", url, e))?;
        if let Some(key) = &access.ssh_identity {
            opts.ssh.command = Some(with_identity(opts.ssh.ssh_command(), key).into());
            opts.ssh.disallow_shell = false;
        }
    }
    transport::connect::connect(url.clone(), opts).map_err(|e| classify("connect to", url, &e))
}

/// The ssh command with the deploy key as its only identity, non-interactive (a service has
/// nobody to answer a host-key or passphrase prompt). The user's `core.sshCommand`, if
/// any, stays the program.
fn with_identity(base: &std::ffi::OsStr, key: &std::path::Path) -> String {
    let quoted = format!("'{}'", key.display().to_string().replace('\'', r"'\''"));
    format!(
        "{} -i {quoted} -o IdentitiesOnly=yes -o BatchMode=yes",
        base.to_string_lossy()
    )
}

/// The http options git's config gives for `url` (none for other schemes), with a reqwest
/// backend that applies the proxy and CA bundle among them.
pub fn http_options(repo: &gix::Repository, url: &gix::Url) -> Result<Option<Box<dyn Any>>, RemoteError> {
    if !matches!(url.scheme, gix::url::Scheme::Http | gix::url::Scheme::Https) {
        return Ok(None);
    }
    let text = url.to_bstring();
    let Some(mut any) = repo
        .transport_options(text.as_bstr(), Some(BStr::new("origin")))
        .map_err(|e| other("configure https for", url, e))?
    else {
        return Ok(None);
    };
    if let Some(o) = any.downcast_mut::<http::Options>() {
        // git takes a proxy without a scheme as http://.
        let proxy = o
            .proxy
            .clone()
            .filter(|p| !p.is_empty())
            .map(|p| match p.contains("://") {
                true => p,
                false => format!("http://{p}"),
            });
        let no_proxy = o.no_proxy.clone();
        let ca = o.ssl_ca_info.clone();
        let verify = o.ssl_verify;
        let configure = move |mut b: reqwest::blocking::ClientBuilder| -> gix::Result<_> {
            // Only what git's configuration and environment name (gix has resolved
            // `http.proxy`, `https_proxy`, `no_proxy`): reqwest's own guess is switched off.
            b = b.no_proxy();
            if let Some(p) = &proxy {
                let mut px = reqwest::Proxy::all(p).map_err(client_error)?;
                if let Some(np) = &no_proxy {
                    px = px.no_proxy(reqwest::NoProxy::from_string(np));
                }
                b = b.proxy(px);
            }
            if let Some(ca) = &ca {
                // git's http.sslCAInfo replaces the trusted roots; so it does here.
                let pem = std::fs::read(ca).map_err(client_error)?;
                let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(client_error)?;
                b = b.tls_certs_only(certs);
            }
            if !verify {
                b = b.tls_danger_accept_invalid_certs(true);
            }
            Ok(b)
        };
        let backend = http::reqwest::Options {
            configure_client: Some(Box::new(configure)),
            configure_request: None,
        };
        o.backend = Some(Arc::new(Mutex::new(backend)));
    }
    Ok(Some(any))
}

fn client_error(e: impl std::error::Error + Send + Sync + 'static) -> gix::Error {
    gix::Error::from_error(e)
}

/// What answers the transport's credential requests: the service's token (for origin's
/// host only), or the user's git credential helpers.
pub type Authenticate =
    Box<dyn FnMut(gix::credentials::helper::Action) -> gix::Result<Option<gix::credentials::protocol::Outcome>> + Send>;

pub fn authenticate(repo: &gix::Repository, url: &gix::Url, access: &Access) -> Result<Authenticate, RemoteError> {
    use gix::credentials::{helper::Action, protocol};
    if let Some(token) = access.token.clone() {
        let host = url.host().map(str::to_owned);
        let user = url.user().map(str::to_owned).unwrap_or_else(|| "x-access-token".into());
        return Ok(Box::new(move |action: Action| {
            let Action::Get(ctx) = action else {
                return Ok(None); // nothing to store or erase: the key store holds it
            };
            let asked = ctx.url.as_ref().and_then(|u| gix::url::parse(u.as_bstr()).ok());
            let same_host = ctx
                .host
                .clone()
                .or_else(|| asked.and_then(|u| u.host().map(str::to_owned)));
            if same_host.map(|h| h.split(':').next().unwrap_or("").to_owned()) != host {
                return Ok(None); // a redirect to another host never gets the token
            }
            Ok(Some(protocol::Outcome {
                identity: gix::sec::identity::Account {
                    username: user.clone(),
                    password: token.expose().to_owned(),
                    oauth_refresh_token: None,
                },
                next: ctx.into(),
            }))
        }));
    }
    let (mut cascade, _, mut prompt) = repo
        .config_snapshot()
        .credential_helpers(url.clone())
        .map_err(|e| other("read the credential configuration for", url, e))?;
    if !access.prompt {
        prompt.mode = gix::prompt::Mode::Disable;
    }
    Ok(Box::new(move |action| cascade.invoke(action, prompt.clone())))
}

/// A failure on the way to origin, sorted into what the user must fix (credentials),
/// what may pass (the network), and the rest.
pub fn classify(what: &'static str, url: &gix::Url, err: &(dyn std::error::Error + 'static)) -> RemoteError {
    let cause = redact(&chain(err), url);
    let mut denied = gix::error::classify(err).is_unauthenticated();
    let mut unreachable = false;
    let mut e: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(cur) = e {
        if let Some(io) = cur.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind as K;
            match io.kind() {
                K::PermissionDenied => denied = true,
                K::ConnectionRefused
                | K::TimedOut
                | K::HostUnreachable
                | K::NetworkUnreachable
                | K::ConnectionReset => unreachable = true,
                _ => {}
            }
        }
        if let Some(r) = cur.downcast_ref::<reqwest::Error>() {
            if r.is_connect() || r.is_timeout() {
                unreachable = true;
            }
        }
        e = cur.source();
    }
    let (by_text_denied, by_text_unreachable) = hints(&cause);
    decide(
        what,
        url,
        cause,
        denied || by_text_denied,
        unreachable || by_text_unreachable,
    )
}

/// A failure known only by its message (a push's, which reports in text).
pub fn classify_message(url: &gix::Url, message: &str) -> RemoteError {
    let cause = redact(message, url);
    let (denied, unreachable) = hints(&cause);
    decide("push to", url, cause, denied, unreachable)
}

/// What ssh and the transports say when credentials or the network failed.
fn hints(cause: &str) -> (bool, bool) {
    let lower = cause.to_lowercase();
    let denied = lower.contains("permission denied (publickey")
        || lower.contains("were not accepted by the remote")
        || lower.contains("authentication failed");
    let unreachable = lower.contains("could not resolve hostname")
        || lower.contains("connection refused")
        || lower.contains("no route to host")
        || lower.contains("network is unreachable");
    (denied, unreachable)
}

fn decide(what: &'static str, url: &gix::Url, cause: String, denied: bool, unreachable: bool) -> RemoteError {
    let shown = display_url(url);
    if denied {
        RemoteError::Auth {
            url: shown,
            fix: auth_fix(url, &cause),
        }
    } else if unreachable {
        RemoteError::Unreachable { url: shown, cause }
    } else {
        RemoteError::Other {
            what,
            url: shown,
            cause,
        }
    }
}

/// How to fix a refused credential, for the kind of URL.
pub fn auth_fix(url: &gix::Url, cause: &str) -> String {
    let fix = match url.scheme {
        gix::url::Scheme::Ssh => {
            "check that ssh can log in with your key (`ssh -T` to the host), or for the service place a \
             deploy key with `cohort keys place git_ssh_key` (see KEYS_GUIDE.md)"
        }
        _ => {
            "fix the credential git uses for this host (`credential.helper`, ~/.git-credentials), or for \
             the service place a token with `cohort keys place git_token` (see KEYS_GUIDE.md)"
        }
    };
    format!("{fix}; the remote said: {}", redact(cause, url))
}

fn other(what: &'static str, url: &gix::Url, e: impl std::fmt::Display) -> RemoteError {
    RemoteError::Other {
        what,
        url: display_url(url),
        cause: redact(&e.to_string(), url),
    }
}

/// An error's whole chain, on one line (a cause already in the text is not repeated).
pub(crate) fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(err);
    while let Some(e) = next {
        let text = e.to_string();
        if !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}

/// Removes `user:password@` (or `user@`) from every URL in `text`.
fn strip_userinfo(text: &str) -> String {
    static USERINFO: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/@\s]*@").expect("a valid regular expression")
    });
    USERINFO.replace_all(text, "$1").into_owned()
}

/// Text a remote sent (its refusal reasons, hook output), fit to print and keep: control
/// characters (a hostile origin's terminal escapes) become U+FFFD, and URLs lose their
/// user info.
pub(crate) fn untrusted_text(text: &str) -> String {
    let printable: String = text
        .chars()
        .map(|c| if c.is_control() { '\u{FFFD}' } else { c })
        .collect();
    strip_userinfo(&printable)
}

/// A failure's text, which may carry what origin said: as [`untrusted_text`], and without
/// `url`'s password wherever it is.
fn redact(text: &str, url: &gix::Url) -> String {
    let mut out = untrusted_text(text);
    if let Some(p) = url.password().filter(|p| !p.is_empty()) {
        out = out.replace(p, "***");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_shown_without_credentials() {
        let url = gix::url::parse(gix::bstr::BStr::new("https://user:s3cret@example.com/o/r.git")).unwrap();
        assert_eq!(display_url(&url), "https://example.com/o/r.git");
        let msg = redact("failed for https://user:s3cret@example.com/o/r.git (s3cret)", &url);
        assert!(!msg.contains("s3cret"), "{msg}");
        let said = untrusted_text("\x1b]0;owned\x07denied\r\nby https://u:p@h/x");
        assert_eq!(said, "\u{FFFD}]0;owned\u{FFFD}denied\u{FFFD}\u{FFFD}by https://h/x");
    }

    #[test]
    fn the_deploy_key_is_the_only_identity() {
        let cmd = with_identity("ssh".as_ref(), std::path::Path::new("/run/cohort/git ssh'key"));
        assert_eq!(
            cmd,
            r"ssh -i '/run/cohort/git ssh'\''key' -o IdentitiesOnly=yes -o BatchMode=yes"
        );
    }
}
