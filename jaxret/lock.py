"""One trainer per workdir: `WORKDIR/lock` names the process that trains there.

The lock file holds the owner's host, pid and boot id. A second `jaxret train` on the same
workdir is refused; a lock whose owner is gone (same host and a dead pid, or same host after a
reboot, told by the boot id) is taken over, saying so. Only process 0 of a job takes it.
A lock on another host can't be checked from here: it is refused, and the message says how to
clear it by hand.
"""
import json
import os
import socket
import time

from jaxret.errors import UserError

NAME = "lock"


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


class WorkdirLock:
  def __init__(self, workdir):
    self.path = os.path.join(workdir, NAME)
    self.held = False

  def acquire(self):
    me = {"host": socket.gethostname(), "pid": os.getpid(), "boot_id": _boot_id(),
          "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        owner = self._read()
        if owner is not None and not _stale(owner):
          raise UserError(
              f"workdir '{os.path.dirname(self.path)}' is in use by pid {owner.get('pid')} on "
              f"{owner.get('host')} (since {owner.get('since')}); stop that run, or delete "
              f"{self.path} if it is no longer running") from None
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
    if self.held:
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
