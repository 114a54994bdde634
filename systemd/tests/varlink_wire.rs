//! The Varlink client against a local server that speaks the real wire format: one JSON
//! object per message, terminated by a NUL byte, over a unix stream socket. The server
//! records what the client sent so the tests check the exact requests too.

use std::path::PathBuf;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use cohort_systemd::{Credentials, CredsError, EncryptRequest, EncryptedCredential, KeyBinding, Scope, WithKey};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::UnixListener;
use tokio::sync::oneshot;

const HOST_TPM2_SCOPED: &str = "ef4ac13679a9480ea7db68897f9f165d";
const HOST_ONLY: &str = "5a1c6a86df9d4096b1d5a65e0862f19a";

fn blob(header_hex: &str) -> String {
    let mut raw: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&header_hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    raw.extend_from_slice(b"...sealed payload...");
    B64.encode(raw)
}

/// Serve one connection: read one NUL-terminated request, send `reply` (NUL-terminated),
/// hand the request back through the channel.
async fn serve_once(reply: Value) -> (tempfile::TempDir, PathBuf, oneshot::Receiver<Value>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("io.systemd.Credentials");
    let listener = UnixListener::bind(&path).unwrap();
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let (r, mut w) = stream.into_split();
        let mut r = BufReader::new(r);
        let mut buf = Vec::new();
        r.read_until(0, &mut buf).await.unwrap();
        assert_eq!(buf.pop(), Some(0), "request must end with NUL");
        assert!(!buf.contains(&0), "exactly one NUL per message");
        let req: Value = serde_json::from_slice(&buf).expect("request is one JSON object");
        let mut out = serde_json::to_vec(&reply).unwrap();
        out.push(0);
        w.write_all(&out).await.unwrap();
        w.flush().await.unwrap();
        let _ = tx.send(req);
    });
    (dir, path, rx)
}

#[tokio::test]
async fn encrypt_user_scope_sends_the_documented_fields() {
    let (_d, path, req) = serve_once(json!({"parameters": {"blob": blob(HOST_TPM2_SCOPED)}})).await;
    let creds = Credentials::at(&path);
    let cred = creds
        .encrypt_require_tpm2(Some("openai_api_key"), Scope::User, b"sk-test")
        .await
        .unwrap();
    assert_eq!(cred.binding(), Some(KeyBinding::HostTpm2Scoped));
    let req = req.await.unwrap();
    assert_eq!(req["method"], "io.systemd.Credentials.Encrypt");
    let p = &req["parameters"];
    assert_eq!(p["name"], "openai_api_key");
    assert_eq!(p["scope"], "user");
    assert_eq!(p["data"], B64.encode(b"sk-test"));
    // systemd picks the (user-scoped) key itself for the user scope.
    assert!(p.get("withKey").is_none(), "{p}");
    assert!(p.get("text").is_none());
}

#[tokio::test]
async fn encrypt_system_scope_passes_with_key() {
    let (_d, path, req) = serve_once(json!({"parameters": {"blob": blob(HOST_TPM2_SCOPED)}})).await;
    let r = EncryptRequest {
        name: Some("k"),
        scope: Scope::System,
        with_key: Some(WithKey::Tpm2),
        not_after_usec: Some(42),
    };
    Credentials::at(&path).encrypt(&r, b"x").await.unwrap();
    let p = req.await.unwrap()["parameters"].clone();
    assert_eq!(p["scope"], "system");
    assert_eq!(p["withKey"], "tpm2");
    assert_eq!(p["notAfter"], 42);
}

