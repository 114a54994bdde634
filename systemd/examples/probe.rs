//! A test driver for cohort-systemd inside the VM (tests/vm): each subcommand exercises one
//! part of the crate against the real systemd and exits non-zero when the outcome is not
//! the expected one. It prints `key=value` lines the harness greps.
//!
//!   probe encrypt  --scope system|user --name N --out FILE [--secret S] [--expect-error KIND]
//!   probe decrypt  --scope system|user --name N --in FILE [--secret S | --expect-error KIND]
//!   probe unit     --bus system|user --name UNIT [--notify | --fail] [--timeout SECS]
//!   probe linger   --uid UID
//!   probe notify-main        (the main process of the Type=notify test unit)

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::Duration;

use cohort_systemd::creds::{Credentials, CredsError, EncryptRequest, EncryptedCredential, Scope};
use cohort_systemd::manager::{Bus, Systemd, UnitsError};
use cohort_systemd::notify::{watchdog_interval, Notifier, NotifyState};
use cohort_systemd::unit::UnitFile;

type Res = Result<(), String>;

fn args() -> (String, HashMap<String, String>) {
    let mut it = std::env::args().skip(1);
    let cmd = it.next().unwrap_or_default();
    let mut m = HashMap::new();
    let rest: Vec<String> = it.collect();
    let mut i = 0;
    while i < rest.len() {
        let k = rest[i].trim_start_matches("--").to_string();
        let v = rest.get(i + 1).filter(|v| !v.starts_with("--"));
        match v {
            Some(v) => {
                m.insert(k, v.clone());
                i += 2;
            }
            None => {
                m.insert(k, String::new());
                i += 1;
            }
        }
    }
    (cmd, m)
}

fn scope(a: &HashMap<String, String>) -> Scope {
    match a.get("scope").map(String::as_str) {
        Some("user") => Scope::User,
        _ => Scope::System,
    }
}

fn error_kind(e: &CredsError) -> &'static str {
    match e {
        CredsError::NotThisMachine { .. } => "not-this-machine",
        CredsError::PermissionDenied { .. } => "permission-denied",
        CredsError::BadScope => "bad-scope",
        CredsError::NameMismatch(_) => "name-mismatch",
        CredsError::TpmNotUsed { .. } => "tpm-not-used",
        CredsError::Unsupported { .. } => "unsupported",
        CredsError::ServiceUnavailable { .. } => "unavailable",
        CredsError::BadFormat { .. } => "bad-format",
        _ => "other",
    }
}

/// Compare an outcome with `--expect-error KIND` (if given).
fn expect<T>(a: &HashMap<String, String>, r: Result<T, CredsError>) -> Result<Option<T>, String> {
    match (a.get("expect-error"), r) {
        (None, Ok(v)) => Ok(Some(v)),
        (None, Err(e)) => Err(format!("unexpected error: {e}")),
        (Some(k), Ok(_)) => Err(format!("expected error {k}, but it succeeded")),
        (Some(k), Err(e)) => {
            println!("error_kind={}", error_kind(&e));
            println!("error_message={e}");
            if error_kind(&e) == k {
                Ok(None)
            } else {
                Err(format!("expected error {k}, got {}: {e}", error_kind(&e)))
            }
        }
    }
}

async fn encrypt(a: &HashMap<String, String>) -> Res {
    let creds = Credentials::new();
    let name = a.get("name").map(String::as_str);
    let secret = a.get("secret").cloned().unwrap_or_else(|| "sk-probe-secret".into());
    let sc = scope(a);
    let info = creds.check().await.map_err(|e| e.to_string())?;
    println!(
        "service_user_scope={} service_with_key={}",
        info.user_scope, info.with_key
    );
    let t = std::time::Instant::now();
    let Some(cred) = expect(a, creds.encrypt_require_tpm2(name, sc, secret.as_bytes()).await)? else {
        return Ok(());
    };
    println!("encrypt_ms={}", t.elapsed().as_millis());
    println!("binding={}", cred.binding().map(|b| b.to_string()).unwrap_or_default());
    // Explicit key choice: 257 has no withKey; show what the crate reports.
    let explicit = EncryptRequest {
        name,
        scope: sc,
        with_key: Some(cohort_systemd::WithKey::Tpm2),
        not_after_usec: None,
    };
    match creds.encrypt(&explicit, b"x").await {
        Ok(c) => println!("with_key_tpm2=ok binding={:?}", c.binding()),
        Err(e) => println!("with_key_tpm2=err kind={} message={e}", error_kind(&e)),
    }
    let back = creds
        .decrypt(&cred, name, sc)
        .await
        .map_err(|e| format!("round trip decrypt failed: {e}"))?;
    if back.expose() != secret.as_bytes() {
        return Err("round trip returned different bytes".into());
    }
    println!("roundtrip=ok");
    // A wrong name must be refused: the name is sealed into the credential.
    match creds.decrypt(&cred, Some("renamed"), sc).await {
        Err(CredsError::NameMismatch(_)) => println!("wrong_name=refused"),
        other => return Err(format!("wrong name not refused: {other:?}")),
    }
    if let Some(out) = a.get("out") {
        std::fs::write(out, cred.as_base64()).map_err(|e| format!("{out}: {e}"))?;
    }
    Ok(())
}

