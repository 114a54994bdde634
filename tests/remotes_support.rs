//! The test support's git servers (`support::remotes`) proven with the git CLI alone: clone,
//! fetch and push over https (test CA, basic auth, redirect, extra header, protocol v2, a
//! CONNECT proxy) and over ssh (an authorized key, a refused one).

mod support;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use support::remotes::{percent_encode, ConnectProxy, HttpsOrigin, SshOrigin, HTTPS_USER};

/// With characters a URL must percent-encode.
const PASSWORD: &str = "pa ss/w:rd@7";

/// A served root with `demo.git` (one commit on `main`) and a clean HOME for the git CLI.
struct Repos {
    tmp: tempfile::TempDir,
    root: PathBuf,
    home: PathBuf,
}

fn repos() -> Repos {
    let tmp = tempfile::tempdir().expect("a temp dir");
    let (root, home, seed) = (
        tmp.path().join("root"),
        tmp.path().join("home"),
        tmp.path().join("seed"),
    );
    std::fs::create_dir_all(&root).expect("creating the root");
    std::fs::create_dir_all(&home).expect("creating HOME");
    let bare = root.join("demo.git");
    support::git_in(tmp.path(), &["init", "-q", "--bare", "-b", "main", path(&bare)]);
    support::git_in(tmp.path(), &["clone", "-q", path(&bare), path(&seed)]);
    std::fs::write(seed.join("README.md"), "# demo\n").expect("writing README.md");
    support::git_in(&seed, &["add", "."]);
    support::git_in(&seed, &["commit", "-q", "-m", "initial"]);
    support::git_in(&seed, &["push", "-q", "origin", "HEAD:main"]);
    Repos { tmp, root, home }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 temp path")
}

/// The git CLI as a clean user: HOME of its own, no system config, no prompts, no proxy, CA
/// or ssh settings from the environment.
fn git(r: &Repos, cwd: &Path, args: &[&str]) -> Output {
    git_cmd(r, cwd, args).output().expect("git runs")
}

