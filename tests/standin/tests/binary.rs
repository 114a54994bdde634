//! The `cohort-standin` binary's start-up contract: first stdout line and
//! port file carry the address, `--record` writes JSONL, `--watch-stdin` exits
//! when the parent goes away.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

#[test]
fn reports_its_port_records_requests_and_exits_with_stdin() {
    let dir = tempdir();
    let port_file = dir.join("port");
    let record = dir.join("record.jsonl");
    let mut child = Command::new(env!("CARGO_BIN_EXE_cohort-standin"))
        .args([
            "--watch-stdin",
            "--max-seconds",
            "60",
            "--mode",
            "429",
            "--times",
            "1",
            "--port-file",
        ])
        .arg(&port_file)
        .arg("--record")
        .arg(&record)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let addr = first.trim().to_string();
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    assert_eq!(std::fs::read_to_string(&port_file).unwrap().trim(), addr);

    let body = r#"{"model":"m","messages":[{"role":"user","content":"- one"}]}"#;
    let mut statuses = Vec::new();
    for _ in 0..2 {
        let mut c = TcpStream::connect(&addr).unwrap();
        write!(
            c,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-bin\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        statuses.push(out[9..12].to_string());
    }
    assert_eq!(statuses, ["429", "200"]);
    let lines: Vec<Value> = std::fs::read_to_string(&record)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["mode"], "429");
    assert_eq!(lines[1]["headers"]["authorization"], "Bearer sk-bin");

    drop(child.stdin.take()); // EOF: the stand-in must exit by itself
    let t = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success());
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "did not exit on stdin EOF");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempdir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("standin-bin-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}
