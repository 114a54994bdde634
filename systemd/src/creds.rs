//! Encrypted credentials through systemd's own Varlink service, `io.systemd.Credentials`.
//!
//! This is the in-process equivalent of `systemd-creds encrypt/decrypt`: the secret goes
//! over a unix socket to `systemd-creds --varlink` (socket-activated by systemd), which
//! seals it with the host key and/or the TPM2. We never shell out, so the plaintext never
//! appears in an argv or a pipe to a child.
//!
//! Versions (from systemd's NEWS and `varlink-io.systemd.Credentials.c`):
//! - 256 added the Varlink service with `Encrypt`/`Decrypt` (system scope only);
//! - 257 added `scope: "user"` (credentials bound to a UID), which is what lets an
//!   unprivileged caller encrypt/decrypt its own secrets without polkit;
//! - later releases added `withKey` and typed errors (`KeyBelongsToOtherTPM`, ...).
//!   257 (Debian 13) has neither, as its introspection shows: `withKey` is rejected with
//!   `InvalidParameter`, and a failed unseal comes back as a generic errno error.
//!
//! 257 therefore picks the key itself (`auto`): host key + TPM2 when the firmware reported
//! a TPM2 (an EFI boot with a TPM), else the host key alone. [`Credentials::encrypt_require_tpm2`]
//! checks that choice from the credential's header rather than trusting it.

use std::fmt;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

pub use crate::credfile::{EncryptedCredential, KeyBinding};
use crate::secret::Secret;

/// Where systemd listens for `io.systemd.Credentials` (systemd-creds.socket).
pub const CREDENTIALS_SOCKET: &str = "/run/systemd/io.systemd.Credentials";

/// The scope a credential is bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Decryptable by root / system services (and `LoadCredentialEncrypted=` in system units).
    System,
    /// Bound to the calling user's UID; the only scope an unprivileged caller may use
    /// without interactive polkit authentication.
    User,
}

/// Which key(s) systemd seals the credential with (`withKey`, `--with-key=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WithKey {
    /// Let systemd pick: host+TPM2 when a TPM is usable, else the host key.
    Auto,
    /// The host key (`/var/lib/systemd/credential.secret`) only.
    Host,
    /// The TPM2 only: the file is useless on any other machine (or after a TPM clear).
    Tpm2,
    /// Both: needs this machine's TPM and its host key file.
    HostTpm2,
}

impl WithKey {
    /// The spelling on the wire (the `--with-key=` spelling; releases with `withKey` also
    /// accept `_` for `+`/`-`, as their IDL enum cannot contain `+`).
    pub fn as_wire(self) -> &'static str {
        match self {
            WithKey::Auto => "auto",
            WithKey::Host => "host",
            WithKey::Tpm2 => "tpm2",
            WithKey::HostTpm2 => "host+tpm2",
        }
    }
}

/// What to encrypt. `name` is sealed into the credential and checked again on decrypt
/// (so a renamed file is refused), exactly like `systemd-creds --name=`.
#[derive(Debug, Clone)]
pub struct EncryptRequest<'a> {
    pub name: Option<&'a str>,
    pub scope: Scope,
    /// `None` leaves the choice to systemd (`auto`, or the user-scoped auto for `User`).
    pub with_key: Option<WithKey>,
    /// µs since the epoch after which the credential is refused.
    pub not_after_usec: Option<u64>,
}

/// What the running systemd's credentials service supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceInfo {
    /// `scope: "user"` (systemd >= 257): unprivileged callers can encrypt for themselves.
    pub user_scope: bool,
    /// An explicit key choice (`withKey`), absent in 257.
    pub with_key: bool,
}

