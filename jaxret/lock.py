"""One trainer per workdir: `WORKDIR/lock` names the process that trains there.

On local disk the lock file holds the owner's host, pid and boot id. A second `jaxret train` on
the same workdir is refused; a lock whose owner is gone (same host and a dead pid, or same host
after a reboot, told by the boot id) is taken over, saying so. Only process 0 of a job takes it.
A lock on another host can't be checked from here: it is refused, and the message says how to
clear it by hand.

In a bucket (`--workdir gs://...`) the lock is an object created with a generation precondition
(`if_generation_match=0`: the create fails if it exists), so two trainers can't both take it.
It holds the same facts plus a lease: the owner rewrites it every lease/4 seconds. A lock whose
last write (the object's server-side `updated` time) is older than its lease belongs to a dead
or cut-off host and is taken over, replacing exactly the generation that was judged dead; a dead
host's lock therefore blocks a restart for at most the lease (LEASE_S). A dead process on this
same host is taken over at once, as on local disk.
"""
import json
import os
import socket
import threading
import time

from jaxret import storage
from jaxret.errors import UserError

NAME = "lock"
LEASE_S = 120  # a bucket lock not refreshed for this long is taken over


def _boot_id():
  try:
    with open("/proc/sys/kernel/random/boot_id") as f:
      return f.read().strip()
  except OSError:
    return ""


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's live process
    return True
  return True


def _stale(owner):
  """True when the owner is certainly gone (this host only)."""
  if owner.get("host") != socket.gethostname():
    return False
  if owner.get("boot_id") and owner["boot_id"] != _boot_id():
    return True  # the host rebooted since the lock was taken
  return not _alive(int(owner.get("pid", -1)))


def _me(**extra):
  return {"host": socket.gethostname(), "pid": os.getpid(), "boot_id": _boot_id(),
          "since": time.strftime("%Y-%m-%d %H:%M:%S"), **extra}


def _is_me(owner):
  return owner is not None and all(owner.get(k) == v for k, v in _me().items() if k != "since")


def _in_use(path, owner, note=""):
  return UserError(f"workdir '{path.rsplit('/', 1)[0]}' is in use by pid {owner.get('pid')} on "
                   f"{owner.get('host')} (since {owner.get('since')}){note}; stop that run, or "
                   f"delete {path} if it is no longer running")


class WorkdirLock:
  def __init__(self, workdir, *, lease_s=LEASE_S):
    self.path = storage.join(workdir, NAME)
    self.held = False
    self._bucket = _BucketLock(self.path, lease_s) if storage.is_remote(workdir) else None

  def acquire(self):
    if self._bucket is not None:
      self._bucket.acquire()
      self.held = True
      return self
    me = _me()
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        owner = self._read()
        if owner is not None and not _stale(owner):
          raise _in_use(self.path, owner) from None
        who = "an unreadable lock" if owner is None else \
            f"pid {owner.get('pid')} on {owner.get('host')}, which is gone"
        print(f"taking over {self.path} from {who}", flush=True)
        try:
          os.remove(self.path)
        except FileNotFoundError:
          pass
        continue
      with os.fdopen(fd, "w") as f:
        json.dump(me, f)
      self.held = True
      return self
    raise UserError(f"could not take {self.path}: another process keeps creating it; stop the "
                    "other run on this workdir")

  def _read(self):
    try:
      with open(self.path) as f:
        return json.load(f)
    except (OSError, ValueError):
      return None  # torn write by a killed owner, or removed meanwhile

  def release(self):
    if self.held and self._bucket is not None:
      self._bucket.release()
    elif self.held:
      try:
        owner = self._read()
        if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
          os.remove(self.path)
      except OSError:
        pass
    self.held = False

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


