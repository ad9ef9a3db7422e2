//! `runtime.scheduler_slice`: asks Linux (6.12 or later, EEVDF) for a
//! shorter CPU slice for this process's threads. A relay (logic, job) woken
//! by a message then runs at once, instead of waiting up to a tick for a
//! busy comet on the same core to use up its slice.
//!
//! The one place in the binary with `unsafe`: `sched_setattr(2)` and
//! `sched_getattr(2)` have no safe wrapper in libc, nix or rustix. The
//! measured reason is in docs/benchmarks.md ("A shorter slice for logic and
//! job").
#![allow(unsafe_code)]

use std::io;
use std::time::Duration;

/// Sets the calling thread's slice, and with it the slice of every thread
/// it starts afterwards (the runtime's workers). Returns the slice the
/// kernel took, `None` when this kernel has no per-thread slice (it accepts
/// the call and ignores the value before Linux 6.12).
#[cfg(target_os = "linux")]
pub fn set(slice: Duration) -> io::Result<Option<Duration>> {
    let mut attr = get()?;
    let fair = [libc::SCHED_OTHER, libc::SCHED_BATCH]
        .iter()
        .any(|&policy| u32::try_from(policy) == Ok(attr.sched_policy));
    if !fair {
        return Err(io::Error::other(
            "the process does not run under the fair scheduler (SCHED_OTHER)",
        ));
    }
    // Everything else (the nice value, the flags) stays as it is.
    attr.sched_runtime = u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX);
    // SAFETY: `attr` is an initialised `sched_attr` whose `size` field (set
    // by `get`) is its own size, so the kernel reads no further; pid 0 is
    // the calling thread; no flags.
    let done = unsafe {
        libc::syscall(
            libc::SYS_sched_setattr,
            0,
            &attr as *const libc::sched_attr,
            0,
        )
    };
    if done != 0 {
        return Err(io::Error::last_os_error());
    }
    // Kernels with per-thread slices report the thread's slice here; older
    // ones report 0 for the fair scheduler.
    let taken = get()?.sched_runtime;
    Ok((taken != 0).then(|| Duration::from_nanos(taken)))
}

#[cfg(not(target_os = "linux"))]
pub fn set(_slice: Duration) -> io::Result<Option<Duration>> {
    Ok(None)
}

/// The calling thread's scheduling attributes.
#[cfg(target_os = "linux")]
fn get() -> io::Result<libc::sched_attr> {
    let size = std::mem::size_of::<libc::sched_attr>();
    let mut attr = libc::sched_attr {
        size: u32::try_from(size).map_err(io::Error::other)?,
        sched_policy: 0,
        sched_flags: 0,
        sched_nice: 0,
        sched_priority: 0,
        sched_runtime: 0,
        sched_deadline: 0,
        sched_period: 0,
    };
    // SAFETY: the kernel writes at most `size` bytes, the size of `attr`,
    // which lives until the call returns; pid 0 is the calling thread; no
    // flags.
    let done = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            0,
            &mut attr as *mut libc::sched_attr,
            size,
            0,
        )
    };
    if done != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(attr)
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// Runs on a thread of its own: the slice stays with the thread.
    #[test]
    fn the_kernel_takes_the_slice_or_says_it_has_none() {
        std::thread::spawn(|| {
            let nice_before = get().expect("sched_getattr").sched_nice;
            match set(Duration::from_micros(300)).expect("sched_setattr") {
                Some(taken) => assert_eq!(taken, Duration::from_micros(300)),
                None => eprintln!("this kernel has no per-thread slice"),
            }
            let after = get().expect("sched_getattr");
            assert_eq!(after.sched_nice, nice_before, "the nice value stays");
            // A thread started now inherits it.
            let child = std::thread::spawn(|| get().expect("sched_getattr").sched_runtime)
                .join()
                .expect("child");
            assert_eq!(child, after.sched_runtime);
        })
        .join()
        .expect("test thread");
    }
}
