"""Every test process sees 8 simulated CPU devices (set before JAX initialises its backend)."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
# The tests' models are tiny, so compiling costs more than running: LLVM at -O0 compiles the
# demo-sized train step in 1.8 s instead of 3.1 and runs it 3x slower (4 ms a step). The whole
# suite with an empty compile cache: 14 min 5 s instead of 15 min 36 s; test_train, test_losses
# and test_faults with a warm one: the same (80 s). The HLO the tests check (shardings, buffers,
# FLOPs) does not depend on the LLVM level; float results may move in the last bits, inside
# every tolerance.
# JAXRET_TEST_LLVM_O=2 runs the suite at XLA's default.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=" + os.environ.get(
      "JAXRET_TEST_LLVM_O", "0")
# Many tests (and the `jaxret` subprocesses they start, which inherit the environment) compile
# the same tiny train step: JAX's persistent compilation cache, shared by the xdist workers,
# compiles each once per suite run. Its keys hash the HLO, jaxlib and devices, so edits to
# the code never reuse a stale entry.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.environ.get("TMPDIR", "/tmp"), f"jaxret-tests-xla-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A model small enough that a train step compiles in seconds on two cores.
TINY = [
    "model.embed_dim=32", "model.image.patch_size=16", "model.image.width=32",
    "model.image.depth=1", "model.image.num_heads=2", "model.image.mlp_dim=64",
    "model.text.width=32", "model.text.depth=1", "model.text.num_heads=2",
    "model.text.mlp_dim=64", "batch_size=16", "total_steps=6", "log_every=1",
    "optim.warmup_steps=2", "checkpoint.every=2",
    "eval.batch_size=32",
    # The hubness banks embed this many training records at every evaluation (default 5000:
    # the whole 512-record train split here, the slowest part of a tiny run's evaluation).
    "eval.hubness_bank=64",
]


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
  """A small demo data set built once for the whole session."""
  from jaxret.data.demo import build_demo
  out = tmp_path_factory.mktemp("demo_data")
  build_demo(str(out), num_train=512, num_test=64, seed=0, progress=False)
  return str(out)


@pytest.fixture(scope="session")
def tiny_config(demo_dir):
  """tiny_config(loss, *overrides) -> the demo config, shrunk, pointing at the session data."""
  from jaxret.experiment import load_config

  def make(loss="softmax", *overrides):
    return load_config(os.path.join(ROOT, "configs", "demo.py") + ":" + loss,
                       TINY + [f"data.dir={demo_dir}", *overrides])
  return make


@pytest.fixture(scope="session")
def gcs_bucket():
  """`gs://BUCKET` on a local GCS server started for this session (tests/gcs_emulator.py); every
  client here and in subprocesses finds it through the environment, set until the end."""
  from gcs_emulator import gcs_server
  with gcs_server() as bucket:
    yield bucket
