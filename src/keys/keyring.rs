//! The desktop keyring, for rootless desktop use: the Secret Service (GNOME Keyring,
//! KWallet) over the session bus, or the kernel's keyutils where there is no session bus
//! (keyutils keys live in memory only and are gone after a reboot).
//!
//! keyring-core is synchronous, and the Secret Service store runs its own D-Bus calls,
//! so every call here happens on a blocking thread.

use std::sync::Arc;

use keyring_core::{CredentialStore, Entry, Error};

use super::KeyError;
use crate::secret::Secret;

/// The keyring "service" cohort's entries are filed under; the key NAME is the "user".
const SERVICE: &str = "cohort";

/// Which store this session has: the Secret Service when a session bus is there, else
/// keyutils. Returns the store and a name for messages.
fn store() -> Result<(Arc<CredentialStore>, &'static str), KeyError> {
    let has_bus = std::env::var_os("DBUS_SESSION_BUS_ADDRESS").is_some_and(|v| !v.is_empty());
    if has_bus && std::env::var_os("COHORT_KEYRING").is_none_or(|v| v != "keyutils") {
        if let Ok(s) = zbus_secret_service_keyring_store::Store::new() {
            return Ok((s, "Secret Service"));
        }
    }
    let s = linux_keyutils_keyring_store::Store::new().map_err(|e| KeyError::Keyring(e.to_string()))?;
    Ok((s, "kernel keyring"))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, KeyError> + Send + 'static) -> Result<T, KeyError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| KeyError::Keyring(format!("keyring thread failed: {e}")))?
}

/// Stores key `name`; returns the store's name.
pub async fn set(name: &str, secret: &Secret) -> Result<&'static str, KeyError> {
    let (name, secret) = (name.to_string(), secret.clone());
    blocking(move || {
        let (store, label) = store()?;
        let entry = Entry::new_in_store(&store, SERVICE, &name).map_err(|e| KeyError::Keyring(e.to_string()))?;
        entry
            .set_password(secret.expose())
            .map_err(|e| KeyError::Keyring(format!("{label}: {e}")))?;
        Ok(label)
    })
    .await
}

/// Key `name` and the store's name, or `None` when the keyring has no such entry (or
/// there is no usable keyring at all).
pub async fn get(name: &str) -> Result<Option<(Secret, String)>, KeyError> {
    let name = name.to_string();
    blocking(move || {
        let Ok((store, label)) = store() else { return Ok(None) };
        let entry = Entry::new_in_store(&store, SERVICE, &name).map_err(|e| KeyError::Keyring(e.to_string()))?;
        match entry.get_password() {
            Ok(v) => Ok(Some((Secret::new(v), label.to_string()))),
            Err(Error::NoEntry) => Ok(None),
            Err(e) => Err(KeyError::Keyring(format!("{label}: {e}"))),
        }
    })
    .await
}

/// Removes key `name`; `Ok(false)` when there was none.
pub async fn remove(name: &str) -> Result<bool, KeyError> {
    let name = name.to_string();
    blocking(move || {
        let (store, label) = store()?;
        let entry = Entry::new_in_store(&store, SERVICE, &name).map_err(|e| KeyError::Keyring(e.to_string()))?;
        match entry.delete_credential() {
            Ok(()) => Ok(true),
            Err(Error::NoEntry) => Ok(false),
            Err(e) => Err(KeyError::Keyring(format!("{label}: {e}"))),
        }
    })
    .await
}
