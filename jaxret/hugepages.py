"""Transparent huge pages for glibc's large allocations, for programs that run JAX on a CPU.

XLA:CPU allocates an executable's temporaries as one block on every call (357 MiB for the small
CLIP train step of benchmarks/train_step.py). glibc maps blocks over 32 MiB fresh and unmaps
them on free, so each step faults the whole block in again, 4 KiB at a time: 88k page faults and
about 140 ms of kernel time in a 300 ms step on the 2-core dev machine. glibc's tunable
`glibc.malloc.hugetlb=1` (glibc >= 2.35) madvises those mappings for transparent huge pages, so a
step takes a few hundred 2 MiB faults instead: +16-26% examples/s for that step and +14-29% for
the demo's training loop (BENCHMARKS.md).

Tunables are read once, when the process starts, so `reexec_if_needed()` restarts the program
(same interpreter, same arguments, same PID) with the tunable added to GLIBC_TUNABLES. The
`jaxret` command and the benchmarks call it first thing. It does nothing when the tunable (or
any glibc.malloc.hugetlb setting) is already there, on other C libraries and older glibc, when
THP is off in the kernel, and when JAX will not run on the CPU (a TPU/GPU plugin is installed and
JAX_PLATFORMS does not start with cpu): there the big buffers live on the device.
JAXRET_HUGEPAGES=0 turns it off, =1 forces it. A script of your own can get the same by setting
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 in its environment.
"""
import importlib.util
import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_version():
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    return tuple(int(p) for p in version.split(".")[:2]) if name == "glibc" else None
  except (ValueError, OSError, AttributeError):  # not glibc, or no confstr (macOS, Windows)
    return None


def _thp_available():
  try:
    with open(_THP) as f:
      return "[never]" not in f.read()
  except OSError:
    return False


def _runs_on_cpu():
  platforms = os.environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not (importlib.util.find_spec("jax_plugins") or importlib.util.find_spec("libtpu"))


def needed():
  """Whether this process should restart with the tunable (see the module docstring)."""
  choice = os.environ.get("JAXRET_HUGEPAGES", "")
  if choice == "0" or "glibc.malloc.hugetlb" in os.environ.get("GLIBC_TUNABLES", ""):
    return False
  version = _glibc_version()
  if version is None or version < (2, 35) or not _thp_available():
    return False
  return choice == "1" or _runs_on_cpu()


def reexec_if_needed():
  """Restarts this program with glibc.malloc.hugetlb=1 if `needed()`; call it before any
  work, since everything done so far is done again."""
  if not needed():
    return
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  os.environ["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}" if tunables else TUNABLE
  sys.stdout.flush(), sys.stderr.flush()
  os.execv(sys.executable, sys.orig_argv)