/// Errors, typed so the CLI can say what to do about each.
#[derive(Debug, thiserror::Error)]
pub enum CredsError {
    #[error(
        "systemd's credentials service is not reachable at {socket}: {source}. \
         cohort needs systemd >= 256 (io.systemd.Credentials over Varlink, systemd-creds.socket) \
         and >= 257 for user-scope credentials"
    )]
    ServiceUnavailable {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{socket} does not support {method} ({error}): {needs}")]
    Unsupported {
        socket: PathBuf,
        method: String,
        error: String,
        needs: &'static str,
    },
    #[error(
        "this credential cannot be decrypted on this machine: it was sealed to another machine's \
         TPM or host key (a copied file), or this machine's TPM was cleared since ({detail}). \
         Place the key again on this machine"
    )]
    NotThisMachine { detail: String },
    #[error("not a valid systemd credential, or a damaged one: {detail}")]
    BadFormat { detail: String },
    #[error("the credential's sealed name does not match {0:?} (was the file renamed?)")]
    NameMismatch(String),
    #[error("the credential is expired or not yet valid")]
    TimeMismatch,
    #[error(
        "the credential's scope does not match: a system credential needs root, a user \
         credential needs its own user"
    )]
    BadScope,
    #[error("the TPM's PCR state does not match the credential's policy")]
    UnexpectedPcrState,
    #[error("the TPM is in dictionary-attack lockout and refuses to unseal; wait or reset it")]
    TpmLockout,
    #[error("no usable TPM2 ({detail}); a TPM-bound credential needs /dev/tpmrm0")]
    NoTpm { detail: String },
    #[error(
        "a TPM-bound credential was required, but systemd sealed it with the {binding} \
         (no usable TPM2?)"
    )]
    TpmNotUsed { binding: KeyBinding },
    #[error(
        "permission denied by systemd's credentials service ({error}); an unprivileged \
         caller must use the user scope"
    )]
    PermissionDenied { error: String },
    #[error("systemd's credentials service rejected parameter {0:?}")]
    InvalidParameter(String),
    #[error("systemd's credentials service failed: {error} {parameters}")]
    Service { error: String, parameters: String },
    #[error("Varlink protocol error talking to {socket}: {detail}")]
    Protocol { socket: PathBuf, detail: String },
}

/// A Varlink error reply: `{"error": "iface.Name", "parameters": {...}}`.
#[derive(Debug, Deserialize)]
struct WireError {
    error: String,
    #[serde(default)]
    parameters: Option<serde_json::Value>,
}

#[derive(Debug, Serialize)]
struct Method<P> {
    method: &'static str,
    parameters: P,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct EncryptParams<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    data: String,
    scope: Scope,
    #[serde(skip_serializing_if = "Option::is_none")]
    with_key: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    not_after: Option<u64>,
}

#[derive(Debug, Serialize)]
struct DecryptParams<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    blob: &'a str,
    scope: Scope,
}

#[derive(Debug, Deserialize)]
struct EncryptReply {
    blob: String,
}

#[derive(Deserialize)]
struct DecryptReply {
    data: String,
}

impl fmt::Debug for DecryptReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DecryptReply(***)")
    }
}

/// Client for `io.systemd.Credentials`. One connection per call: calls are rare and this
/// keeps the client `Send + Sync` without a lock.
#[derive(Debug, Clone)]
pub struct Credentials {
    socket: PathBuf,
}

impl Default for Credentials {
    fn default() -> Self {
        Self::new()
    }
}

impl Credentials {
    /// The system's service at [`CREDENTIALS_SOCKET`].
    pub fn new() -> Self {
        Self::at(CREDENTIALS_SOCKET)
    }

    /// A service at another socket (tests).
    pub fn at(socket: impl AsRef<Path>) -> Self {
        Self {
            socket: socket.as_ref().to_path_buf(),
        }
    }

    /// Ask the service what it supports (for `cohort doctor`): fails with
    /// [`CredsError::ServiceUnavailable`] or [`CredsError::Unsupported`] when systemd is
    /// too old, else reports the optional features this systemd has.
    pub async fn check(&self) -> Result<ServiceInfo, CredsError> {
        #[derive(Debug, Serialize)]
        struct P {
            interface: &'static str,
        }
        #[derive(Debug, Deserialize)]
        struct R {
            description: String,
        }
        let r: R = self
            .call(
                "org.varlink.service.GetInterfaceDescription",
                P {
                    interface: "io.systemd.Credentials",
                },
                None,
            )
            .await?;
        // The IDL text lists the method parameters; look for the optional ones by name.
        let has = |field: &str| r.description.contains(&format!("{field}: ?"));
        Ok(ServiceInfo {
            user_scope: has("scope"),
            with_key: has("withKey"),
        })
    }

    /// Seal `secret`. The result is what belongs in a credential file.
    pub async fn encrypt(&self, req: &EncryptRequest<'_>, secret: &[u8]) -> Result<EncryptedCredential, CredsError> {
        let params = EncryptParams {
            name: req.name,
            data: B64.encode(secret),
            scope: req.scope,
            with_key: req.with_key.map(WithKey::as_wire),
            not_after: req.not_after_usec,
        };
        let reply: EncryptReply = match self.call("io.systemd.Credentials.Encrypt", params, req.name).await {
            Err(CredsError::InvalidParameter(p)) if p == "withKey" => {
                return Err(CredsError::Unsupported {
                    socket: self.socket.clone(),
                    method: "io.systemd.Credentials.Encrypt with withKey".into(),
                    error: "InvalidParameter withKey".into(),
                    needs: "systemd 257 cannot choose the key over Varlink (no withKey); \
                            leave the choice to systemd (auto) and check the binding, \
                            see Credentials::encrypt_require_tpm2",
                });
            }
            r => r?,
        };
        EncryptedCredential::from_base64(&reply.blob)
    }

