//! `cohort image push`: an image from cohort's blob store to a real distribution registry
//! (Debian's `docker-registry`) started on loopback, then pulled by a disposable podman.
//! Needs docker-registry (tests/run.sh installs it) and podman + runc.

#[path = "support/podman.rs"]
mod podman_support;
mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use podman_support::PodmanService;
use support::*;

const LOCAL_TAG: &str = "localhost/push-test:1";
const USER: &str = "pusher";
const PASSWORD: &str = "push-test-password-7";
/// bcrypt of PASSWORD (cost 4), for the registry's htpasswd file.
const PASSWORD_BCRYPT: &str = "$2b$04$5vyq6ojw5LpqXYLhwJLrpeQiW6uPwhYF996f.NFLpIzXknZNCTGxS";

/// A registry on 127.0.0.1:<free port> with its own storage; stopped on drop.
struct Registry {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Registry {
    /// With `tls`, it serves HTTPS with a self-signed certificate for 127.0.0.1.
    fn start(dir: &Path, htpasswd: bool, tls: bool) -> Registry {
        let bin = Path::new("/usr/bin/docker-registry");
        assert!(
            bin.exists(),
            "no docker-registry: `apt-get install docker-registry` (tests/run.sh does)"
        );
        std::fs::create_dir_all(dir.join("storage")).unwrap();
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let auth = if htpasswd {
            std::fs::write(dir.join("htpasswd"), format!("{USER}:{PASSWORD_BCRYPT}\n")).unwrap();
            format!(
                "auth:\n  htpasswd:\n    realm: test-realm\n    path: {}\n",
                dir.join("htpasswd").display()
            )
        } else {
            String::new()
        };
        let tls = if tls {
            let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
            let out = Command::new("openssl")
                .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"])
                .args(["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"])
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(&cert)
                .output()
                .unwrap();
            assert!(out.status.success(), "openssl: {}", text(&out));
            format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            )
        } else {
            String::new()
        };
        let config = dir.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: 127.0.0.1:{port}\n{tls}{auth}",
                dir.join("storage").display()
            ),
        )
        .unwrap();
        let log = dir.join("registry.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(bin)
            .arg("serve")
            .arg(&config)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let me = Registry { child, port, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
                let _ = s.write_all(b"GET /v2/ HTTP/1.0\r\n\r\n");
                let mut buf = String::new();
                let _ = s.read_to_string(&mut buf);
                if buf.starts_with("HTTP/1.") {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "registry did not start:\n{}", me.log());
            std::thread::sleep(Duration::from_millis(100));
        }
        me
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Blob uploads the registry started (`POST …/blobs/uploads/`), from its access log.
    fn uploads(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("\"POST /v2/") && l.contains("/blobs/uploads/"))
            .count()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A small image (two programs and the skeleton) built into a blob store of its own under
/// `cache` (cohort's `XDG_CACHE_HOME` layout) and tagged LOCAL_TAG, as `cohort image build`
/// records it. Returns the config digest (the image id).
fn build_small_image(cache: &Path) -> String {
    let store = cohort_oci::BlobStore::open(cache.join("cohort/image/blobs")).unwrap();
    let spec = cohort_oci::BuildSpec {
        programs: vec![PathBuf::from("/usr/bin/true"), PathBuf::from("/usr/bin/echo")],
        source_date_epoch: 1,
        ..Default::default()
    };
    let image = cohort_oci::build(&spec, &store).unwrap();
    store.tag(LOCAL_TAG, &image).unwrap();
    image.config_digest
}

fn push(s: &Scratch, cache: &Path, args: &[&str]) -> std::process::Output {
    s.cohort()
        .env("XDG_CACHE_HOME", cache)
        .env("HOME", s.tmp.path())
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("REGISTRY_AUTH_FILE")
        .args(["image", "push", "--tag", LOCAL_TAG])
        .args(args)
        .output()
        .unwrap()
}

/// `blobs pushed N (B bytes), already there M (B bytes)` → (N, M).
fn counts(out: &std::process::Output) -> (usize, usize) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("blobs pushed "))
        .unwrap_or_else(|| panic!("no report line:\n{}", text(out)));
    let nums: Vec<usize> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    (nums[0], nums[2])
}

