//! The guard: the parent of every host agent process.
//!
//! The agent and everything it starts share the guard's process group. The
//! guard gets SIGTERM when cohort dies (even by `kill -9`, through
//! `PR_SET_PDEATHSIG`, set in the spawning child before its fork) and then
//! kills the whole group, so no agent outlives cohort. `PR_SET_PDEATHSIG`
//! alone would only cover the direct child, not what the agent starts. The
//! guard is also the child subreaper of everything below it, so processes
//! that left the group (`setsid`) are killed too, when the agent ends as
//! well as when cohort dies.
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
/// it leads its own process group. Sets the death signal, then forks: the
/// agent's process returns and goes on to exec the agent; the guard's never
/// returns.
///
/// The watched signals are blocked before anything else. The child inherits
/// cohort's signal handlers (tokio's, for SIGTERM and SIGINT) until it
/// execs, so a death signal arriving between the prctl and the fork would
/// otherwise be taken by such a handler and never reach the guard, which
/// would then wait forever beside an orphaned agent. Blocked, it stays
/// pending, and the guard takes it with sigwaitinfo.
///
/// # Safety
/// Only to be called from a `pre_exec` hook (a forked child of a possibly
/// multi-threaded process, before exec).
pub unsafe fn split_off_guard(parent: libc::pid_t) -> io::Result<()> {
    let mut watched: libc::sigset_t = std::mem::zeroed();
    let mut before: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut watched);
    for s in [libc::SIGTERM, libc::SIGHUP, libc::SIGINT, libc::SIGCHLD] {
        libc::sigaddset(&mut watched, s);
    }
    if libc::sigprocmask(libc::SIG_BLOCK, &watched, &mut before) != 0 {
        return Err(io::Error::last_os_error());
    }
    // SIGTERM to the guard when cohort dies; it then kills the group.
    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
        return Err(io::Error::last_os_error());
    }
    if libc::getppid() != parent {
        libc::_exit(125); // cohort died before the prctl took effect
    }
    // Orphans below the guard become its children, so it can kill them
    // (see `kill_descendants`); the agent's process does not inherit this.
    if libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) != 0 {
        return Err(io::Error::last_os_error());
    }
    match libc::fork() {
        -1 => Err(io::Error::last_os_error()),
        0 => {
            // The agent: signals pending in the guard are not inherited.
            libc::sigprocmask(libc::SIG_SETMASK, &before, std::ptr::null_mut());
            Ok(())
        }
        agent => watch(agent, &watched),
    }
}

/// The guard's whole life: when the agent ends, kill what it left behind and
/// exit with its status; on a signal (cohort died or is stopping), kill
/// everything below the guard.
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
                // The agent, or an orphan the guard adopted as subreaper.
                let mut status = 0;
                loop {
                    let pid = libc::waitpid(-1, &mut status, libc::WNOHANG);
                    if pid <= 0 {
                        break;
                    }
                    if pid == agent {
                        let code = if libc::WIFEXITED(status) {
                            libc::WEXITSTATUS(status)
                        } else {
                            128 + libc::WTERMSIG(status)
                        };
                        kill_descendants();
                        libc::_exit(code);
                    }
                }
            }
            -1 => {} // EINTR
            _ => {
                kill_descendants();
                libc::killpg(0, libc::SIGKILL);
                libc::_exit(128 + libc::SIGKILL);
            }
        }
    }
}

/// Kills every process below the guard, until it has no children left.
///
/// The process group alone is not enough: an agent's tools may move their
/// children into groups or sessions of their own (`setsid`, job control),
/// and those would outlive a group kill. The guard is their child
/// subreaper, so whatever is orphaned below it becomes its child, and it
/// finds its children in `/proc/thread-self/children`. A killed process's
/// own children are orphaned to the guard in turn, and go in the next round.
unsafe fn kill_descendants() {
    let mut buf = [0u8; 4096];
    loop {
        let fd = libc::open(c"/proc/thread-self/children".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return; // no such file (a kernel without it): the group kill is all there is
        }
        let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
        libc::close(fd);
        if n <= 0 {
            return; // no children left
        }
        let mut pid: libc::pid_t = 0;
        for &b in &buf[..n as usize] {
            if b.is_ascii_digit() {
                pid = pid * 10 + libc::pid_t::from(b - b'0');
            } else {
                if pid > 0 {
                    libc::kill(pid, libc::SIGKILL);
                }
                pid = 0;
            }
        }
        if pid > 0 {
            libc::kill(pid, libc::SIGKILL);
        }
        // Wait for one to go, then reap whatever else has gone.
        let mut status = 0;
        libc::waitpid(-1, &mut status, 0);
        while libc::waitpid(-1, &mut status, libc::WNOHANG) > 0 {}
    }
}