    /// Seal `secret` and insist that the TPM2 is part of the key.
    ///
    /// systemd 257's `Encrypt` has no `withKey` (it answers InvalidParameter), and newer
    /// ones turn an explicit `withKey` into an unscoped key, which a user-scope decrypt
    /// then refuses. So we let systemd choose (`auto`: host key + TPM2 when the firmware
    /// reports a TPM2) and check the choice from the blob's header.
    pub async fn encrypt_require_tpm2(
        &self,
        name: Option<&str>,
        scope: Scope,
        secret: &[u8],
    ) -> Result<EncryptedCredential, CredsError> {
        let req = EncryptRequest {
            name,
            scope,
            with_key: None,
            not_after_usec: None,
        };
        let cred = self.encrypt(&req, secret).await?;
        match cred.binding() {
            Some(b) if b.uses_tpm2() => Ok(cred),
            Some(binding) => Err(CredsError::TpmNotUsed { binding }),
            None => Err(CredsError::BadFormat {
                detail: "systemd returned a credential with an unknown header".into(),
            }),
        }
    }

    /// Unseal a credential. `name` must be the name it was sealed with (or `None` to skip
    /// the check).
    pub async fn decrypt(
        &self,
        cred: &EncryptedCredential,
        name: Option<&str>,
        scope: Scope,
    ) -> Result<Secret, CredsError> {
        let params = DecryptParams {
            name,
            blob: cred.as_base64(),
            scope,
        };
        let reply: DecryptReply = self.call("io.systemd.Credentials.Decrypt", params, name).await?;
        let data = B64.decode(reply.data.as_bytes()).map_err(|e| CredsError::Protocol {
            socket: self.socket.clone(),
            detail: format!("Decrypt reply data is not base64: {e}"),
        })?;
        Ok(Secret::new(data))
    }

