//! Lingering through logind (`org.freedesktop.login1`), so a user's manager, and with it a
//! user-scope `cohort.service`, starts at boot instead of at the user's first login.

use zbus_systemd::login1::{ManagerProxy, UserProxy};

use crate::manager::{connect_bus, Bus, UnitsError};

fn call_err(call: impl Into<String>) -> impl FnOnce(zbus::Error) -> UnitsError {
    let call = call.into();
    move |source| UnitsError::Call { call, source }
}

/// Whether `uid` lingers. A user logind does not know (not logged in, not lingering) has no
/// `User` object; that is reported as `false`, not as an error.
pub async fn linger_enabled(uid: u32) -> Result<bool, UnitsError> {
    let conn = connect_bus(Bus::System).await?;
    let mgr = ManagerProxy::new(&conn)
        .await
        .map_err(call_err("login1.Manager proxy"))?;
    let path = match mgr.get_user(uid).await {
        Ok(p) => p,
        Err(zbus::Error::MethodError(name, _, _)) if name.as_str() == "org.freedesktop.login1.NoSuchUser" => {
            return Ok(false);
        }
        Err(e) => return Err(call_err(format!("GetUser {uid}"))(e)),
    };
    let user = UserProxy::builder(&conn)
        .path(path)
        .map_err(call_err("login1.User proxy"))?
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .map_err(call_err("login1.User proxy"))?;
    user.linger().await.map_err(call_err(format!("User {uid} Linger")))
}

/// Turn lingering on or off for `uid` (`loginctl enable-linger`). Root may do it for
/// anyone; a user for itself where polkit allows it (non-interactively: we never prompt).
pub async fn set_linger(uid: u32, enable: bool) -> Result<(), UnitsError> {
    let conn = connect_bus(Bus::System).await?;
    let mgr = ManagerProxy::new(&conn)
        .await
        .map_err(call_err("login1.Manager proxy"))?;
    mgr.set_user_linger(uid, enable, false)
        .await
        .map_err(call_err(format!("SetUserLinger {uid} {enable}")))
}