class _BucketLock:
  """The lock object in a gs:// bucket (see the module docstring), through google-cloud-storage
  (gcsfs has no create-if-absent)."""

  def __init__(self, path, lease_s):
    if not path.startswith("gs://"):
      raise UserError(f"--workdir '{path.rsplit('/', 1)[0]}': jaxret keeps workdirs on local "
                      "disk or in gs:// buckets; use one of those")
    from google.auth.exceptions import DefaultCredentialsError
    from google.cloud import storage as gcs
    bucket, _, name = path[len("gs://"):].partition("/")
    self.path, self.lease_s = path, lease_s
    try:
      self._bucket = gcs.Client().bucket(bucket)
    except DefaultCredentialsError:
      raise UserError(f"--workdir '{path.rsplit('/', 1)[0]}' is in a bucket but no Google Cloud "
                      "credentials were found: run `gcloud auth application-default login` (a "
                      "Cloud VM uses its service account)") from None
    self._name = name
    self._generation = None
    self._stop = threading.Event()
    self._thread = None

  def _write(self, generation):
    """Upload the lock if the object is at `generation` (0: absent); -> its new generation."""
    blob = self._bucket.blob(self._name)
    blob.upload_from_string(json.dumps(_me(lease_s=self.lease_s)),
                            content_type="application/json", if_generation_match=generation)
    return blob.generation

  def _read(self):
    """-> (owner or None if unreadable, generation, seconds since its last write); generation
    None when there is no lock."""
    from google.api_core.exceptions import NotFound, PreconditionFailed
    blob = self._bucket.get_blob(self._name)
    if blob is None:
      return None, None, 0.0
    try:
      owner = json.loads(blob.download_as_bytes(if_generation_match=blob.generation))
    except (NotFound, PreconditionFailed):  # replaced or removed meanwhile: look again
      return None, None, 0.0
    except ValueError:
      owner = None
    return owner, blob.generation, time.time() - blob.updated.timestamp()

  def acquire(self):
    from google.api_core.exceptions import PreconditionFailed
    for _ in range(3):
      try:
        self._generation = self._write(0)
        break
      except PreconditionFailed:
        pass
      owner, generation, age = self._read()
      if generation is None:
        continue
      if _is_me(owner):  # our own create whose reply was lost and retried
        self._generation = generation
        break
      lease = float((owner or {}).get("lease_s", self.lease_s))
      if owner is not None and age <= lease and not _stale(owner):
        raise _in_use(self.path, owner, f", lease refreshed {age:.0f} s ago; it is taken over "
                      f"{lease:.0f} s after its last refresh") from None
      who = "an unreadable lock" if owner is None else (
          f"pid {owner.get('pid')} on {owner.get('host')}, which is gone" if _stale(owner) else
          f"pid {owner.get('pid')} on {owner.get('host')}, whose lease expired {age - lease:.0f} s "
          "ago")
      print(f"taking over {self.path} from {who}", flush=True)
      try:
        self._generation = self._write(generation)  # exactly the lock judged dead
        break
      except PreconditionFailed:
        continue  # refreshed by its owner or taken by another trainer meanwhile: look again
    else:
      raise UserError(f"could not take {self.path}: another trainer keeps taking it; stop the "
                      "other run on this workdir")
    self._stop.clear()
    self._thread = threading.Thread(target=self._refresh, name="jaxret-lock-lease", daemon=True)
    self._thread.start()

  def _refresh(self):
    from google.api_core.exceptions import PreconditionFailed
    while not self._stop.wait(self.lease_s / 4):
      try:
        self._generation = self._write(self._generation)
      except PreconditionFailed:
        print(f"lost the lock {self.path}: another trainer took it over after this one's lease "
              "expired; stop one of the two runs", flush=True)
        return
      except Exception as e:  # noqa: BLE001 - a network blip: try again at the next refresh
        print(f"could not refresh the lock {self.path} ({type(e).__name__}); retrying", flush=True)

  def release(self):
    from google.api_core.exceptions import NotFound, PreconditionFailed
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    try:  # only the lock this process still holds
      self._bucket.blob(self._name).delete(if_generation_match=self._generation)
    except (NotFound, PreconditionFailed):
      pass
