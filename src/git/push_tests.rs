//! Pushes into real bare repositories over `file://` (gix spawns
//! `git-receive-pack`), set up and read back with the git CLI.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;

use super::*;

fn git_out(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_AUTHOR_NAME", "Test")
        .env("GIT_AUTHOR_EMAIL", "test@example.com")
        .env("GIT_COMMITTER_NAME", "Test")
        .env("GIT_COMMITTER_EMAIL", "test@example.com")
        .output()
        .expect("git runs")
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = git_out(dir, args);
    assert!(
        out.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn oid(hex: &str) -> Oid {
    Oid::from_hex(hex.trim().as_bytes()).unwrap()
}

/// A bare origin and a local repository with one commit (not pushed).
struct Repos {
    _tmp: tempfile::TempDir,
    bare: PathBuf,
    work: PathBuf,
    first: Oid,
}

impl Repos {
    fn new() -> Repos {
        let tmp = tempfile::tempdir().unwrap();
        let bare = tmp.path().join("origin.git");
        let work = tmp.path().join("work");
        git(
            tmp.path(),
            &["init", "-q", "--bare", "-b", "main", bare.to_str().unwrap()],
        );
        git(tmp.path(), &["init", "-q", "-b", "main", work.to_str().unwrap()]);
        let mut repos = Repos {
            _tmp: tmp,
            bare,
            work,
            first: Oid::null(gix::hash::Kind::Sha1),
        };
        repos.first = repos.commit("README", "hello\n", "first");
        repos
    }

    /// Writes a file in the local repository and commits it; returns the commit.
    fn commit(&self, path: &str, content: &str, message: &str) -> Oid {
        let file = self.work.join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, content).unwrap();
        git(&self.work, &["add", "-A"]);
        git(&self.work, &["commit", "-q", "-m", message]);
        self.head()
    }

    fn head(&self) -> Oid {
        oid(&git(&self.work, &["rev-parse", "HEAD"]))
    }

    /// The bare repository's value of `name`, read with the git CLI.
    fn remote(&self, name: &str) -> Option<Oid> {
        let out = git_out(&self.bare, &["rev-parse", "--verify", "--quiet", name]);
        out.status.success().then(|| oid(&String::from_utf8_lossy(&out.stdout)))
    }

    /// What git itself would send: the objects of `new` that `old` lacks.
    fn objects_between(&self, new: Oid, old: Option<Oid>) -> usize {
        let (new, old) = (new.to_string(), old.map(|o| format!("^{o}")));
        let mut args = vec!["rev-list", "--objects", new.as_str()];
        args.extend(old.as_deref());
        git(&self.work, &args).lines().count()
    }

    fn push(&self, updates: &[Update]) -> Result<Pushed, PushError> {
        self.push_with(updates, &AtomicBool::new(false))
    }

    fn push_with(&self, updates: &[Update], interrupt: &AtomicBool) -> Result<Pushed, PushError> {
        self.push_through(updates, interrupt, |t| t)
    }

    /// Pushes over `file://`, through `wrap` around the transport.
    fn push_through<'a>(
        &self,
        updates: &[Update],
        interrupt: &AtomicBool,
        wrap: impl FnOnce(Box<dyn Transport + Send>) -> Box<dyn Transport + 'a>,
    ) -> Result<Pushed, PushError> {
        let repo = crate::git::open(&self.work).unwrap();
        let url = gix::url::parse(format!("file://{}", self.bare.display()).as_str()).unwrap();
        let transport =
            gix::protocol::transport::client::blocking_io::connect::connect(url, Default::default()).unwrap();
        let mut transport = wrap(transport);
        let mut no_credentials = |_| -> gix::Result<Option<gix::credentials::protocol::Outcome>> {
            panic!("file:// asks for no credentials")
        };
        push(&repo, &mut *transport, &mut no_credentials, updates, interrupt)
    }

    fn fsck(&self) {
        git(&self.bare, &["fsck", "--strict", "--no-progress", "--no-dangling"]);
    }
}

fn update(name: &str, expect: Option<Oid>, new: Oid) -> Update {
    Update {
        name: name.into(),
        expect,
        new,
    }
}

fn outcome(pushed: &Pushed, name: &str) -> RefOutcome {
    pushed.refs.iter().find(|(n, _)| n == name).unwrap().1.clone()
}