async fn decrypt(a: &HashMap<String, String>) -> Res {
    let path = a.get("in").ok_or("--in FILE")?;
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let cred = EncryptedCredential::from_base64(&text).map_err(|e| e.to_string())?;
    println!("binding={}", cred.binding().map(|b| b.to_string()).unwrap_or_default());
    let r = Credentials::new()
        .decrypt(&cred, a.get("name").map(String::as_str), scope(a))
        .await;
    if let Some(secret) = expect(a, r)? {
        let want = a.get("secret").ok_or("--secret expected value")?;
        if secret.expose() != want.as_bytes() {
            return Err("decrypted to different bytes".into());
        }
        println!("decrypt=ok");
    }
    Ok(())
}

async fn unit(a: &HashMap<String, String>) -> Res {
    let bus = match a.get("bus").map(String::as_str) {
        Some("user") => Bus::User,
        _ => Bus::System,
    };
    let name = a.get("name").ok_or("--name UNIT")?.clone();
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut u = UnitFile::new();
    u.header_comment("written by cohort-systemd's probe (VM test)");
    u.section("Unit").text("Description", "cohort probe 100% test unit");
    let svc = u.section("Service");
    if a.contains_key("notify") {
        svc.raw("Type", "notify")
            .exec("ExecStart", &[me.to_str().unwrap(), "notify-main"])
            .raw("WatchdogSec", "10s")
            .raw("NotifyAccess", "main");
    } else if a.contains_key("fail") {
        // oneshot: the start job itself waits for the exit and fails deterministically.
        svc.raw("Type", "oneshot").exec("ExecStart", &["/bin/false"]);
    } else {
        svc.raw("Type", "exec").exec("ExecStart", &["/bin/sleep", "infinity"]);
    }
    svc.env("PROBE_VALUE", "a b $c %d");
    let wanted_by = if bus == Bus::User {
        "default.target"
    } else {
        "multi-user.target"
    };
    u.section("Install").raw("WantedBy", wanted_by);
    let text = u.render().map_err(|e| e.to_string())?;
    let dir = match bus {
        Bus::System => "/etc/systemd/system".to_string(),
        Bus::User => format!("{}/.config/systemd/user", std::env::var("HOME").unwrap()),
    };
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    std::fs::write(format!("{dir}/{name}"), text).map_err(|e| e.to_string())?;

    let t = std::time::Instant::now();
    let sd = Systemd::connect(bus).await.map_err(|e| e.to_string())?;
    println!("manager_version={}", sd.version().await.map_err(|e| e.to_string())?);
    sd.reload().await.map_err(|e| e.to_string())?;
    let changes = sd.enable(&[&name]).await.map_err(|e| e.to_string())?;
    println!("enable_changes={}", changes.len());
    let timeout = Duration::from_secs(a.get("timeout").and_then(|t| t.parse().ok()).unwrap_or(90));
    match sd.start(&name, timeout).await {
        Ok(state) => {
            println!("start_ms={}", t.elapsed().as_millis());
            println!(
                "active_state={} sub_state={} result={}",
                state.active_state, state.sub_state, state.result
            );
            if a.contains_key("fail") {
                return Err("the failing unit started".into());
            }
            if !state.is_active() {
                return Err(format!("{name} is not active: {state:?}"));
            }
        }
        Err(UnitsError::JobFailed {
            result,
            active_state,
            service_result,
            ..
        }) if a.contains_key("fail") => {
            println!("job_result={result} active_state={active_state} result={service_result}");
        }
        Err(e) => return Err(e.to_string()),
    }
    Ok(())
}

async fn linger(a: &HashMap<String, String>) -> Res {
    let uid: u32 = a.get("uid").and_then(|u| u.parse().ok()).ok_or("--uid UID")?;
    let before = cohort_systemd::logind::linger_enabled(uid)
        .await
        .map_err(|e| e.to_string())?;
    cohort_systemd::logind::set_linger(uid, true)
        .await
        .map_err(|e| e.to_string())?;
    let after = cohort_systemd::logind::linger_enabled(uid)
        .await
        .map_err(|e| e.to_string())?;
    println!("linger_before={before} linger_after={after}");
    if !after {
        return Err("linger still off".into());
    }
    Ok(())
}

async fn notify_main() -> Res {
    let n = Notifier::from_env()
        .map_err(|e| e.to_string())?
        .ok_or("no $NOTIFY_SOCKET")?;
    n.status("starting").map_err(|e| e.to_string())?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let wd = watchdog_interval().ok_or("no watchdog (WATCHDOG_USEC) for this process")?;
    n.notify(&[
        NotifyState::Ready,
        NotifyState::Status(format!("ready, watchdog {wd:?}")),
    ])
    .map_err(|e| e.to_string())?;
    loop {
        tokio::time::sleep(wd / 2).await;
        n.watchdog().map_err(|e| e.to_string())?;
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let (cmd, a) = args();
    let r = match cmd.as_str() {
        "encrypt" => encrypt(&a).await,
        "decrypt" => decrypt(&a).await,
        "unit" => unit(&a).await,
        "linger" => linger(&a).await,
        "notify-main" => notify_main().await,
        _ => Err(format!("unknown command {cmd:?}")),
    };
    match r {
        Ok(()) => {
            println!("probe {cmd}: OK");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("probe {cmd}: FAIL: {e}");
            ExitCode::FAILURE
        }
    }
}
