//! `cohort __guard PROGRAM ARGS…`: the parent of every host agent process.
//!
//! The agent and everything it starts share the guard's process group. The
//! guard asks the kernel for SIGTERM when cohort dies (even by `kill -9`,
//! through `PR_SET_PDEATHSIG`, set before exec by the host runtime) and then
//! kills the whole group, so no agent outlives cohort. `PR_SET_PDEATHSIG`
//! alone would only cover the direct child, not what the agent starts.

use std::ffi::OsString;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::Command;

use nix::sys::signal::{killpg, SigSet, Signal};
use nix::unistd::getpgrp;

pub fn main(args: Vec<OsString>) -> ! {
    let Some((program, rest)) = args.split_first() else {
        eprintln!("cohort __guard: missing program");
        std::process::exit(2);
    };
    let mut signals = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGHUP, Signal::SIGINT] {
        signals.add(s);
    }
    // Blocked here and waited for by a thread; the child gets them back.
    if signals.thread_block().is_err() {
        std::process::exit(125);
    }
    let mut cmd = Command::new(program);
    cmd.args(rest);
    unsafe {
        cmd.pre_exec(move || {
            signals.thread_unblock().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cohort: cannot start agent {:?}: {e}", program);
            std::process::exit(127);
        }
    };
    std::thread::spawn(move || {
        let _ = signals.wait();
        let _ = killpg(getpgrp(), Signal::SIGKILL);
    });
    let status = child.wait().unwrap_or_else(|_| std::process::exit(125));
    let code = status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    std::process::exit(code);
}