/// A file of many lines, `n` of them changed: packed, versions are deltas of each other.
fn big_file(n: usize) -> String {
    (0..2000)
        .map(|i| {
            if i < n {
                format!("changed line {i}\n")
            } else {
                format!("line {i} of a file long enough to delta\n")
            }
        })
        .collect()
}

const SERVICE: &str = "refs/heads/cohort/service";

#[test]
fn first_push_of_a_new_branch_into_an_empty_repository() {
    let r = Repos::new();
    r.commit("src/lib.rs", &big_file(0), "big file");
    r.commit("src/lib.rs", &big_file(1), "one line");
    let tip = r.commit("src/deep/er/x.txt", "x\n", "nested");
    // Packed locally with deltas between the versions: those are copied as they are.
    git(&r.work, &["repack", "-adq"]);

    let pushed = r.push(&[update(SERVICE, None, tip)]).unwrap();

    assert_eq!(pushed.refs, vec![(SERVICE.to_string(), RefOutcome::Updated)]);
    assert_eq!(r.remote(SERVICE), Some(tip));
    assert_eq!(pushed.objects, r.objects_between(tip, None));
    assert!(pushed.pack_bytes > 32, "a pack with objects: {pushed:?}");
    r.fsck();
    assert_eq!(
        git(&r.bare, &["rev-list", "--count", SERVICE]),
        "4",
        "the whole history arrived"
    );
}

#[test]
fn a_further_push_sends_only_the_new_objects() {
    let r = Repos::new();
    let base = r.commit("src/lib.rs", &big_file(0), "big file");
    r.push(&[update(SERVICE, None, base)]).unwrap();
    let tip = r.commit("src/lib.rs", &big_file(3), "three lines");
    git(&r.work, &["repack", "-adq"]);

    let pushed = r.push(&[update(SERVICE, Some(base), tip)]).unwrap();

    assert_eq!(outcome(&pushed, SERVICE), RefOutcome::Updated);
    // The commit, the root tree, src/ and the new blob: nothing the remote has.
    assert_eq!(pushed.objects, 4);
    assert_eq!(pushed.objects, r.objects_between(tip, Some(base)));
    assert_eq!(r.remote(SERVICE), Some(tip));
    r.fsck();
}

#[test]
fn a_stale_expectation_is_rejected_then_a_retry_after_merging_works() {
    let r = Repos::new();
    let main = "refs/heads/main";
    r.push(&[update(main, None, r.first)]).unwrap();
    // Someone else pushes first, with the git CLI.
    let other = r.work.parent().unwrap().join("other");
    git(
        r.work.parent().unwrap(),
        &["clone", "-q", r.bare.to_str().unwrap(), other.to_str().unwrap()],
    );
    std::fs::write(other.join("theirs.txt"), "theirs\n").unwrap();
    git(&other, &["add", "-A"]);
    git(&other, &["commit", "-q", "-m", "theirs"]);
    git(&other, &["push", "-q", "origin", "main"]);
    let theirs = oid(&git(&other, &["rev-parse", "HEAD"]));
    let ours = r.commit("ours.txt", "ours\n", "ours");

    let pushed = r.push(&[update(main, Some(r.first), ours)]).unwrap();

    let RefOutcome::Rejected { reason } = outcome(&pushed, main) else {
        panic!("a stale expectation must be rejected: {pushed:?}")
    };
    assert!(reason.starts_with("stale info: the remote has"), "{reason}");
    assert!(
        reason.contains(&short(theirs)) && reason.contains(&short(r.first)),
        "{reason}"
    );
    assert_eq!((pushed.objects, pushed.pack_bytes), (0, 0), "nothing was sent");
    assert_eq!(r.remote(main), Some(theirs), "the other push stands");

    // Fetch, merge with the git CLI, re-read the remote's value, push again.
    git(&r.work, &["fetch", "-q", r.bare.to_str().unwrap(), "main"]);
    git(&r.work, &["merge", "-q", "--no-edit", "FETCH_HEAD"]);
    let merge = r.head();
    let now = oid(git(&r.work, &["ls-remote", r.bare.to_str().unwrap(), main])
        .split_whitespace()
        .next()
        .unwrap());
    assert_eq!(now, theirs);

    let pushed = r.push(&[update(main, Some(now), merge)]).unwrap();

    assert_eq!(outcome(&pushed, main), RefOutcome::Updated);
    assert_eq!(r.remote(main), Some(merge));
    // The merge and its tree, our commit, its tree and our file: not their file again.
    assert_eq!(pushed.objects, r.objects_between(merge, Some(theirs)));
    assert_eq!(pushed.objects, 5);
    r.fsck();
}

