"""Load a system-call allow-list with libseccomp, then exec a command under it.

    python tests/seccomp_launch.py FILTER.json -- COMMAND [ARG...]

FILTER.json is ``AllowList.to_json()`` of tests/syscall_filter.py: ``{"allow": [names],
"errno": N or null}``. The filter is what systemd loads for an allow-list SystemCallFilter= with
SystemCallArchitectures=native (systemd src/shared/seccomp-util.c
``seccomp_load_syscall_filter_set_raw``):

* default action ERRNO(errno) when SystemCallErrorNumber= is set, else KILL_PROCESS (SIGSYS);
* ALLOW for each listed call; a name libseccomp does not know, or one that is no system call of
  this architecture (a negative pseudo-number such as ``mmap2`` on x86-64), is skipped, as
  systemd skips it;
* only the native ABI: libseccomp's filter holds the native architecture alone, so a call
  through another ABI (int 0x80, x32) meets the bad-architecture action, a kill;
* no_new_privs set (libseccomp's default, and NoNewPrivileges=yes in the unit);
* with ``"restrict_namespaces": true``, the second filter RestrictNamespaces=yes loads
  (``seccomp_restrict_namespaces`` with nothing retained): clone3 fails with ENOSYS, so glibc
  falls back to clone; setns, and unshare or clone with any CLONE_NEW* flag, fail with EPERM.

The filter stays across execve and is inherited by every child: the exec'd ``migd serve`` and
the guest agents it starts all run under it. Exit 126 if the filter cannot be built or loaded.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from typing import Any

import pyseccomp


def build(spec: dict[str, Any]) -> tuple[pyseccomp.SyscallFilter, int]:
    """The filter for ``spec``, and how many listed names were skipped (unknown here)."""
    error = spec["errno"]
    default = pyseccomp.KILL_PROCESS if error is None else pyseccomp.ERRNO(int(error))
    seccomp_filter = pyseccomp.SyscallFilter(default)
    skipped = 0
    for name in spec["allow"]:
        number = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, str(name))
        if number < 0:
            skipped += 1
            continue
        seccomp_filter.add_rule(pyseccomp.ALLOW, number)
    return seccomp_filter, skipped


#: The namespace flags systemd restricts (its namespace_flag_map): cgroup, ipc, net, mnt, pid, user, uts.
CLONE_NEW_FLAGS = (0x02000000, 0x08000000, 0x40000000, 0x00020000, 0x20000000, 0x10000000, 0x04000000)


def build_namespace_filter() -> pyseccomp.SyscallFilter:
    """RestrictNamespaces=yes as systemd loads it on x86-64."""
    seccomp_filter = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    # clone3's flags sit in a struct seccomp cannot read: refuse the call as if the kernel were
    # older, so callers fall back to clone(2), whose flags are an argument.
    seccomp_filter.add_rule(pyseccomp.ERRNO(errno.ENOSYS), "clone3")
    seccomp_filter.add_rule(pyseccomp.ERRNO(errno.EPERM), "setns")
    for flag in CLONE_NEW_FLAGS:
        for call in ("unshare", "clone"):
            seccomp_filter.add_rule(pyseccomp.ERRNO(errno.EPERM), call, pyseccomp.Arg(0, pyseccomp.MASKED_EQ, flag, flag))
    return seccomp_filter


def main(argv: list[str]) -> int:
    """Load the filter named by ``argv[1]`` and exec the command after ``--``."""
    if len(argv) < 4 or argv[2] != "--":
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 126
    with open(argv[1], encoding="utf-8") as spec_file:
        spec = json.load(spec_file)
    try:
        seccomp_filter, skipped = build(spec)
        # systemd's order (the system-call filter last): seccomp(2) itself is outside the
        # allow-list, so no filter can be loaded after it.
        if spec.get("restrict_namespaces"):
            build_namespace_filter().load()
        seccomp_filter.load()
    except (OSError, ValueError) as exc:
        print(f"seccomp_launch: cannot load the filter: {exc}", file=sys.stderr)
        return 126
    print(f"seccomp_launch: pid={os.getpid()} allowed={len(spec['allow']) - skipped} skipped={skipped} "
          f"default={'kill' if spec['errno'] is None else 'errno ' + str(spec['errno'])} "
          f"restrict_namespaces={bool(spec.get('restrict_namespaces'))}", file=sys.stderr, flush=True)
    os.execv(argv[3], argv[3:])
    return 126  # not reached: execv returns only by raising


if __name__ == "__main__":
    sys.exit(main(sys.argv))
