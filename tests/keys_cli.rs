//! `cohort keys` on this host: the lookup order, and bad input refused without writing
//! anything. (Sealing and unsealing with systemd and a TPM is proven in the VM test,
//! tests/vm/test-service.sh: this host has no systemd.)

mod support;
use std::io::Write;
use std::process::Stdio;
use support::*;

const KEY: &str = "sk-keys-cli-test-0123456789";

fn keys(s: &Scratch, args: &[&str], stdin: &str, env: &[(&str, &str)]) -> std::process::Output {
    let mut c = s.cohort();
    c.env("HOME", s.tmp.path())
        .env_remove("CREDENTIALS_DIRECTORY")
        .arg("keys")
        .args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn lookup_order_environment_then_credentials_directory() {
    let s = Scratch::new();
    let creds = s.tmp.path().join("creds");
    std::fs::create_dir_all(&creds).unwrap();
    std::fs::write(creds.join("cohort.openai_api_key"), format!("{KEY}\n")).unwrap();
    let dir = creds.to_str().unwrap();

    let out = keys(
        &s,
        &["check"],
        "",
        &[("OPENAI_API_KEY", KEY), ("CREDENTIALS_DIRECTORY", dir)],
    );
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(
        text(&out).contains("environment variable OPENAI_API_KEY"),
        "{}",
        text(&out)
    );

    let out = keys(&s, &["check"], "", &[("CREDENTIALS_DIRECTORY", dir)]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(text(&out).contains("systemd credential"), "{}", text(&out));
    assert!(!text(&out).contains(KEY), "the key is never printed");

    // `[agent] key` names another credential.
    s.write("cohort.toml", "[agent]\nkey = \"other\"\n");
    let out = keys(&s, &["check"], "", &[("CREDENTIALS_DIRECTORY", dir)]);
    assert_eq!(code(&out), 1, "{}", text(&out));
    assert!(text(&out).contains("cohort keys place other"), "{}", text(&out));
}

#[test]
fn bad_input_is_refused_and_nothing_is_written() {
    let s = Scratch::new();
    let out = keys(&s, &["place", "../etc/x"], KEY, &[]);
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(text(&out).contains("not a valid key name"), "{}", text(&out));

    let out = keys(&s, &["place", "k", "--scope", "user"], "\n", &[]);
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(text(&out).contains("empty"), "{}", text(&out));

    // No systemd here: a clear error that names the version needed, exit 2, no file.
    let out = keys(&s, &["place", "k", "--scope", "user"], KEY, &[]);
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(text(&out).contains("systemd >= 256"), "{}", text(&out));
    assert!(!s.tmp.path().join(".config/credstore.encrypted/cohort.k").exists());
    assert!(!text(&out).contains(KEY), "the key is never printed");

    let out = keys(&s, &["remove", "nothing-here", "--scope", "user"], "", &[]);
    assert_eq!(code(&out), 1, "{}", text(&out));
}

#[test]
fn a_credential_in_the_store_that_cannot_be_decrypted_is_an_error_not_a_fallthrough() {
    let s = Scratch::new();
    // A user-scope credential file exists, but there is no systemd to decrypt it: the
    // lookup must fail loudly rather than run without (or with another) key.
    let store = s.tmp.path().join(".config/credstore.encrypted");
    std::fs::create_dir_all(&store).unwrap();
    // 16 bytes of the host-key id, then opaque bytes: a well-formed credential's shape.
    std::fs::write(store.join("cohort.openai_api_key"), "Whxqht+dQJax1aZeCGLxmgcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=\n").unwrap();
    let out = keys(&s, &["check", "--scope", "user"], "", &[]);
    assert_ne!(code(&out), 0, "{}", text(&out));
    assert!(text(&out).contains("io.systemd.Credentials"), "{}", text(&out));
    let list = keys(&s, &["list", "--json"], "", &[]);
    assert_eq!(code(&list), 0, "{}", text(&list));
    let v: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(v[0]["name"], "openai_api_key", "{v}");
    assert_eq!(v[0]["binding"], "host key", "{v}");
}
