//! cohort's talk with systemd, and nothing else: it knows D-Bus and Varlink, not tasks,
//! git or agents. Everything is in-process (no `systemctl`/`systemd-creds` children), so
//! secrets never pass through an argv or a pipe and errors come back typed.
//!
//! - [`creds`]: encrypted credentials via `io.systemd.Credentials` (Varlink), TPM2-bound.
//! - [`manager`]: units via `org.freedesktop.systemd1` (D-Bus), system or user manager.
//! - [`logind`]: lingering via `org.freedesktop.login1`.
//! - [`notify`]: `sd_notify` readiness, status and watchdog.
//! - [`unit`]: rendering unit files with correct escaping.

mod credfile;
pub mod creds;
pub mod logind;
pub mod manager;
pub mod notify;
pub mod secret;
pub mod unit;

pub use creds::{
    Credentials, CredsError, EncryptRequest, EncryptedCredential, KeyBinding, Scope, ServiceInfo, WithKey,
};
pub use manager::{Bus, Systemd, UnitFileChange, UnitState, UnitsError};
pub use notify::{Notifier, NotifyError, NotifyState};
pub use secret::Secret;
pub use unit::{Section, UnitError, UnitFile};
