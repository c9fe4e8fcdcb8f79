"""jaxret.cpu_malloc: XLA:CPU's per-call temporaries stop costing page faults on every call.

Each case runs in a fresh interpreter, because the setting must precede JAX's threads. The
reference is the same program with the setting turned off (JAXRET_CPU_MALLOC=0), which must
fault its whole temp block in on every call, or the probe proves nothing.
"""
import os
import resource
import subprocess
import sys

import pytest

PROBE = r"""
import resource
import jax  # imported before jaxret, as a user's script may do: the backend is still unstarted
import jax.numpy as jnp
from jaxret import cpu_malloc

@jax.jit
def f(x, w):
  z = jnp.stack([jnp.sin(x * i) for i in range(16)])  # 16 x 4 MiB, all live at the dot
  return (z @ w).sum()

x, w = jnp.ones((512, 2048)), jnp.ones((2048, 8))
temp = f.lower(x, w).compile().memory_analysis().temp_size_in_bytes
f(x, w).block_until_ready()
faults = []
for _ in range(16):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x, w).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# The heap grows by a block a few times while it settles; count the steady state.
print(int(cpu_malloc.applied), temp, sum(faults[8:]), min(faults[8:]))
"""


def probe(setting):
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "JAX_PLATFORMS")}
  env["JAXRET_CPU_MALLOC"] = setting
  out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                       timeout=120, check=True).stdout.split()
  return [int(v) for v in out[-4:]]


@pytest.mark.skipif(not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION"),
                    reason="the setting is glibc's")
def test_temp_block_is_reused_without_page_faults():
  pages = lambda nbytes: nbytes // resource.getpagesize()  # noqa: E731
  applied, temp, total_off, fewest = probe("0")
  assert not applied
  assert temp >= 64 << 20  # well above glibc's largest mmap threshold (32 MiB)
  assert fewest >= pages(temp) // 2, "the probe's temp block no longer faults on glibc defaults"
  applied, temp, total_on, _ = probe("1")
  assert applied
  # Off: every one of the 8 calls faults the block in. On: at most a late heap growth or so.
  assert total_on < 1.5 * pages(temp) and total_on * 4 < total_off