#[test]
fn push_then_push_again_then_podman_pulls_it() {
    let s = Scratch::new();
    let cache = s.tmp.path().join("cache");
    let config_digest = build_small_image(&cache);
    let registry = Registry::start(&s.tmp.path().join("registry"), false, false);
    let reference = format!("127.0.0.1:{}/team/cohort:v1", registry.port);

    let out = push(&s, &cache, &[&reference, "--tls-verify=false"]);
    assert_eq!(code(&out), 0, "{}\nregistry:\n{}", text(&out), registry.log());
    let (pushed, existed) = counts(&out);
    // Layers (programs, skeleton) and the config.
    assert!(pushed >= 3, "{}", text(&out));
    assert_eq!(existed, 0);
    assert_eq!(registry.uploads(), pushed, "{}", registry.log());
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(stdout.contains(&format!("id {config_digest}")), "{stdout}");
    let pinned = stdout
        .lines()
        .find_map(|l| l.strip_prefix("pinned "))
        .unwrap_or_else(|| panic!("no pinned line: {stdout}"))
        .to_owned();
    assert!(pinned.starts_with(&format!("127.0.0.1:{}/team/cohort@sha256:", registry.port)));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("pushed"),
        "{}",
        text(&out)
    );

    // Again: every blob is there, none is uploaded.
    let out = push(&s, &cache, &[&reference, "--tls-verify=false"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert_eq!(counts(&out), (0, pushed), "{}", text(&out));
    assert_eq!(
        registry.uploads(),
        pushed,
        "no upload the second time:\n{}",
        registry.log()
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("already there"));

    // A disposable podman pulls it: the image id is the config digest.
    let service = PodmanService::start();
    let pull = service
        .cli()
        .args(["pull", "--tls-verify=false", "--quiet", &reference])
        .output()
        .unwrap();
    assert!(pull.status.success(), "podman pull: {}", text(&pull));
    let id = service
        .cli()
        .args(["image", "inspect", "--format", "{{.Id}}", &reference])
        .output()
        .unwrap();
    assert!(id.status.success(), "{}", text(&id));
    assert_eq!(
        format!("sha256:{}", String::from_utf8_lossy(&id.stdout).trim()),
        config_digest
    );
    // By digest too: the same image.
    let pull = service
        .cli()
        .args(["pull", "--tls-verify=false", "--quiet", &pinned])
        .output()
        .unwrap();
    assert!(pull.status.success(), "podman pull {pinned}: {}", text(&pull));
    assert_eq!(
        String::from_utf8_lossy(&pull.stdout).trim(),
        config_digest.trim_start_matches("sha256:")
    );
    // And it runs (the programs layer is complete).
    let run = service
        .cli()
        .args([
            "run",
            "--rm",
            "--network",
            "none",
            &reference,
            "/usr/bin/echo",
            "pulled",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&run.stdout).trim(), "pulled", "{}", text(&run));
}

#[test]
fn push_with_credentials_from_an_auth_file() {
    let s = Scratch::new();
    let cache = s.tmp.path().join("cache");
    build_small_image(&cache);
    let registry = Registry::start(&s.tmp.path().join("registry"), true, false);
    let reference = format!("127.0.0.1:{}/cohort:1", registry.port);

    // No credentials: refused, with how to log in; exit 1.
    let out = push(&s, &cache, &[&reference, "--tls-verify=false"]);
    assert_eq!(code(&out), 1, "{}", text(&out));
    assert!(text(&out).contains("podman login"), "{}", text(&out));

    // Credentials in ~/.docker/config.json (the last file read): accepted.
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    std::fs::create_dir_all(s.tmp.path().join(".docker")).unwrap();
    std::fs::write(
        s.tmp.path().join(".docker/config.json"),
        format!(r#"{{"auths":{{"127.0.0.1:{}":{{"auth":"{auth}"}}}}}}"#, registry.port),
    )
    .unwrap();
    let out = push(&s, &cache, &[&reference, "--tls-verify=false"]);
    assert_eq!(code(&out), 0, "{}\n{}", text(&out), registry.log());
    assert!(counts(&out).0 >= 3);
    assert!(!text(&out).contains(PASSWORD) && !text(&out).contains(&auth));

    // $REGISTRY_AUTH_FILE comes first: a wrong password there is refused.
    let wrong = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:wrong"));
    let file = s.tmp.path().join("auth.json");
    std::fs::write(
        &file,
        format!(
            r#"{{"auths":{{"127.0.0.1:{}/cohort":{{"auth":"{wrong}"}}}}}}"#,
            registry.port
        ),
    )
    .unwrap();
    let out = s
        .cohort()
        .env("XDG_CACHE_HOME", &cache)
        .env("HOME", s.tmp.path())
        .env("REGISTRY_AUTH_FILE", &file)
        .args(["image", "push", "--tag", LOCAL_TAG, &reference, "--tls-verify=false"])
        .output()
        .unwrap();
    assert_eq!(code(&out), 1, "{}", text(&out));
    assert!(!text(&out).contains("wrong"), "{}", text(&out));
}

#[test]
fn push_errors() {
    let s = Scratch::new();
    let cache = s.tmp.path().join("cache");
    build_small_image(&cache);
    // Usage: no registry host in the reference; a tag that was never built.
    let out = push(&s, &cache, &["cohort:1"]);
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(text(&out).contains("HOST[:PORT]/NAME"), "{}", text(&out));
    let out = s
        .cohort()
        .env("XDG_CACHE_HOME", &cache)
        .args(["image", "push", "--tag", "localhost/never-built:1", "127.0.0.1:1/c:1"])
        .output()
        .unwrap();
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(text(&out).contains("cohort image build"), "{}", text(&out));

    // Nothing listens: a clear error, exit 1.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let out = push(&s, &cache, &[&format!("127.0.0.1:{port}/c:1"), "--tls-verify=false"]);
    assert_eq!(code(&out), 1, "{}", text(&out));
    assert!(text(&out).contains("cannot reach the registry"), "{}", text(&out));

    // A plain-HTTP registry without --tls-verify=false: refused, saying which option.
    let registry = Registry::start(&s.tmp.path().join("registry"), false, false);
    let out = push(&s, &cache, &[&format!("127.0.0.1:{}/c:1", registry.port)]);
    assert_eq!(code(&out), 1, "{}", text(&out));
    assert!(text(&out).contains("--tls-verify=false"), "{}", text(&out));
    assert_eq!(registry.uploads(), 0);
}

/// A registry with a self-signed certificate: refused with verification (naming the option),
/// pushed over HTTPS (not plain HTTP) with --tls-verify=false.
#[test]
fn push_over_https_with_a_self_signed_certificate() {
    let s = Scratch::new();
    let cache = s.tmp.path().join("cache");
    build_small_image(&cache);
    let registry = Registry::start(&s.tmp.path().join("registry"), false, true);
    let reference = format!("127.0.0.1:{}/cohort:1", registry.port);
    let out = push(&s, &cache, &[&reference]);
    assert_eq!(code(&out), 1, "{}", text(&out));
    assert!(text(&out).contains("--tls-verify=false"), "{}", text(&out));
    assert_eq!(registry.uploads(), 0);
    let out = push(&s, &cache, &[&reference, "--tls-verify=false"]);
    assert_eq!(code(&out), 0, "{}\n{}", text(&out), registry.log());
    assert!(text(&out).contains("over https"), "{}", text(&out));
    assert_eq!(registry.uploads(), counts(&out).0);
}
