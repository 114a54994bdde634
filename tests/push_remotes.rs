//! cohort's in-process push (`git::push`) over real servers: https (nginx + `git
//! http-backend`, a test CA, basic auth answered through `authenticate`) and ssh (sshd, a
//! test key). Set up and read back with the git CLI.

mod support;

use std::cell::RefCell;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use cohort::git::push::{push, PushError, Pushed, RefOutcome, Update};
use cohort::git::Oid;
use gix::credentials::helper::{Action, NextAction};
use gix::credentials::protocol::Outcome;
use gix::protocol::transport::client::blocking_io::{connect, http, ssh, Transport};
use support::git_in;
use support::remotes::{HttpsOrigin, SshOrigin, HTTPS_USER};

const PASSWORD: &str = "pa ss/w:rd@7";
const SERVICE: &str = "refs/heads/cohort/service";

/// A served root with an empty `demo.git`, and a local repository with two commits.
struct Repos {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    bare: PathBuf,
    work: PathBuf,
    tip: Oid,
}

fn repos() -> Repos {
    let tmp = tempfile::tempdir().expect("a temp dir");
    let (root, work) = (tmp.path().join("root"), tmp.path().join("work"));
    std::fs::create_dir_all(&root).expect("creating the root");
    let bare = root.join("demo.git");
    git_in(
        tmp.path(),
        &["init", "-q", "--bare", "-b", "main", bare.to_str().unwrap()],
    );
    git_in(tmp.path(), &["init", "-q", "-b", "main", work.to_str().unwrap()]);
    for (file, text) in [("README.md", "# demo\n"), ("src/lib.rs", "pub fn f() {}\n")] {
        let path = work.join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
        git_in(&work, &["add", "-A"]);
        git_in(&work, &["commit", "-q", "-m", file]);
    }
    let tip = Oid::from_hex(git_in(&work, &["rev-parse", "HEAD"]).trim().as_bytes()).unwrap();
    Repos {
        _tmp: tmp,
        root,
        bare,
        work,
        tip,
    }
}

impl Repos {
    fn push(
        &self,
        transport: &mut dyn Transport,
        authenticate: &mut dyn FnMut(Action) -> gix::Result<Option<Outcome>>,
    ) -> Result<Pushed, PushError> {
        let repo = cohort::git::open(&self.work).unwrap();
        let updates = [Update {
            name: SERVICE.into(),
            expect: None,
            new: self.tip,
        }];
        push(&repo, transport, authenticate, &updates, &AtomicBool::new(false))
    }

    fn remote(&self, name: &str) -> String {
        git_in(&self.bare, &["rev-parse", name]).trim().to_string()
    }
}

/// An https transport that trusts the test CA: the reqwest backend takes no CA from
/// `http::Options::ssl_ca_info`, only from a client it lets us configure.
fn https_transport(url: &str, origin: &HttpsOrigin) -> Box<dyn Transport + Send> {
    let pem = std::fs::read(&origin.ca_pem).unwrap();
    let ca = reqwest::Certificate::from_pem(&pem).unwrap();
    let backend = http::reqwest::Options {
        configure_client: Some(Box::new(move |client: reqwest::blocking::ClientBuilder| {
            Ok(client.no_proxy().tls_certs_only([ca.clone()]))
        })),
        configure_request: None,
    };
    let mut transport = connect::connect(gix::url::parse(url).unwrap(), Default::default()).unwrap();
    transport
        .configure(&http::Options {
            backend: Some(Arc::new(Mutex::new(backend))),
            ..Default::default()
        })
        .unwrap();
    transport
}

