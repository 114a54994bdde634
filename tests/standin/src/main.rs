//! The `cohort-standin` binary: the stand-in as a process, for scripts and
//! for tests that prefer a child process to the in-process [`Standin`].
//!
//! Start-up contract: it binds 127.0.0.1 (an ephemeral port unless `--port`),
//! prints `127.0.0.1:PORT` as the first line of stdout and, with
//! `--port-file`, writes the same line to that file atomically (write + rename),
//! so a test can wait for either without racing the bind.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use cohort_standin::{bind, serve, Mode, Options, State};

const USAGE: &str = "\
usage: cohort-standin [options]
  --port N             port to bind (default 0: ephemeral)
  --host ADDR          IPv4 address to bind (default 127.0.0.1)
  --port-file FILE     also write `127.0.0.1:PORT` to FILE (atomically)
  --record FILE        append every request as one JSON line to FILE
  --mode MODE          normal|fail|slow|malformed|malformed-body|429|500|invalid-plan|large
                       (env STANDIN_MODE; default normal)
  --times N            apply --mode to the first N POSTs only (default: all)
  --delay-ms MS        delay for `slow` (default 3000)
  --retry-after SECS   Retry-After value for 429 (default 1)
  --models a,b,...     models to list; when given, other models get 404
  --watch-stdin        exit when stdin reaches EOF (the parent died)
  --max-seconds N      exit after N seconds whatever happens
Per-request override: a `STANDIN:<mode>[=<n>]` marker in the request text.
Edit command override: `STANDIN-CMD: <shell command>` lines in the prompt, or
`STANDIN-SCRIPT:` followed by a multi-line script up to `STANDIN-END`.";

struct Cli {
    opts: Options,
    port_file: Option<String>,
    watch_stdin: bool,
    max_seconds: Option<u64>,
}

fn parse_args() -> Result<Cli, String> {
    let mut cli = Cli {
        opts: Options::default(),
        port_file: None,
        watch_stdin: false,
        max_seconds: None,
    };
    if let Ok(m) = std::env::var("STANDIN_MODE") {
        if !m.is_empty() {
            cli.opts.mode = Mode::parse(&m).ok_or(format!("unknown STANDIN_MODE {m}"))?;
        }
    }
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or(format!("{a} needs a value"));
        let num = |v: String| v.parse::<u64>().map_err(|_| format!("not a number: {v}"));
        let o = &mut cli.opts;
        match a.as_str() {
            "--port" => o.port = num(val()?)? as u16,
            "--host" => o.host = Some(val()?.parse().map_err(|_| "--host: not an IPv4 address".to_string())?),
            "--port-file" => cli.port_file = Some(val()?),
            "--record" => o.record = Some(val()?.into()),
            "--mode" => {
                let v = val()?;
                o.mode = Mode::parse(&v).ok_or(format!("unknown mode {v}"))?
            }
            "--times" => o.times = Some(num(val()?)?),
            "--delay-ms" => o.delay = Duration::from_millis(num(val()?)?),
            "--retry-after" => o.retry_after = num(val()?)?,
            "--models" => o.models = Some(val()?.split(',').map(|s| s.trim().to_string()).collect()),
            "--watch-stdin" => cli.watch_stdin = true,
            "--max-seconds" => cli.max_seconds = Some(num(val()?)?),
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    Ok(cli)
}

fn fail(msg: String) -> ! {
    eprintln!("cohort-standin: {msg}");
    std::process::exit(2)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = parse_args().unwrap_or_else(|e| fail(e));
    let state = State::new(cli.opts.clone()).unwrap_or_else(|e| fail(format!("cannot open the record file: {e}")));
    let listener = bind(&cli.opts)
        .await
        .unwrap_or_else(|e| fail(format!("cannot bind: {e}")));
    let addr = listener.local_addr().unwrap();
    if let Some(pf) = &cli.port_file {
        // Rename makes the file appear complete or not at all.
        let tmp = format!("{pf}.tmp{}", std::process::id());
        std::fs::write(&tmp, format!("{addr}\n")).unwrap_or_else(|e| fail(format!("{tmp}: {e}")));
        std::fs::rename(&tmp, pf).unwrap_or_else(|e| fail(format!("{pf}: {e}")));
    }
    println!("{addr}");
    let _ = std::io::stdout().flush();

    if cli.watch_stdin {
        tokio::spawn(async {
            use tokio::io::AsyncReadExt;
            let mut buf = [0u8; 256];
            let mut stdin = tokio::io::stdin();
            while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {}
            std::process::exit(0);
        });
    }
    if let Some(secs) = cli.max_seconds {
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(secs)).await;
            std::process::exit(0);
        });
    }
    serve(listener, Arc::new(state)).await;
}
