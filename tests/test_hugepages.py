"""jaxret.hugepages: the restart with glibc.malloc.hugetlb=1, and what it buys.

Each case runs in a fresh interpreter (glibc reads its tunables at start-up). The reference is
the same program with the restart turned off (JAXRET_HUGEPAGES=0), which must fault its whole
temp block in, 4 KiB at a time, on every call, or the probe proves nothing.
"""
import os
import resource
import subprocess
import sys

import pytest

from jaxret import hugepages

PROBE = r"""
import os, resource, sys
from jaxret import hugepages
hugepages.reexec_if_needed()
sys.argv[1:] and print("restarted", os.environ.get("GLIBC_TUNABLES", ""))

import jax, jax.numpy as jnp

@jax.jit
def f(x, w):
  z = jnp.stack([jnp.sin(x * i) for i in range(16)])  # 16 x 4 MiB, all live at the dot
  return (z @ w).sum()

x, w = jnp.ones((512, 2048)), jnp.ones((2048, 8))
temp = f.lower(x, w).compile().memory_analysis().temp_size_in_bytes
f(x, w).block_until_ready()
faults = []
for _ in range(8):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x, w).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(os.environ.get("GLIBC_TUNABLES", "-"), temp, sorted(faults)[len(faults) // 2])
"""


def probe(setting, *args):
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "JAX_PLATFORMS")}
  env["JAXRET_HUGEPAGES"] = setting
  out = subprocess.run([sys.executable, "-c", PROBE, *args], env=env, capture_output=True,
                       text=True, timeout=120, check=True).stdout.split("\n")
  tunables, temp, faults = out[-2].split()
  return tunables, int(temp), int(faults), out[:-2]


needs_thp = pytest.mark.skipif(
    not hugepages._thp_available() or (hugepages._glibc_version() or (0,)) < (2, 35),
    reason="needs glibc >= 2.35 and transparent huge pages")


@needs_thp
def test_restart_sets_the_tunable_and_removes_the_page_faults():
  pages = lambda nbytes: nbytes // resource.getpagesize()  # noqa: E731
  tunables, temp, faults, _ = probe("0")
  assert tunables == "-"
  assert temp >= 64 << 20  # well above glibc's largest mmap threshold (32 MiB)
  assert faults >= pages(temp) // 2, "the probe's temp block no longer faults on glibc defaults"

  # The restart keeps the arguments (the probe prints them back) and runs the program once more.
  tunables, temp, faults_huge, lines = probe("1", "--an-argument")
  assert tunables == hugepages.TUNABLE
  assert lines == [f"restarted {hugepages.TUNABLE}"]
  assert faults_huge < pages(temp) // 8  # 2 MiB pages: 512x fewer faults when THP serves them


@needs_thp
def test_no_restart_when_turned_off_or_already_set(monkeypatch):
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  monkeypatch.setenv("JAXRET_HUGEPAGES", "1")
  assert hugepages.needed()  # the control: without the switches below, it would restart
  monkeypatch.setenv("JAXRET_HUGEPAGES", "0")
  assert not hugepages.needed()
  monkeypatch.setenv("JAXRET_HUGEPAGES", "1")
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")  # the user's choice wins
  assert not hugepages.needed()


def test_the_command_restarts_and_calls_from_python_do_not(monkeypatch, capsys):
  from jaxret import cli
  calls = []
  monkeypatch.setattr(hugepages, "reexec_if_needed", lambda: calls.append(1))
  monkeypatch.setattr(sys, "argv", ["jaxret", "--help"])
  with pytest.raises(SystemExit):
    cli.main()  # as the console script calls it
  with pytest.raises(SystemExit):
    cli.main(["--help"])
  assert calls == [1]