fn git_cmd(r: &Repos, cwd: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("git");
    c.args(args)
        .current_dir(cwd)
        .env("HOME", &r.home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_AUTHOR_NAME", "Test")
        .env("GIT_AUTHOR_EMAIL", "test@example.com")
        .env("GIT_COMMITTER_NAME", "Test")
        .env("GIT_COMMITTER_EMAIL", "test@example.com");
    for var in [
        "GIT_ASKPASS",
        "SSH_ASKPASS",
        "GIT_SSH",
        "GIT_SSH_COMMAND",
        // This machine points these at its CA bundle; GIT_SSL_CAINFO beats http.sslCAInfo.
        "GIT_SSL_CAINFO",
        "GIT_SSL_CAPATH",
        "CURL_CA_BUNDLE",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "http_proxy",
        "https_proxy",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
        "no_proxy",
        "NO_PROXY",
    ] {
        c.env_remove(var);
    }
    c
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// stderr of a git command that must fail.
fn fails(out: Output, what: &str) -> String {
    assert!(
        !out.status.success(),
        "{what} succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `-c` options trusting the test CA and giving the password from a credential store file.
fn https_config(r: &Repos, origin: &HttpsOrigin) -> Vec<String> {
    let with_password = origin.url_with_password("demo");
    let base = with_password.strip_suffix("/git/demo.git").expect("a repository URL");
    let store = r.home.join("credentials");
    std::fs::write(&store, format!("{base}\n")).expect("writing the credential store");
    [
        format!("http.sslCAInfo={}", origin.ca_pem.display()),
        "credential.helper=".to_owned(),
        format!("credential.helper=store --file={}", store.display()),
    ]
    .into_iter()
    .flat_map(|kv| ["-c".to_owned(), kv])
    .collect()
}

fn with<'a>(config: &'a [String], args: &[&'a str]) -> Vec<&'a str> {
    config.iter().map(String::as_str).chain(args.iter().copied()).collect()
}

/// Access-log lines written while `f` ran.
fn new_log_lines(origin: &HttpsOrigin, f: impl FnOnce()) -> Vec<String> {
    let before = origin.access_log().lines().count();
    f();
    // nginx writes a request's line when it finalizes the request, which may be a moment after
    // the client has read the whole answer and exited: wait until the log stops growing.
    let (mut seen, mut still) = (origin.access_log().lines().count(), 0);
    for _ in 0..30 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let now = origin.access_log().lines().count();
        still = if now == seen { still + 1 } else { 0 };
        if still >= 4 {
            break;
        }
        seen = now;
    }
    origin.access_log().lines().skip(before).map(String::from).collect()
}

/// 2 MiB that do not compress: a pack larger than git's 1 MiB http.postBuffer goes chunked.
fn incompressible(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn bare_head(r: &Repos) -> String {
    support::git_in(&r.root.join("demo.git"), &["rev-parse", "main"])
        .trim()
        .to_owned()
}

#[test]
fn https_clone_and_chunked_push_with_the_test_ca_and_password() {
    let r = repos();
    let origin = HttpsOrigin::start(&r.root, PASSWORD);
    let url = origin.url("demo");

    // The certificate is checked: without the test CA there is no connection.
    let err = fails(
        git(&r, r.tmp.path(), &["ls-remote", &origin.url_with_password("demo")]),
        "ls-remote without the CA",
    );
    assert!(err.contains("certificate"), "{err}");

    let config = https_config(&r, &origin);
    let work = r.tmp.path().join("work");
    ok(
        git(&r, r.tmp.path(), &with(&config, &["clone", "-q", &url, path(&work)])),
        "clone",
    );
    assert_eq!(
        std::fs::read_to_string(work.join("README.md")).ok().as_deref(),
        Some("# demo\n")
    );

    std::fs::write(work.join("big.bin"), incompressible(2 << 20)).expect("writing big.bin");
    ok(git(&r, &work, &["add", "big.bin"]), "add");
    ok(git(&r, &work, &["commit", "-q", "-m", "big"]), "commit");
    let lines = new_log_lines(&origin, || {
        ok(
            git(&r, &work, &with(&config, &["push", "-q", &url, "HEAD:main"])),
            "push",
        );
    });
    let head = ok(git(&r, &work, &["rev-parse", "HEAD"]), "rev-parse");
    assert_eq!(bare_head(&r), head.trim(), "the push reached the served repository");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("\"POST /git/demo.git/git-receive-pack HTTP/1.1\" 200")
                && l.contains(&format!("user=\"{HTTPS_USER}\""))
                && l.contains("te=\"chunked\"")),
        "a chunked, authenticated receive-pack POST:\n{}",
        lines.join("\n")
    );
}

#[test]
fn https_protocol_versions_reach_http_backend() {
    let r = repos();
    let origin = HttpsOrigin::start(&r.root, PASSWORD);
    let config = https_config(&r, &origin);
    let url = origin.url("demo");
    for (version, logged) in [("2", "version=2"), ("1", "version=1"), ("0", "-")] {
        let lines = new_log_lines(&origin, || {
            let refs = ok(
                git(
                    &r,
                    r.tmp.path(),
                    &with(
                        &config,
                        &["-c", &format!("protocol.version={version}"), "ls-remote", &url],
                    ),
                ),
                "ls-remote",
            );
            assert!(refs.contains("refs/heads/main"), "protocol {version}: {refs}");
        });
        let refs_request = lines
            .iter()
            .find(|l| l.contains("/info/refs?service=git-upload-pack") && l.contains("\" 200 "))
            .unwrap_or_else(|| panic!("no info/refs request:\n{}", lines.join("\n")));
        assert!(
            refs_request.contains(&format!("git_protocol=\"{logged}\"")),
            "{refs_request}"
        );
    }
    // v2's ls-refs is a POST; v0 and v1 answer from info/refs alone.
    let v2 = new_log_lines(&origin, || {
        ok(
            git(
                &r,
                r.tmp.path(),
                &with(&config, &["-c", "protocol.version=2", "ls-remote", &url]),
            ),
            "ls-remote v2",
        );
    });
    assert!(
        v2.iter()
            .any(|l| l.contains("POST /git/demo.git/git-upload-pack") && l.contains("version=2")),
        "{v2:?}"
    );
}

#[test]
fn redirect_is_followed_and_header_gate_wants_the_extra_header() {
    let r = repos();
    let origin = HttpsOrigin::start(&r.root, PASSWORD);
    let config = https_config(&r, &origin);

    let via_redirect = r.tmp.path().join("via-redirect");
    let lines = new_log_lines(&origin, || {
        ok(
            git(
                &r,
                r.tmp.path(),
                &with(
                    &config,
                    &["clone", "-q", &origin.redirect_url("demo"), path(&via_redirect)],
                ),
            ),
            "clone via the redirect",
        );
    });
    assert!(
        lines
            .iter()
            .any(|l| l.contains("GET /redirect/demo.git/info/refs") && l.contains("\" 301 ")),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("POST /git/demo.git/git-upload-pack") && l.contains("\" 200 ")),
        "{lines:?}"
    );

    let header_url = origin.header_url("demo");
    let err = fails(
        git(&r, r.tmp.path(), &with(&config, &["ls-remote", &header_url])),
        "ls-remote without the header",
    );
    assert!(err.contains("403"), "{err}");
    let refs = ok(
        git(
            &r,
            r.tmp.path(),
            &with(
                &config,
                &["-c", "http.extraHeader=X-Cohort-Test: yes", "ls-remote", &header_url],
            ),
        ),
        "ls-remote with the header",
    );
    assert!(refs.contains("refs/heads/main"), "{refs}");
    assert!(
        origin.access_log().contains("x_cohort_test=\"yes\""),
        "{}",
        origin.access_log()
    );
}

#[test]
fn https_wrong_password_is_refused_and_the_right_one_in_the_url_works() {
    let r = repos();
    let origin = HttpsOrigin::start(&r.root, PASSWORD);
    let ca = format!("http.sslCAInfo={}", origin.ca_pem.display());
    let wrong = origin
        .url("demo")
        .replace("https://", &format!("https://{HTTPS_USER}:wrong@"));
    let args = ["-c", &ca, "-c", "credential.helper=", "ls-remote"];
    let err = fails(
        git(&r, r.tmp.path(), &[&args[..], &[wrong.as_str()]].concat()),
        "ls-remote with a wrong password",
    );
    assert!(err.contains("Authentication failed"), "{err}");
    assert!(origin.access_log().contains("\" 401 "), "{}", origin.access_log());
    let right = origin.url_with_password("demo");
    let refs = ok(
        git(&r, r.tmp.path(), &[&args[..], &[right.as_str()]].concat()),
        "ls-remote with the password",
    );
    assert!(refs.contains("refs/heads/main"), "{refs}");
}

#[test]
fn plain_http_serves_the_same_repositories() {
    let r = repos();
    let origin = HttpsOrigin::start(&r.root, PASSWORD);
    let config = https_config(&r, &origin);
    let url = origin.http_url("demo");
    // The credential store holds the https URL's password; plain http needs its own line.
    let err = fails(
        git(&r, r.tmp.path(), &with(&config, &["ls-remote", &url])),
        "ls-remote http without a password",
    );
    assert!(
        err.contains("could not read Username") || err.contains("Authentication"),
        "{err}"
    );
    let with_password = url.replace("http://", &format!("http://{HTTPS_USER}:{}@", percent_encode(PASSWORD)));
    let refs = ok(
        git(&r, r.tmp.path(), &["ls-remote", &with_password]),
        "ls-remote over http",
    );
    assert!(refs.contains("refs/heads/main"), "{refs}");
    assert!(
        origin
            .access_log()
            .lines()
            .any(|l| l.starts_with("http \"GET /git/demo.git/info/refs")),
        "{}",
        origin.access_log()
    );
}

#[test]
fn connect_proxy_tunnels_https_and_records_the_target() {
    let r = repos();
    let origin = HttpsOrigin::start(&r.root, PASSWORD);
    let config = https_config(&r, &origin);
    let proxy = ConnectProxy::start();
    assert!(proxy.targets().is_empty());
    let proxy_url = format!("http.proxy={}", proxy.url());
    let refs = ok(
        git(
            &r,
            r.tmp.path(),
            &with(&config, &["-c", &proxy_url, "ls-remote", &origin.url("demo")]),
        ),
        "ls-remote through the proxy",
    );
    assert!(refs.contains("refs/heads/main"), "{refs}");
    let target = format!("127.0.0.1:{}", origin.port);
    let targets = proxy.targets();
    assert!(
        !targets.is_empty() && targets.iter().all(|t| *t == target),
        "{targets:?}"
    );

    // Without the proxy setting, nothing goes through it.
    ok(
        git(&r, r.tmp.path(), &with(&config, &["ls-remote", &origin.url("demo")])),
        "ls-remote direct",
    );
    assert_eq!(proxy.targets().len(), targets.len());
}

#[test]
fn ssh_clone_and_push_with_the_user_key_and_refused_with_the_wrong_one() {
    let r = repos();
    let ssh = SshOrigin::start();
    let url = ssh.url(&r.root.join("demo.git"));
    assert!(url.starts_with(&format!("ssh://root@127.0.0.1:{}/", ssh.port)), "{url}");
    let ssh_config = format!("core.sshCommand={}", ssh.ssh_command());

    let work = r.tmp.path().join("work");
    ok(
        git(&r, r.tmp.path(), &["-c", &ssh_config, "clone", "-q", &url, path(&work)]),
        "clone over ssh",
    );
    std::fs::write(work.join("more.txt"), "more\n").expect("writing more.txt");
    ok(git(&r, &work, &["add", "more.txt"]), "add");
    ok(git(&r, &work, &["commit", "-q", "-m", "more"]), "commit");
    ok(
        git(&r, &work, &["-c", &ssh_config, "push", "-q", "origin", "HEAD:main"]),
        "push over ssh",
    );
    let head = ok(git(&r, &work, &["rev-parse", "HEAD"]), "rev-parse");
    assert_eq!(bare_head(&r), head.trim(), "the push reached the repository");

    // Protocol v2 over ssh: GIT_PROTOCOL reaches git-upload-pack through sshd's AcceptEnv.
    let traced = git_cmd(
        &r,
        r.tmp.path(),
        &["-c", &ssh_config, "-c", "protocol.version=2", "ls-remote", &url],
    )
    .env("GIT_TRACE_PACKET", "1")
    .output()
    .expect("git runs");
    let trace = String::from_utf8_lossy(&traced.stderr).into_owned();
    assert!(traced.status.success() && trace.contains("< version 2"), "{trace}");

    let wrong = format!("core.sshCommand={}", ssh.ssh_command_with(&ssh.wrong_key));
    let err = fails(
        git(&r, r.tmp.path(), &["-c", &wrong, "ls-remote", &url]),
        "ls-remote with the wrong key",
    );
    assert!(err.contains("Permission denied"), "{err}");
}

#[test]
fn stop_and_drop_end_the_servers() {
    let r = repos();
    let mut origin = HttpsOrigin::start(&r.root, PASSWORD);
    let ssh = SshOrigin::start();
    let (https_pids, ssh_pids) = (origin.pids(), ssh.pids());
    assert_eq!((https_pids.len(), ssh_pids.len()), (2, 1));
    assert!(TcpStream::connect(("127.0.0.1", origin.port)).is_ok());
    origin.stop();
    assert!(
        TcpStream::connect(("127.0.0.1", origin.port)).is_err(),
        "https port still open"
    );
    assert!(
        TcpStream::connect(("127.0.0.1", origin.http_port)).is_err(),
        "http port still open"
    );
    let port = ssh.port;
    drop(ssh);
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err(), "ssh port still open");
    for pid in https_pids.iter().chain(&ssh_pids) {
        assert!(support::gone(&pid.to_string()), "process {pid} still runs");
    }
}

/// The product's https client is rustls (webpki checks certificates more strictly than curl):
/// the test CA and the server's certificate, for 127.0.0.1 and for localhost, pass it.
#[tokio::test]
async fn rustls_trusts_the_test_ca_for_the_ip_and_localhost() {
    let r = repos();
    let origin = HttpsOrigin::start(&r.root, PASSWORD);
    let pem = std::fs::read(&origin.ca_pem).expect("reading the CA");
    let ca = reqwest::Certificate::from_pem(&pem).expect("a PEM certificate");
    let client = reqwest::Client::builder()
        .tls_certs_only([ca])
        .no_proxy()
        .build()
        .expect("a client");
    let refs = format!("{}/info/refs?service=git-upload-pack", origin.url("demo"));
    for url in [refs.clone(), refs.replace("127.0.0.1", "localhost")] {
        let resp = client
            .get(&url)
            .basic_auth(HTTPS_USER, Some(PASSWORD))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e:?}"));
        assert_eq!(resp.status(), 200, "{url}");
        let body = resp.text().await.expect("the advertisement");
        assert!(body.contains("# service=git-upload-pack"), "{body}");
    }
    // Only the test CA makes it trusted: the machine's roots do not.
    let plain = reqwest::Client::builder().no_proxy().build().expect("a client");
    let err = plain.get(&refs).send().await.expect_err("an untrusted certificate");
    assert!(format!("{err:?}").contains("UnknownIssuer"), "{err:?}");
}