#[test]
fn receive_pack_refusing_a_non_fast_forward_is_a_rejection_with_its_reason() {
    let r = Repos::new();
    let main = "refs/heads/main";
    r.push(&[update(main, None, r.first)]).unwrap();
    git(&r.bare, &["config", "receive.denyNonFastForwards", "true"]);
    // A sibling of the pushed commit, not a descendant.
    git(&r.work, &["commit", "-q", "--amend", "-m", "rewritten"]);
    let rewritten = r.head();
    assert_ne!(rewritten, r.first);

    let pushed = r.push(&[update(main, Some(r.first), rewritten)]).unwrap();

    let RefOutcome::Rejected { reason } = outcome(&pushed, main) else {
        panic!("receive-pack must refuse: {pushed:?}")
    };
    assert!(reason.contains("non-fast-forward"), "{reason}");
    assert!(
        reason.contains("denying non-fast-forward"),
        "the remote's own message: {reason}"
    );
    assert_eq!(r.remote(main), Some(r.first));
    r.fsck();
}

/// A transport that runs `before_request` between the advertisement and the commands.
struct Meddling<'a> {
    inner: Box<dyn Transport + Send>,
    before_request: Option<Box<dyn FnOnce() + 'a>>,
}

impl gix::protocol::transport::client::TransportWithoutIO for Meddling<'_> {
    fn to_url(&self) -> std::borrow::Cow<'_, gix::bstr::BStr> {
        self.inner.to_url()
    }
    fn connection_persists_across_multiple_requests(&self) -> bool {
        self.inner.connection_persists_across_multiple_requests()
    }
    fn configure(&mut self, config: &dyn std::any::Any) -> gix::Result {
        self.inner.configure(config)
    }
}

impl Transport for Meddling<'_> {
    fn handshake<'b>(
        &mut self,
        service: Service,
        extra_parameters: &'b [(&'b str, Option<&'b str>)],
    ) -> Result<
        gix::protocol::transport::client::blocking_io::SetServiceResponse<'_>,
        gix::protocol::transport::client::Error,
    > {
        self.inner.handshake(service, extra_parameters)
    }
    fn request(
        &mut self,
        write_mode: WriteMode,
        on_into_read: MessageKind,
        trace: bool,
    ) -> Result<gix::protocol::transport::client::blocking_io::RequestWriter<'_>, gix::protocol::transport::client::Error>
    {
        if let Some(meddle) = self.before_request.take() {
            meddle();
        }
        self.inner.request(write_mode, on_into_read, trace)
    }
}

#[test]
fn a_ref_moved_after_the_advertisement_is_refused_by_receive_pack() {
    let r = Repos::new();
    let main = "refs/heads/main";
    r.push(&[update(main, None, r.first)]).unwrap();
    let ours = r.commit("ours.txt", "ours\n", "ours");
    // Another push lands after receive-pack advertised `first` to us.
    let other = r.work.parent().unwrap().join("other");
    let theirs = std::cell::Cell::new(None);
    let meddle = || {
        git(
            r.work.parent().unwrap(),
            &["clone", "-q", r.bare.to_str().unwrap(), other.to_str().unwrap()],
        );
        std::fs::write(other.join("theirs.txt"), "theirs\n").unwrap();
        git(&other, &["add", "-A"]);
        git(&other, &["commit", "-q", "-m", "theirs"]);
        git(&other, &["push", "-q", "origin", "main"]);
        theirs.set(Some(oid(&git(&other, &["rev-parse", "HEAD"]))));
    };

    let pushed = r
        .push_through(&[update(main, Some(r.first), ours)], &AtomicBool::new(false), |inner| {
            Box::new(Meddling {
                inner,
                before_request: Some(Box::new(meddle)),
            })
        })
        .unwrap();

    let RefOutcome::Rejected { reason } = outcome(&pushed, main) else {
        panic!("receive-pack must refuse a ref that moved: {pushed:?}")
    };
    assert!(theirs.get().is_some());
    assert_eq!(r.remote(main), theirs.get(), "the other push stands: {reason}");
}

