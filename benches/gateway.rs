//! The model gateway against direct calls to the stand-in, in one process run.
//! Not a timed test: it prints figures for the README.
//!
//!   cargo bench --bench gateway -- [--requests 500] [--mib 16] [--runs 21]
//!
//! (a) Added latency: `--requests` small non-streamed chat completions, sent
//!     one at a time, alternating direct and through the gateway; the median
//!     (and p90) of each, and their difference. Target: median added <= 1 ms.
//! (b) Streamed throughput: a Responses SSE answer of `--mib` MiB (the
//!     stand-in's `large` mode: 1 KiB text deltas), read whole, `--runs` times
//!     each way, alternating; the median MiB/s of each, and the median of the
//!     per-pair ratios (each pair ran back to back, so load from elsewhere on
//!     the machine shifts both alike). Target: >= 0.9x direct.
//!
//! The stand-in, the gateway and the client share the machine (and its
//! cores), as they do in a run.

use std::time::{Duration, Instant};

use cohort::gateway::{Gateway, GatewayConfig, TaskKey};
use cohort::secret::Secret;
use cohort_standin::{Options, Standin};
use futures_util::StreamExt;
use serde_json::json;

struct Args {
    requests: usize,
    mib: u64,
    runs: usize,
}

fn args() -> Args {
    let mut a = Args {
        requests: 500,
        mib: 16,
        runs: 21,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut num = || it.next().and_then(|v| v.parse::<u64>().ok());
        match flag.as_str() {
            "--requests" => a.requests = num().expect("--requests N") as usize,
            "--mib" => a.mib = num().expect("--mib N"),
            "--runs" => a.runs = num().expect("--runs N") as usize,
            "--bench" => {} // cargo bench passes it
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn p90(v: &mut [Duration]) -> Duration {
    v.sort();
    v[(v.len() * 9) / 10]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One small chat completion, read whole.
async fn small(client: &reqwest::Client, base: &str, auth: &str) -> Duration {
    let body = json!({"model": "gpt-5-nano", "messages": [{"role": "user", "content": "- one"}]});
    let t = Instant::now();
    let resp = client
        .post(format!("{base}/chat/completions"))
        .bearer_auth(auth)
        .json(&body)
        .send()
        .await
        .expect("a chat completion");
    assert!(resp.status().is_success(), "{}", resp.status());
    resp.bytes().await.expect("the body");
    t.elapsed()
}

/// One large streamed answer, read chunk by chunk as an agent would; returns (time, bytes).
async fn large(client: &reqwest::Client, base: &str, auth: &str, mib: u64) -> (Duration, u64) {
    let body = json!({"model": "gpt-5-codex", "stream": true, "input": [{"type": "message", "role": "user",
        "content": [{"type": "input_text", "text": format!("bench STANDIN:large={}", mib * 1024)}]}]});
    let t = Instant::now();
    let resp = client
        .post(format!("{base}/responses"))
        .bearer_auth(auth)
        .json(&body)
        .send()
        .await
        .expect("a streamed answer");
    assert!(resp.status().is_success(), "{}", resp.status());
    let mut n = 0u64;
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        n += chunk.expect("a chunk").len() as u64;
    }
    (t.elapsed(), n)
}

/// CPU seconds used so far by this process's threads, by role: the gateway's
/// thread, the stand-in's thread, the rest (the client).
fn cpu() -> [f64; 3] {
    let tick = 100.0; // USER_HZ on Linux
    let mut out = [0.0; 3];
    for task in std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = &stat[open + 1..close];
        let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
        let ticks: f64 = fields[11].parse::<f64>().unwrap_or(0.0) + fields[12].parse::<f64>().unwrap_or(0.0);
        let role = match name {
            "cohort-gateway" => 0,
            "cohort-standin" => 1,
            _ => 2,
        };
        out[role] += ticks / tick;
    }
    out
}

fn main() {
    let a = args();
    let standin = Standin::start(Options::default()).expect("the stand-in");
    let direct = standin.base_url();
    let key = "sk-bench-key";
    // The gateway serves from a thread of its own ("cohort-gateway").
    let gw = Gateway::start(GatewayConfig::new(direct.clone(), Secret::new(key))).expect("the gateway");
    let token = gw.issue(TaskKey {
        run_id: "bench".into(),
        index: 1,
        attempt: 1,
    });
    let via = gw.base_url().expect("a loopback address");
    // The client on a runtime and thread of its own, as an agent is a process of its own.
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    client_rt.block_on(async {
        let client = reqwest::Client::builder().no_proxy().build().expect("a client");
        // (a) latency; warm both paths' connections first.
        for _ in 0..20 {
            small(&client, &direct, key).await;
            small(&client, &via, token.expose()).await;
        }
        let (mut d, mut g) = (Vec::new(), Vec::new());
        for _ in 0..a.requests {
            d.push(small(&client, &direct, key).await);
            g.push(small(&client, &via, token.expose()).await);
        }
        let (dm, gm) = (median(&mut d), median(&mut g));
        println!(
            "latency, {} small chat completions each way: direct median {:.3} ms (p90 {:.3}), \
             gateway median {:.3} ms (p90 {:.3}); added median {:.3} ms (target <= 1 ms)",
            a.requests,
            ms(dm),
            ms(p90(&mut d)),
            ms(gm),
            ms(p90(&mut g)),
            ms(gm.saturating_sub(dm))
        );

        // (b) throughput.
        large(&client, &direct, key, 1).await;
        large(&client, &via, token.expose(), 1).await;
        let (mut dr, mut gr) = (Vec::new(), Vec::new());
        let (mut dcpu, mut gcpu) = ([0.0; 3], [0.0; 3]);
        let add = |sum: &mut [f64; 3], before: [f64; 3], after: [f64; 3]| {
            for i in 0..3 {
                sum[i] += after[i] - before[i];
            }
        };
        let mut bytes = 0;
        for _ in 0..a.runs {
            let c0 = cpu();
            let (t, n) = large(&client, &direct, key, a.mib).await;
            let c1 = cpu();
            let (t2, n2) = large(&client, &via, token.expose(), a.mib).await;
            let c2 = cpu();
            add(&mut dcpu, c0, c1);
            add(&mut gcpu, c1, c2);
            assert_eq!(n, n2, "the gateway changed the stream's length");
            dr.push(t);
            gr.push(t2);
            bytes = n;
        }
        let mib = bytes as f64 / (1 << 20) as f64;
        let rate = |d: Duration| mib / d.as_secs_f64();
        let mut ratios: Vec<f64> = dr
            .iter()
            .zip(&gr)
            .map(|(d, g)| d.as_secs_f64() / g.as_secs_f64())
            .collect();
        ratios.sort_by(f64::total_cmp);
        let (dt, gt) = (median(&mut dr), median(&mut gr));
        println!(
            "streamed SSE, {mib:.1} MiB answer (1 KiB events) x {} each way: direct {:.0} MiB/s, \
             gateway {:.0} MiB/s (medians); ratio {:.2}x (median of pairs; target >= 0.9x)",
            a.runs,
            rate(dt),
            rate(gt),
            ratios[ratios.len() / 2]
        );
        // Where the CPU went: on a machine with fewer free cores than busy
        // threads, throughput is CPU-bound and the gateway's share shows.
        let per = |c: f64| c * 1e3 / (mib * a.runs as f64);
        println!(
            "CPU ms per MiB streamed: direct = stand-in {:.2} + client {:.2}; \
             through the gateway = stand-in {:.2} + gateway {:.2} + client {:.2}",
            per(dcpu[1]),
            per(dcpu[2]),
            per(gcpu[1]),
            per(gcpu[0]),
            per(gcpu[2])
        );
    });
    let used = gw.run_usage();
    println!(
        "(the gateway counted {} requests, {} input and {} output tokens)",
        used.requests, used.input, used.output
    );
    client_rt.block_on(gw.shutdown());
}