/// Answers `get` with `password` for the test user, and records every action asked for.
fn credentials<'a>(
    password: &'a str,
    asked: &'a RefCell<Vec<&'static str>>,
) -> impl FnMut(Action) -> gix::Result<Option<Outcome>> + 'a {
    move |action| {
        asked.borrow_mut().push(match action {
            Action::Get(_) => "get",
            Action::Store(_) => "store",
            Action::Erase(_) => "erase",
        });
        Ok(match action {
            Action::Get(ctx) => Some(Outcome {
                identity: gix::sec::identity::Account {
                    username: HTTPS_USER.into(),
                    password: password.into(),
                    oauth_refresh_token: None,
                },
                next: NextAction::from(ctx),
            }),
            _ => None,
        })
    }
}

#[test]
fn https_push_with_basic_auth_through_authenticate() {
    let r = repos();
    let origin = HttpsOrigin::start(&r.root, PASSWORD);

    // A wrong password (in the URL too) is refused: an auth error that holds neither.
    let asked = RefCell::new(Vec::new());
    let url = origin
        .url("demo")
        .replace("https://", "https://cohort-test:url-s3cret@");
    let err = r
        .push(
            &mut *https_transport(&url, &origin),
            &mut credentials("wrong-s3cret", &asked),
        )
        .unwrap_err();
    assert!(matches!(err, PushError::Auth { .. }), "{err:?}");
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains("s3cret"), "{shown}");
    assert_eq!(
        *asked.borrow(),
        ["get", "erase"],
        "the helper is told to forget the bad password"
    );
    assert!(git_in(&r.bare, &["for-each-ref"]).is_empty());

    // The right one: asked for after the 401, stored after it worked.
    let asked = RefCell::new(Vec::new());
    let lines_before = origin.access_log().lines().count();
    let pushed = r
        .push(
            &mut *https_transport(&origin.url("demo"), &origin),
            &mut credentials(PASSWORD, &asked),
        )
        .unwrap();

    assert_eq!(pushed.refs, vec![(SERVICE.to_string(), RefOutcome::Updated)]);
    assert_eq!(*asked.borrow(), ["get", "store"]);
    assert_eq!(r.remote(SERVICE), r.tip.to_string());
    git_in(&r.bare, &["fsck", "--strict", "--no-progress"]);
    let log = origin.access_log();
    let posts: Vec<&str> = log
        .lines()
        .skip(lines_before)
        .filter(|l| l.contains("POST /git/demo.git/git-receive-pack"))
        .collect();
    assert_eq!(posts.len(), 1, "{log}");
    // Authenticated, and streamed: the pack's size is not known up front.
    assert!(
        posts[0].contains(" 200 ")
            && posts[0].contains(&format!("user=\"{HTTPS_USER}\""))
            && posts[0].contains("te=\"chunked\""),
        "{}",
        posts[0]
    );
}

#[test]
fn ssh_push_with_the_test_key_and_refused_with_another() {
    let r = repos();
    let origin = SshOrigin::start();
    let transport = |key| {
        let options = connect::Options {
            ssh: ssh::connect::Options {
                command: Some(origin.ssh_command_with(key).into()),
                kind: Some(ssh::ProgramKind::Ssh),
                disallow_shell: false,
            },
            ..Default::default()
        };
        connect::connect(gix::url::parse(origin.url(&r.bare).as_str()).unwrap(), options).unwrap()
    };
    let no_credentials = |_| -> gix::Result<Option<Outcome>> { Ok(None) };

    let err = r
        .push(&mut *transport(&origin.wrong_key), &mut no_credentials.clone())
        .unwrap_err();
    assert!(matches!(err, PushError::Auth { .. }), "{err:?}");
    assert!(git_in(&r.bare, &["for-each-ref"]).is_empty());

    let pushed = r
        .push(&mut *transport(&origin.user_key), &mut no_credentials.clone())
        .unwrap();

    assert_eq!(pushed.refs, vec![(SERVICE.to_string(), RefOutcome::Updated)]);
    assert_eq!(r.remote(SERVICE), r.tip.to_string());
    git_in(&r.bare, &["fsck", "--strict", "--no-progress"]);
}
