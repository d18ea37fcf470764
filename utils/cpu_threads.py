"""CPU threads that do not fight each other or other processes. Call configure() before torch is imported.

Two ways a small CPU machine loses most of its speed, both fixed here through the environment (only where the
user has not set the variable):

- Spinning OpenMP threads. PyTorch's OpenMP (libgomp) lets an idle thread spin for ~300,000 iterations before it
  sleeps, and a training step of a small model is thousands of short parallel regions. As soon as another process
  takes a core, one of the two threads is descheduled while the other spins at every barrier: measured on this
  project's shared 2-core machine (tiny model, 8 x 256 tokens, load average ~11), 6.8 s per step with 2 spinning
  threads against 0.59 s with OMP_WAIT_POLICY=PASSIVE (0.58 s with one thread), and 9x the CPU time. The waiting
  threads now sleep instead (OMP_WAIT_POLICY=PASSIVE); libgomp reads it once, when torch loads it.
- More threads than CPUs. In a container limited by a CPU quota (cgroup cpu.max / cpu.cfs_quota_us), or pinned to
  a few CPUs, os.cpu_count() still sees every CPU of the host: PyTorch's and the tokenizer's (Rayon's) pools would
  then run dozens of threads on two CPUs' worth of time. OMP_NUM_THREADS and RAYON_NUM_THREADS are set to the CPUs
  this process can really use.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> int | None:
    """CPUs' worth of time the cgroup quota allows (rounded up), or None without a quota."""
    v2 = root / "cpu.max"                                     # "max 100000" or "200000 100000"
    v1 = (root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us")
    try:
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
        elif v1[0].is_file() and v1[1].is_file():
            quota, period = v1[0].read_text().strip(), v1[1].read_text().strip()
        else:
            return None
        if quota in ("max", "-1") or int(period) <= 0:
            return None
        return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        return None


def usable_cpus(root: Path = CGROUP_ROOT) -> int:
    """The CPUs this process can really run on: its affinity mask, capped by the cgroup's CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):       # not Linux
        n = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root)
    return min(n, limit) if limit else n


def configure(env=os.environ, root: Path = CGROUP_ROOT) -> dict:
    """Set the thread variables the user has not set; returns those it set. Only effective before torch (and
    tokenizers' pool) start, so the scripts call it before their other imports."""
    wanted = {"OMP_WAIT_POLICY": "PASSIVE"}
    n = usable_cpus(root)
    if n < (os.cpu_count() or n):
        wanted.update(OMP_NUM_THREADS=str(n), RAYON_NUM_THREADS=str(n))
    changed = {k: v for k, v in wanted.items() if k not in env}
    env.update(changed)
    return changed