    async fn call<P, R>(&self, method: &'static str, parameters: P, name: Option<&str>) -> Result<R, CredsError>
    where
        P: Serialize + fmt::Debug,
        R: for<'de> Deserialize<'de> + fmt::Debug,
    {
        let mut conn = zlink::tokio::unix::connect(&self.socket).await.map_err(|e| match e {
            zlink::Error::Io(source) => CredsError::ServiceUnavailable {
                socket: self.socket.clone(),
                source,
            },
            other => self.protocol(other),
        })?;
        let call = zlink::Call::new(Method { method, parameters });
        let (reply, _fds) = conn
            .call_method::<_, R, WireError>(&call, vec![])
            .await
            .map_err(|e| self.map_zlink(e, method))?;
        match reply {
            Ok(reply) => reply.into_parameters().ok_or_else(|| CredsError::Protocol {
                socket: self.socket.clone(),
                detail: format!("{method} replied without parameters"),
            }),
            Err(err) => Err(self
                .map_varlink_service(err, method)
                .unwrap_or_else(|err| map_service_error(err, name))),
        }
    }

    fn protocol(&self, e: zlink::Error) -> CredsError {
        CredsError::Protocol {
            socket: self.socket.clone(),
            detail: e.to_string(),
        }
    }

    /// zlink reports `org.varlink.service.*` errors (method/interface not found, invalid
    /// parameter, permission denied) as its own errors, not as the reply's error type.
    fn map_zlink(&self, e: zlink::Error, method: &str) -> CredsError {
        use zlink::varlink_service::Error as V;
        match e {
            zlink::Error::VarlinkService(ref owned) => match &**owned {
                V::InterfaceNotFound { .. } | V::MethodNotFound { .. } | V::MethodNotImplemented { .. } => {
                    CredsError::Unsupported {
                        socket: self.socket.clone(),
                        method: method.to_string(),
                        error: format!("{owned}"),
                        needs: "this systemd is too old: cohort needs systemd >= 256 \
                            (>= 257 for user-scope credentials)",
                    }
                }
                V::InvalidParameter { parameter } => CredsError::InvalidParameter(parameter.to_string()),
                V::PermissionDenied => CredsError::PermissionDenied {
                    error: "org.varlink.service.PermissionDenied".into(),
                },
                _ => self.protocol(e),
            },
            zlink::Error::Io(source) => CredsError::ServiceUnavailable {
                socket: self.socket.clone(),
                source,
            },
            other => self.protocol(other),
        }
    }
}

impl Credentials {
    /// `org.varlink.service.*` errors that reach us as plain error replies (zlink only
    /// recognises them itself when their parameters match its types exactly; systemd sends
    /// e.g. `PermissionDenied` with `{}` parameters).
    fn map_varlink_service(&self, err: WireError, method: &str) -> Result<CredsError, WireError> {
        let param = |k: &str| {
            err.parameters
                .as_ref()
                .and_then(|p| p.get(k))
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_string()
        };
        Ok(match err.error.as_str() {
            "org.varlink.service.PermissionDenied" => CredsError::PermissionDenied {
                error: err.error.clone(),
            },
            "org.varlink.service.InvalidParameter" => CredsError::InvalidParameter(param("parameter")),
            "org.varlink.service.MethodNotFound"
            | "org.varlink.service.InterfaceNotFound"
            | "org.varlink.service.MethodNotImplemented" => CredsError::Unsupported {
                socket: self.socket.clone(),
                method: method.to_string(),
                error: err.error.clone(),
                needs: "this systemd is too old: cohort needs systemd >= 256 \
                        (>= 257 for user-scope credentials)",
            },
            _ => return Err(err),
        })
    }
}

/// errno values systemd's decrypt path returns, before 258 turned them into named errors.
mod errno {
    pub const EREMOTE: i64 = libc::EREMOTE as i64;
    pub const ENOTRECOVERABLE: i64 = libc::ENOTRECOVERABLE as i64;
    pub const EBADMSG: i64 = libc::EBADMSG as i64;
    pub const EMEDIUMTYPE: i64 = libc::EMEDIUMTYPE as i64;
    pub const ESTALE: i64 = libc::ESTALE as i64;
    pub const EREMCHG: i64 = libc::EREMCHG as i64;
    pub const EHOSTDOWN: i64 = libc::EHOSTDOWN as i64;
    pub const ENOLCK: i64 = libc::ENOLCK as i64;
    pub const ENOENT: i64 = libc::ENOENT as i64;
    pub const ENXIO: i64 = libc::ENXIO as i64;
    pub const EOPNOTSUPP: i64 = libc::EOPNOTSUPP as i64;
    pub const EPERM: i64 = libc::EPERM as i64;
    pub const EACCES: i64 = libc::EACCES as i64;
}

fn map_service_error(err: WireError, name: Option<&str>) -> CredsError {
    let params = err.parameters.as_ref().map(|p| p.to_string()).unwrap_or_default();
    let errno = err
        .parameters
        .as_ref()
        .and_then(|p| p.get("errno"))
        .and_then(|e| e.as_i64());
    let named = err.error.strip_prefix("io.systemd.Credentials.");
    match (named, errno) {
        // 257 reports a sealed key that this TPM cannot load (another TPM's, or from before
        // a TPM clear) as ENOTRECOVERABLE, as seen in tests/vm; later releases as EREMOTE or
        // by name.
        (Some("KeyBelongsToOtherTPM"), _) | (None, Some(errno::EREMOTE | errno::ENOTRECOVERABLE)) => {
            CredsError::NotThisMachine {
                detail: format!("{} {params}", err.error),
            }
        }
        // An AES-GCM tag mismatch: with a well-formed header this means the key derived on
        // this machine (host key and/or TPM) is not the one the credential was sealed with.
        (None, Some(errno::EBADMSG)) => CredsError::NotThisMachine {
            detail: format!("integrity check failed: {} {params}", err.error),
        },
        (Some("BadFormat"), _) => CredsError::BadFormat {
            detail: err.error.clone(),
        },
        (Some("NameMismatch"), _) | (None, Some(errno::EREMCHG)) => {
            CredsError::NameMismatch(name.unwrap_or_default().to_string())
        }
        (Some("TimeMismatch"), _) | (None, Some(errno::ESTALE)) => CredsError::TimeMismatch,
        (Some("BadScope"), _) | (None, Some(errno::EMEDIUMTYPE)) => CredsError::BadScope,
        (Some("UnexpectedPCRState"), _) => CredsError::UnexpectedPcrState,
        (Some("TPMInDictionaryLockout"), _) | (None, Some(errno::ENOLCK)) => CredsError::TpmLockout,
        // 257: the host key file is absent, or was made for another machine ID (systemd then
        // deletes it, as seen in tests/vm): the credential belongs to another machine.
        (None, Some(errno::ENOENT)) => CredsError::NotThisMachine {
            detail: format!(
                "this machine's host key /var/lib/systemd/credential.secret is missing or \
                 belongs to another machine ID: {} {params}",
                err.error
            ),
        },
        (None, Some(errno::ENXIO | errno::EOPNOTSUPP | errno::EHOSTDOWN)) => CredsError::NoTpm {
            detail: format!("{} {params}", err.error),
        },
        (None, Some(errno::EPERM | errno::EACCES)) => CredsError::PermissionDenied {
            error: format!("{} {params}", err.error),
        },
        _ if err.error == "io.systemd.InteractiveAuthenticationRequired" => CredsError::PermissionDenied {
            error: err.error.clone(),
        },
        _ => CredsError::Service {
            error: err.error,
            parameters: params,
        },
    }
}