#[test]
fn a_hook_refusal_carries_the_hooks_words() {
    let r = Repos::new();
    let hook = r.bare.join("hooks/pre-receive");
    std::fs::write(
        &hook,
        "#!/bin/sh\necho 'policy: nothing lands on main today' >&2\nexit 1\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();

    let pushed = r.push(&[update("refs/heads/main", None, r.first)]).unwrap();

    let RefOutcome::Rejected { reason } = outcome(&pushed, "refs/heads/main") else {
        panic!("the hook must refuse: {pushed:?}")
    };
    assert!(reason.contains("pre-receive hook declined"), "{reason}");
    assert!(reason.contains("policy: nothing lands on main today"), "{reason}");
    assert_eq!(r.remote("refs/heads/main"), None);
}

#[test]
fn two_refs_at_once_all_or_nothing() {
    let r = Repos::new();
    let main = "refs/heads/main";
    let tip = r.commit("a.txt", "a\n", "a");

    let pushed = r
        .push(&[update(main, None, r.first), update(SERVICE, None, tip)])
        .unwrap();

    assert_eq!(
        pushed.refs,
        vec![
            (main.to_string(), RefOutcome::Updated),
            (SERVICE.to_string(), RefOutcome::Updated)
        ]
    );
    assert_eq!((r.remote(main), r.remote(SERVICE)), (Some(r.first), Some(tip)));
    assert_eq!(pushed.objects, r.objects_between(tip, None));
    r.fsck();

    // Unchanged refs are up to date and cost nothing.
    let pushed = r
        .push(&[update(main, Some(r.first), r.first), update(SERVICE, Some(tip), tip)])
        .unwrap();
    assert!(
        pushed.refs.iter().all(|(_, o)| *o == RefOutcome::UpToDate),
        "{pushed:?}"
    );
    assert_eq!((pushed.objects, pushed.pack_bytes), (0, 0));

    // One refused by receive-pack takes the other with it (atomic).
    git(&r.bare, &["config", "receive.denyNonFastForwards", "true"]);
    let next = r.commit("b.txt", "b\n", "b");
    git(&r.work, &["checkout", "-q", "--detach", &r.first.to_string()]);
    let sibling = r.commit("c.txt", "c\n", "sibling of a");
    let pushed = r
        .push(&[update(main, Some(r.first), next), update(SERVICE, Some(tip), sibling)])
        .unwrap();
    assert!(
        matches!(outcome(&pushed, SERVICE), RefOutcome::Rejected { ref reason } if reason.contains("non-fast-forward")),
        "{pushed:?}"
    );
    assert!(
        matches!(outcome(&pushed, main), RefOutcome::Rejected { ref reason } if reason.contains("atomic")),
        "{pushed:?}"
    );
    assert_eq!((r.remote(main), r.remote(SERVICE)), (Some(r.first), Some(tip)));
}

#[test]
fn an_annotated_tag_is_pushed_with_what_it_points_to() {
    let r = Repos::new();
    let main = "refs/heads/main";
    r.push(&[update(main, None, r.first)]).unwrap();
    let tagged = r.commit("a.txt", "a\n", "tagged");
    git(&r.work, &["tag", "-a", "v1", "-m", "release 1"]);
    let tag = oid(&git(&r.work, &["rev-parse", "v1"]));

    let pushed = r.push(&[update("refs/tags/v1", None, tag)]).unwrap();

    assert_eq!(outcome(&pushed, "refs/tags/v1"), RefOutcome::Updated);
    assert_eq!(git(&r.bare, &["cat-file", "-t", "refs/tags/v1"]), "tag");
    assert_eq!(oid(&git(&r.bare, &["rev-parse", "v1^{commit}"])), tagged);
    assert_eq!(pushed.objects, r.objects_between(tag, Some(r.first)));
    r.fsck();

    // The remote has the commit through the tag it advertises: nothing to send.
    let pushed = r.push(&[update(main, Some(r.first), tagged)]).unwrap();
    assert_eq!(outcome(&pushed, main), RefOutcome::Updated);
    assert_eq!(pushed.objects, 0);
    assert_eq!(r.remote(main), Some(tagged));
    r.fsck();
}

#[test]
fn a_ref_is_deleted_with_the_null_id() {
    let r = Repos::new();
    r.push(&[update(SERVICE, None, r.first)]).unwrap();
    let null = Oid::null(gix::hash::Kind::Sha1);

    let pushed = r.push(&[update(SERVICE, Some(r.first), null)]).unwrap();

    assert_eq!(outcome(&pushed, SERVICE), RefOutcome::Updated);
    assert_eq!((pushed.objects, pushed.pack_bytes), (0, 0), "deletions send no pack");
    assert_eq!(r.remote(SERVICE), None);
}

#[test]
fn an_interrupted_push_moves_nothing() {
    let r = Repos::new();
    let err = r
        .push_with(&[update(SERVICE, None, r.first)], &AtomicBool::new(true))
        .unwrap_err();
    assert!(matches!(err, PushError::Interrupted), "{err}");
    assert_eq!(r.remote(SERVICE), None);

    // Interrupted once the commands are on their way: the pack stops short.
    let interrupt = AtomicBool::new(false);
    let err = r
        .push_through(&[update(SERVICE, None, r.first)], &interrupt, |inner| {
            Box::new(Meddling {
                inner,
                before_request: Some(Box::new(|| interrupt.store(true, std::sync::atomic::Ordering::Relaxed))),
            })
        })
        .unwrap_err();
    assert!(matches!(err, PushError::Interrupted), "{err}");
    assert_eq!(r.remote(SERVICE), None);
    r.fsck();
}

#[test]
fn invalid_updates_fail_before_connecting() {
    let r = Repos::new();
    for (updates, why) in [
        (vec![update("main", None, r.first)], "not a valid full ref name"),
        (
            vec![update(SERVICE, None, r.first), update(SERVICE, None, r.first)],
            "listed twice",
        ),
    ] {
        let err = r.push(&updates).unwrap_err();
        assert!(err.to_string().contains(why), "{err}");
    }
    let missing = oid("1234567890123456789012345678901234567890");
    let err = r.push(&[update(SERVICE, None, missing)]).unwrap_err();
    assert!(err.to_string().contains("not in the local repository"), "{err}");
    assert_eq!(r.remote(SERVICE), None);
}

#[test]
fn urls_lose_their_credentials() {
    assert_eq!(
        redact("cannot reach https://user:s3cret@example.com/repo.git: refused"),
        "cannot reach https://example.com/repo.git: refused"
    );
    assert_eq!(
        redact("ssh://git@host:22/x and http://a:b@c/"),
        "ssh://host:22/x and http://c/"
    );
    assert_eq!(redact("no url here: a@b"), "no url here: a@b");
}

#[test]
fn report_status_is_parsed_from_side_band_data() {
    let pkt = |s: &str| format!("{:04x}{s}", s.len() + 4);
    let payload = [
        pkt("unpack ok\n"),
        pkt("ok refs/heads/main\n"),
        pkt("ng refs/heads/x pre-receive hook declined\n"),
        "0000".into(),
    ]
    .concat();
    let lines = pkt_lines(payload.as_bytes()).unwrap();
    let report = parse_report(&lines).unwrap();
    assert_eq!(report.unpack_error, None);
    assert_eq!(report.refs.get("refs/heads/main"), Some(&Ok(())));
    assert_eq!(
        report.refs.get("refs/heads/x"),
        Some(&Err("pre-receive hook declined".to_string()))
    );
    let failed = parse_report(&["unpack index-pack abnormal exit".to_string()]).unwrap();
    assert_eq!(failed.unpack_error.as_deref(), Some("index-pack abnormal exit"));
    assert!(parse_report(&["ok refs/heads/main".to_string()]).is_err());
    assert!(pkt_lines(b"000eunpack").is_err());
}

#[test]
fn a_hostile_remotes_words_reach_no_terminal_as_escapes() {
    let r = Repos::new();
    let hook = r.bare.join("hooks/pre-receive");
    // A title-setting escape and a screen clear, as a hostile origin's hook could print.
    std::fs::write(
        &hook,
        "#!/bin/sh\nprintf '\\033]0;owned\\007\\033[2Jpolicy: no\\n' >&2\nexit 1\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();

    let pushed = r.push(&[update("refs/heads/main", None, r.first)]).unwrap();

    let RefOutcome::Rejected { reason } = outcome(&pushed, "refs/heads/main") else {
        panic!("the hook must refuse: {pushed:?}")
    };
    assert!(reason.contains("policy: no"), "{reason}");
    assert!(!reason.chars().any(char::is_control), "{reason:?}");
}
