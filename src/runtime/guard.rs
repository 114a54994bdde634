//! The guard: the parent of every host agent process.
//!
//! The agent and everything it starts share the guard's process group. The
//! guard gets SIGTERM when cohort dies (even by `kill -9`, through
//! `PR_SET_PDEATHSIG`, set before the fork by the host runtime) and then
//! kills the whole group, so no agent outlives cohort. `PR_SET_PDEATHSIG`
//! alone would only cover the direct child, not what the agent starts.
//!
//! The guard is not a program of its own: the child that cohort forks to
//! start the agent forks once more, and keeps the first of the two as the
//! guard, which never execs. An exec of cohort's own binary as the guard
//! cost about 4 ms per task, a tenth of a short task's whole orchestration.
//! Between fork and exec only async-signal-safe calls are allowed (cohort
//! is multi-threaded), so the guard below is raw system calls, with no
//! allocation.

use std::io;

/// Runs between fork and exec in the child that will start the agent, once
/// it leads its own process group and its death signal is set. Returns in
/// the agent's process, which goes on to exec the agent; in the guard's it
/// never returns.
///
/// # Safety
/// Only to be called from a `pre_exec` hook (a forked child of a possibly
/// multi-threaded process, before exec).
pub unsafe fn split_off_guard() -> io::Result<()> {
    let mut watched: libc::sigset_t = std::mem::zeroed();
    let mut before: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut watched);
    for s in [libc::SIGTERM, libc::SIGHUP, libc::SIGINT, libc::SIGCHLD] {
        libc::sigaddset(&mut watched, s);
    }
    // Blocked before the fork, so none is lost in between; the guard takes
    // them with sigwaitinfo, the agent gets its mask back.
    if libc::sigprocmask(libc::SIG_BLOCK, &watched, &mut before) != 0 {
        return Err(io::Error::last_os_error());
    }
    match libc::fork() {
        -1 => Err(io::Error::last_os_error()),
        0 => {
            libc::sigprocmask(libc::SIG_SETMASK, &before, std::ptr::null_mut());
            Ok(())
        }
        agent => watch(agent, &watched),
    }
}

/// The guard's whole life: exit with the agent's status when it ends, or
/// kill the group (itself included) on a signal.
unsafe fn watch(agent: libc::pid_t, watched: &libc::sigset_t) -> ! {
    // Descriptors beyond stdio go, among them the write end of the pipe on
    // which the spawning parent learns whether the exec worked: it is
    // close-on-exec, and the guard never execs, so if the guard kept it the
    // parent would wait for the guard's exit instead of the agent's exec.
    if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) != 0 {
        for fd in 3..1024 {
            libc::close(fd);
        }
    }
    loop {
        match libc::sigwaitinfo(watched, std::ptr::null_mut()) {
            libc::SIGCHLD => {
                let mut status = 0;
                if libc::waitpid(agent, &mut status, libc::WNOHANG) == agent {
                    let code = if libc::WIFEXITED(status) {
                        libc::WEXITSTATUS(status)
                    } else {
                        128 + libc::WTERMSIG(status)
                    };
                    libc::_exit(code);
                }
            }
            -1 => {} // EINTR
            _ => {
                libc::killpg(0, libc::SIGKILL);
                libc::_exit(128 + libc::SIGKILL);
            }
        }
    }
}
