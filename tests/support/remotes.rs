//! Real git servers on loopback for the fetch and push tests, each under its own temp dir and
//! ended on drop (with everything it forked):
//!
//! - [`HttpsOrigin`]: nginx + fcgiwrap + `git http-backend` over TLS (a test CA made with the
//!   openssl CLI) with basic auth and push, a redirecting location, a location that wants an
//!   extra request header, plain http on a second port, and an access log to assert on;
//! - [`ConnectProxy`]: an HTTP CONNECT proxy that records the targets it tunnelled to;
//! - [`SshOrigin`]: sshd with its own host key, one authorized test key and one that is not.
//!
//! The product talks to them itself; tests set up and inspect with the git, openssl and ssh
//! CLIs. Runs as root (sshd logs in as root). Needs nginx, fcgiwrap, openssh-server,
//! openssh-client and openssl: `tests/run.sh` installs them.

mod proxy;
mod ssh;

// Every test crate compiles the support; not every one uses every server.
#[allow(unused_imports)]
pub use {proxy::ConnectProxy, ssh::SshOrigin};

use std::fs::File;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The basic-auth user of [`HttpsOrigin`].
pub const HTTPS_USER: &str = "cohort-test";

/// How many times a server is started on freshly picked ports when another process took one
/// between picking and binding.
const PORT_ATTEMPTS: usize = 5;

/// Runs a set-up command and returns its stdout; panics with its stderr when it fails.
fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {:?}: {e}", cmd.get_program()));
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn temp_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("creating a temp dir for a test server")
}

/// `n` distinct loopback ports free a moment ago (bound together, then released): nginx and
/// sshd cannot be told to bind port 0 and report it.
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0 to pick a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("a bound listener's address").port())
        .collect()
}

