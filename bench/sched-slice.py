#!/usr/bin/env python3
"""sched-slice.py NANOSECONDS CMD [ARGS...]: runs CMD with that EEVDF slice.

For processes that are not ours (nats-server in bench/fleet.sh, NATS_SLICE_NS):
what `runtime.scheduler_slice` does inside logic and job, done with
sched_setattr(2) before exec, since util-linux's chrt learnt
`--sched-runtime` for SCHED_OTHER only in 2.41. Threads the command starts
inherit the slice. Linux 6.12 or later; older kernels ignore it.
"""
import ctypes
import os
import struct
import sys

SYS_SCHED_SETATTR = {"x86_64": 314, "aarch64": 274}


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__.strip().splitlines()[0])
    slice_ns = int(sys.argv[1])
    number = SYS_SCHED_SETATTR.get(os.uname().machine)
    if number is None:
        sys.exit(f"sched-slice.py: unknown machine {os.uname().machine}")
    # struct sched_attr (VER0, 48 bytes): size, policy (SCHED_OTHER), flags,
    # nice (kept), priority, runtime (the slice), deadline, period.
    nice = os.getpriority(os.PRIO_PROCESS, 0)
    attr = ctypes.create_string_buffer(
        struct.pack("<IIQiIQQQ", 48, 0, 0, nice, 0, slice_ns, 0, 0)
    )
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(ctypes.c_long(number), ctypes.c_long(0), attr, ctypes.c_long(0)) != 0:
        sys.exit(f"sched-slice.py: sched_setattr: {os.strerror(ctypes.get_errno())}")
    os.execvp(sys.argv[2], sys.argv[2:])


if __name__ == "__main__":
    main()