#[tokio::test]
async fn require_tpm2_refuses_a_host_only_credential() {
    let (_d, path, _req) = serve_once(json!({"parameters": {"blob": blob(HOST_ONLY)}})).await;
    let err = Credentials::at(&path)
        .encrypt_require_tpm2(Some("k"), Scope::User, b"x")
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            CredsError::TpmNotUsed {
                binding: KeyBinding::Host
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn decrypt_returns_the_secret_hidden_from_debug() {
    let (_d, path, req) = serve_once(json!({"parameters": {"data": B64.encode("sk-live")}})).await;
    let cred = EncryptedCredential::from_base64(&blob(HOST_TPM2_SCOPED)).unwrap();
    let secret = Credentials::at(&path)
        .decrypt(&cred, Some("k"), Scope::User)
        .await
        .unwrap();
    assert_eq!(secret.expose(), b"sk-live");
    assert_eq!(format!("{secret:?}"), "***");
    let req = req.await.unwrap();
    assert_eq!(req["method"], "io.systemd.Credentials.Decrypt");
    assert_eq!(req["parameters"]["blob"], cred.as_base64());
    assert_eq!(req["parameters"]["name"], "k");
}

async fn decrypt_error(reply: Value) -> CredsError {
    let (_d, path, _req) = serve_once(reply).await;
    let cred = EncryptedCredential::from_base64(&blob(HOST_TPM2_SCOPED)).unwrap();
    Credentials::at(&path)
        .decrypt(&cred, Some("k"), Scope::System)
        .await
        .unwrap_err()
}

#[tokio::test]
async fn foreign_tpm_is_not_this_machine_in_both_dialects() {
    // systemd >= 258 names the error...
    let e = decrypt_error(json!({"error": "io.systemd.Credentials.KeyBelongsToOtherTPM"})).await;
    assert!(matches!(e, CredsError::NotThisMachine { .. }), "{e:?}");
    assert!(e.to_string().contains("cannot be decrypted on this machine"));
    // ...257 sends the errno.
    let e = decrypt_error(json!({"error": "io.systemd.System",
        "parameters": {"errno": libc::EREMOTE, "errnoName": "EREMOTE"}}))
    .await;
    assert!(matches!(e, CredsError::NotThisMachine { .. }), "{e:?}");
    // ...and what 257 really sent in tests/vm: for another machine's host key (ENOENT)...
    let e = decrypt_error(json!({"error": "io.systemd.System", "parameters": {"errno": 2}})).await;
    assert!(matches!(e, CredsError::NotThisMachine { .. }), "{e:?}");
    // ...and for another machine's TPM (ENOTRECOVERABLE).
    let e = decrypt_error(json!({"error": "io.systemd.System", "parameters": {"errno": 131}})).await;
    assert!(matches!(e, CredsError::NotThisMachine { .. }), "{e:?}");
}

#[tokio::test]
async fn other_errors_are_typed() {
    let e = decrypt_error(json!({"error": "io.systemd.Credentials.NameMismatch"})).await;
    assert!(matches!(e, CredsError::NameMismatch(ref n) if n == "k"), "{e:?}");
    let e = decrypt_error(json!({"error": "io.systemd.Credentials.BadScope"})).await;
    assert!(matches!(e, CredsError::BadScope), "{e:?}");
    let e = decrypt_error(json!({"error": "org.varlink.service.MethodNotFound",
        "parameters": {"method": "io.systemd.Credentials.Decrypt"}}))
    .await;
    assert!(matches!(e, CredsError::Unsupported { .. }), "{e:?}");
    assert!(e.to_string().contains("systemd >= 256"), "{e}");
    let e = decrypt_error(json!({"error": "org.varlink.service.InvalidParameter",
        "parameters": {"parameter": "scope"}}))
    .await;
    assert!(
        matches!(e, CredsError::InvalidParameter(ref p) if p == "scope"),
        "{e:?}"
    );
    let e = decrypt_error(json!({"error": "io.systemd.Something", "parameters": {"x": 1}})).await;
    assert!(matches!(e, CredsError::Service { .. }), "{e:?}");
}

#[tokio::test]
async fn a_missing_service_says_which_systemd_is_needed() {
    let dir = tempfile::tempdir().unwrap();
    let cred = EncryptedCredential::from_base64(&blob(HOST_TPM2_SCOPED)).unwrap();
    let e = Credentials::at(dir.path().join("nothing-here"))
        .decrypt(&cred, None, Scope::User)
        .await
        .unwrap_err();
    assert!(matches!(e, CredsError::ServiceUnavailable { .. }), "{e:?}");
    assert!(e.to_string().contains("systemd >= 256"), "{e}");
}

#[test]
fn credential_files_are_checked() {
    assert!(EncryptedCredential::from_base64("not base64!").is_err());
    assert!(EncryptedCredential::from_base64(&B64.encode([0u8; 40])).is_err());
    // Line-wrapped files (systemd-creds --pretty style) are accepted.
    let b = blob(HOST_TPM2_SCOPED);
    let wrapped = format!("{}\n{}\n", &b[..10], &b[10..]);
    let c = EncryptedCredential::from_base64(&wrapped).unwrap();
    assert_eq!(c.as_base64(), b);
    assert!(c.binding().unwrap().uses_tpm2());
}

#[tokio::test]
async fn an_explicit_key_choice_on_257_is_reported_as_unsupported() {
    // systemd 257 has no withKey in Encrypt and answers InvalidParameter.
    let (_d, path, _req) = serve_once(json!({"error": "org.varlink.service.InvalidParameter",
        "parameters": {"parameter": "withKey"}}))
    .await;
    let r = EncryptRequest {
        name: None,
        scope: Scope::System,
        with_key: Some(WithKey::Tpm2),
        not_after_usec: None,
    };
    let e = Credentials::at(&path).encrypt(&r, b"x").await.unwrap_err();
    assert!(matches!(e, CredsError::Unsupported { .. }), "{e:?}");
    assert!(e.to_string().contains("257"), "{e}");
}

#[tokio::test]
async fn check_reads_the_interface_description() {
    // An excerpt of what systemd 257 answers (its IDL has scope but no withKey).
    let idl = "interface io.systemd.Credentials\nmethod Encrypt(\n\tname: ?string,\n\tdata: ?string,\n\tscope: ?string,\n\tuid: ?int\n) -> (blob: string)\n";
    let (_d, path, req) = serve_once(json!({"parameters": {"description": idl}})).await;
    let info = Credentials::at(&path).check().await.unwrap();
    assert!(info.user_scope);
    assert!(!info.with_key);
    let req = req.await.unwrap();
    assert_eq!(req["method"], "org.varlink.service.GetInterfaceDescription");
    assert_eq!(req["parameters"]["interface"], "io.systemd.Credentials");

    let (_d, path, _req) = serve_once(json!({"error": "org.varlink.service.InterfaceNotFound",
        "parameters": {"interface": "io.systemd.Credentials"}}))
    .await;
    let e = Credentials::at(&path).check().await.unwrap_err();
    assert!(matches!(e, CredsError::Unsupported { .. }), "{e:?}");
}

#[tokio::test]
async fn permission_denied_with_empty_parameters_is_typed() {
    // What systemd 257 answers an unprivileged caller asking for the system scope.
    let e = decrypt_error(json!({"error": "org.varlink.service.PermissionDenied", "parameters": {}})).await;
    assert!(matches!(e, CredsError::PermissionDenied { .. }), "{e:?}");
}