/// A server process in its own process group, so that ending it also ends the workers and
/// CGI programs it forked.
struct Proc {
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn spawn(cmd: &mut Command, log: &Path) -> Proc {
        let out = File::create(log).expect("creating a test server's log");
        let err = out.try_clone().expect("cloning a log file handle");
        let child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {:?} ({e}): run tests/run.sh to install it",
                    cmd.get_program()
                )
            });
        Proc {
            child: Some(child),
            log: log.to_owned(),
        }
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits until `ready()`; `Err(log)` when the process ended first. Panics after 15 s.
    fn wait_ready(&mut self, what: &str, ready: impl Fn() -> bool) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if ready() {
                return Ok(());
            }
            let child = self.child.as_mut().expect("a started process");
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                return Err(format!("{what} exited ({status}):\n{log}"));
            }
            assert!(Instant::now() < deadline, "{what} did not come up in 15 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL to the whole process group, then reap the leader.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on the group this process leads (spawned with process_group(0));
            // the leader is not reaped yet, so the group id cannot name anyone else.
            unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
            let _ = child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `pid` (a pid file's content) names the process `proc` started.
fn pid_file_names(path: &Path, proc: Option<u32>) -> bool {
    let written = std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    written.is_some() && written == proc
}

/// A test CA and a server certificate it signed for IP 127.0.0.1 and DNS localhost (EC P-256,
/// which rustls and curl both take), made with the openssl CLI in `dir`: `ca.pem`,
/// `server.pem` and `server.key`. Returns the CA certificate's path.
pub fn make_test_ca(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).expect("creating the TLS dir");
    let cnf = dir.join("openssl.cnf");
    std::fs::write(
        &cnf,
        "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = cohort test\n\
         [ca_ext]\nbasicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\n\
         subjectKeyIdentifier = hash\n\
         [server_ext]\nbasicConstraints = critical,CA:FALSE\nkeyUsage = critical,digitalSignature\n\
         extendedKeyUsage = serverAuth\nsubjectAltName = IP:127.0.0.1,DNS:localhost\n\
         subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n",
    )
    .expect("writing openssl.cnf");
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let ca_pem = dir.join("ca.pem");
    run(
        Command::new("openssl")
            .args(["req", "-x509", "-config"])
            .arg(&cnf)
            .args(["-extensions", "ca_ext", "-days", "30", "-subj", "/CN=cohort test CA"])
            .args(ec)
            .arg("-keyout")
            .arg(dir.join("ca.key"))
            .arg("-out")
            .arg(&ca_pem),
        "openssl: the test CA",
    );
    run(
        Command::new("openssl")
            .args(["req", "-new", "-config"])
            .arg(&cnf)
            .args(["-subj", "/CN=127.0.0.1"])
            .args(ec)
            .arg("-keyout")
            .arg(dir.join("server.key"))
            .arg("-out")
            .arg(dir.join("server.csr")),
        "openssl: the server's key and request",
    );
    run(
        Command::new("openssl")
            .args([
                "x509",
                "-req",
                "-days",
                "30",
                "-CAcreateserial",
                "-extensions",
                "server_ext",
            ])
            .arg("-extfile")
            .arg(&cnf)
            .arg("-in")
            .arg(dir.join("server.csr"))
            .arg("-CA")
            .arg(&ca_pem)
            .arg("-CAkey")
            .arg(dir.join("ca.key"))
            .arg("-out")
            .arg(dir.join("server.pem")),
        "openssl: signing the server certificate",
    );
    ca_pem
}

/// nginx's configuration; `@NAME@` are filled in by [`HttpsOrigin::start`].
const NGINX_CONF: &str = r#"daemon off;
master_process off;
pid "@DIR@/nginx.pid";
error_log "@DIR@/logs/error.log" info;
events { worker_connections 512; }
http {
    log_format git '$scheme "$request" $status $body_bytes_sent user="$remote_user" '
                   'git_protocol="$http_git_protocol" te="$http_transfer_encoding" '
                   'x_cohort_test="$http_x_cohort_test" ua="$http_user_agent"';
    access_log "@DIR@/logs/access.log" git;
    client_body_temp_path "@DIR@/tmp/body";
    fastcgi_temp_path "@DIR@/tmp/fastcgi";
    proxy_temp_path "@DIR@/tmp/proxy";
    uwsgi_temp_path "@DIR@/tmp/uwsgi";
    scgi_temp_path "@DIR@/tmp/scgi";
    # Any pack size; chunked request bodies are buffered whole before http-backend reads them.
    client_max_body_size 0;
    server {
        listen 127.0.0.1:@HTTPS_PORT@ ssl;
        listen 127.0.0.1:@HTTP_PORT@;
        ssl_certificate "@DIR@/tls/server.pem";
        ssl_certificate_key "@DIR@/tls/server.key";
        # A moved repository: git follows the first request's redirect and stays there.
        location ~ ^/redirect(/.*)$ {
            return 301 $scheme://$http_host/git$1$is_args$args;
        }
        location ~ ^/git(/.*)$ {
            include "@DIR@/git-backend.conf";
        }
        # The same repositories behind a gate that wants `X-Cohort-Test: yes` (http.extraHeader).
        location ~ ^/needs-header(/.*)$ {
            if ($http_x_cohort_test != "yes") {
                return 403;
            }
            include "@DIR@/git-backend.conf";
        }
        location / {
            return 404;
        }
    }
}
"#;

/// The git locations' common part: basic auth, then `git http-backend` through fcgiwrap
/// (`$1`: the path below the location's prefix).
const GIT_BACKEND_CONF: &str = r#"auth_basic "cohort test";
auth_basic_user_file "@DIR@/htpasswd";
fastcgi_pass unix:@DIR@/fcgiwrap.sock;
fastcgi_param SCRIPT_FILENAME "@BACKEND@";
fastcgi_param GATEWAY_INTERFACE CGI/1.1;
fastcgi_param SERVER_PROTOCOL $server_protocol;
fastcgi_param REQUEST_METHOD $request_method;
fastcgi_param QUERY_STRING $query_string;
fastcgi_param CONTENT_TYPE $content_type;
fastcgi_param CONTENT_LENGTH $content_length;
fastcgi_param REMOTE_ADDR $remote_addr;
# http-backend serves receive-pack (push) only to an authenticated user.
fastcgi_param REMOTE_USER $remote_user;
fastcgi_param PATH_INFO $1;
fastcgi_param GIT_PROJECT_ROOT "@ROOT@";
fastcgi_param GIT_HTTP_EXPORT_ALL 1;
# The client's `Git-Protocol` header (`version=2`, `version=1`; none: v0), the documented
# way. (Today's http-backend also reads HTTP_GIT_PROTOCOL itself, so v2 works either way.)
fastcgi_param GIT_PROTOCOL $http_git_protocol if_not_empty;
# As the tests' git CLI: repositories another test user owns are served too.
fastcgi_param GIT_CONFIG_COUNT 1;
fastcgi_param GIT_CONFIG_KEY_0 safe.directory;
fastcgi_param GIT_CONFIG_VALUE_0 "*";
fastcgi_param PATH /usr/local/bin:/usr/bin:/bin;
fastcgi_param HOME "@DIR@/home";
"#;

/// nginx + fcgiwrap + `git http-backend` serving the bare repositories under a directory,
/// over https (and plain http on a second port), as user [`HTTPS_USER`] with a password.
pub struct HttpsOrigin {
    dir: tempfile::TempDir,
    /// The https port.
    pub port: u16,
    /// The plain-http port ([`HttpsOrigin::http_url`]).
    pub http_port: u16,
    /// The test CA's certificate (PEM): the server's certificate chains to it.
    pub ca_pem: PathBuf,
    /// The directory of bare repositories served (`GIT_PROJECT_ROOT`).
    pub root: PathBuf,
    password: String,
    nginx: Proc,
    fcgiwrap: Proc,
}

/// `NAME.git` for `NAME` or `NAME.git`.
fn repo_path(name: &str) -> String {
    let name = name.trim_start_matches('/');
    if name.ends_with(".git") {
        name.to_owned()
    } else {
        format!("{name}.git")
    }
}

/// `s` percent-encoded for a URL's userinfo.
pub fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl HttpsOrigin {
    /// Serves the bare repositories under `root` (`NAME.git`, reached as `url("NAME")`) to
    /// [`HTTPS_USER`] with `password`.
    pub fn start(root: &Path, password: &str) -> HttpsOrigin {
        let root = root
            .canonicalize()
            .unwrap_or_else(|e| panic!("the repositories' root {}: {e}", root.display()));
        let dir = temp_dir("cohort-https-");
        let d = dir.path().to_owned();
        for sub in ["logs", "tmp", "home"] {
            std::fs::create_dir_all(d.join(sub)).expect("creating the server's dirs");
        }
        let ca_pem = make_test_ca(&d.join("tls"));

        let pw_file = d.join("password");
        std::fs::write(&pw_file, format!("{password}\n")).expect("writing the password file");
        let hash = run(
            Command::new("openssl").args(["passwd", "-apr1", "-in"]).arg(&pw_file),
            "openssl passwd",
        );
        std::fs::remove_file(&pw_file).expect("removing the password file");
        std::fs::write(d.join("htpasswd"), format!("{HTTPS_USER}:{}\n", hash.trim())).expect("writing htpasswd");

        let exec_path = run(Command::new("git").arg("--exec-path"), "git --exec-path");
        let backend = Path::new(exec_path.trim()).join("git-http-backend");
        assert!(backend.exists(), "{} missing", backend.display());
        let fill = |text: &str| {
            text.replace("@DIR@", &d.display().to_string())
                .replace("@ROOT@", &root.display().to_string())
                .replace("@BACKEND@", &backend.display().to_string())
        };
        std::fs::write(d.join("git-backend.conf"), fill(GIT_BACKEND_CONF)).expect("writing git-backend.conf");

        // A few workers: one fcgiwrap process runs one CGI request at a time.
        let socket = d.join("fcgiwrap.sock");
        let mut fcgiwrap = Proc::spawn(
            Command::new("/usr/sbin/fcgiwrap")
                .args(["-f", "-c", "4", "-s"])
                .arg(format!("unix:{}", socket.display())),
            &d.join("logs/fcgiwrap.log"),
        );
        if let Err(log) = fcgiwrap.wait_ready("fcgiwrap", || socket.exists()) {
            panic!("{log}");
        }

        let pid_file = d.join("nginx.pid");
        for attempt in 1..=PORT_ATTEMPTS {
            let ports = free_ports(2);
            let conf = fill(NGINX_CONF)
                .replace("@HTTPS_PORT@", &ports[0].to_string())
                .replace("@HTTP_PORT@", &ports[1].to_string());
            std::fs::write(d.join("nginx.conf"), conf).expect("writing nginx.conf");
            let _ = std::fs::remove_file(&pid_file);
            let mut nginx = Proc::spawn(
                Command::new("/usr/sbin/nginx")
                    .arg("-p")
                    .arg(&d)
                    .arg("-c")
                    .arg(d.join("nginx.conf"))
                    .arg("-e")
                    .arg(d.join("logs/error.log")),
                &d.join("logs/nginx.out"),
            );
            // nginx writes its pid file once its ports are bound.
            let pid = nginx.pid();
            match nginx.wait_ready("nginx", || pid_file_names(&pid_file, pid)) {
                Ok(()) => {
                    return HttpsOrigin {
                        port: ports[0],
                        http_port: ports[1],
                        ca_pem,
                        root,
                        password: password.to_owned(),
                        nginx,
                        fcgiwrap,
                        dir,
                    };
                }
                Err(log) => {
                    let log = log + &std::fs::read_to_string(d.join("logs/error.log")).unwrap_or_default();
                    assert!(
                        log.contains("Address already in use") && attempt < PORT_ATTEMPTS,
                        "{log}"
                    );
                }
            }
        }
        unreachable!("the last attempt panics")
    }

    /// `https://127.0.0.1:PORT/git/NAME.git` (`name`: `NAME` or `NAME.git`).
    pub fn url(&self, name: &str) -> String {
        format!("https://127.0.0.1:{}/git/{}", self.port, repo_path(name))
    }

    /// [`HttpsOrigin::url`] with the user and password in it.
    pub fn url_with_password(&self, name: &str) -> String {
        format!(
            "https://{HTTPS_USER}:{}@127.0.0.1:{}/git/{}",
            percent_encode(&self.password),
            self.port,
            repo_path(name)
        )
    }

    /// A URL whose requests are answered with a 301 to the same path under [`HttpsOrigin::url`].
    pub fn redirect_url(&self, name: &str) -> String {
        format!("https://127.0.0.1:{}/redirect/{}", self.port, repo_path(name))
    }

    /// The same repository behind a 403 unless the request has the header `X-Cohort-Test: yes`.
    pub fn header_url(&self, name: &str) -> String {
        format!("https://127.0.0.1:{}/needs-header/{}", self.port, repo_path(name))
    }

    /// The same repository over plain http (same user and password).
    pub fn http_url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/git/{}", self.http_port, repo_path(name))
    }

    pub fn user(&self) -> &str {
        HTTPS_USER
    }

    pub fn password(&self) -> &str {
        &self.password
    }

    /// One line a request: `SCHEME "METHOD PATH?QUERY HTTP/1.1" STATUS BYTES user="…"
    /// git_protocol="…" te="…" x_cohort_test="…" ua="…"` (`te`: the request's
    /// Transfer-Encoding, `chunked` for a streamed push; a header not sent shows as `-`).
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("logs/access.log")).unwrap_or_default()
    }

    /// nginx's error log (with http-backend's stderr, which fcgiwrap forwards).
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("logs/error.log")).unwrap_or_default()
    }

    /// The server processes' pids (nginx, fcgiwrap) while running.
    pub fn pids(&self) -> Vec<u32> {
        self.nginx.pid().into_iter().chain(self.fcgiwrap.pid()).collect()
    }

    /// Ends nginx and fcgiwrap (and what they forked): the ports then refuse connections.
    pub fn stop(&mut self) {
        self.nginx.kill();
        self.fcgiwrap.kill();
    }
}

impl Drop for HttpsOrigin {
    fn drop(&mut self) {
        self.stop();
    }
}
