"""Keep XLA:CPU's per-call buffers in the malloc heap instead of fresh mmaps.

XLA:CPU allocates an executable's temporaries as one block on every call (357 MiB for the small
CLIP train step of benchmarks/train_step.py). glibc serves blocks over 32 MiB with mmap and unmaps
them on free, so each step faults the whole block in again: 88k page faults and about 140 ms of
kernel time in a 300 ms step on the 2-core dev machine. One malloc arena (XLA's threads would
otherwise get arenas of their own, which cannot hold such a block and fall back to mmap), no mmap
and no trimming keep the freed block for the next call: about +28% examples/s (BENCHMARKS.md).
The price is a heap that does not shrink, which a training process does not miss.

`import jaxret` applies it on glibc Linux when JAX will run on the CPU (JAX_PLATFORMS=cpu, or no
TPU/GPU plugin installed): on accelerator hosts the big buffers live on the device, and a single
arena would only serialise the input pipeline's threads. It only reaches threads that have not
allocated yet, so import jaxret before the first JAX computation. JAXRET_CPU_MALLOC=0 turns it
off, =1 forces it; malloc settings in GLIBC_TUNABLES are left to win.
"""
import ctypes
import importlib.util
import os

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8

applied = False


def _runs_on_cpu():
  platforms = os.environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not (importlib.util.find_spec("jax_plugins") or importlib.util.find_spec("libtpu"))


def configure():
  """Sets the heap options if they apply here (see the module docstring); returns whether."""
  global applied
  choice = os.environ.get("JAXRET_CPU_MALLOC", "")
  if choice == "0" or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
    return False
  if choice != "1" and not _runs_on_cpu():
    return False
  try:
    if not os.confstr("CS_GNU_LIBC_VERSION"):
      return False
    libc = ctypes.CDLL("libc.so.6")
  except (ValueError, OSError, AttributeError):  # not glibc (musl, macOS, Windows)
    return False
  applied = all(libc.mallopt(option, value) == 1 for option, value in
                ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2 ** 31 - 1)))
  return applied
