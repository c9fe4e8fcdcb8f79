"""Orbax checkpoints of the train state together with the grain iterator state.

Layout: WORKDIR/checkpoints/<step>/{state,data}. Saves are asynchronous (the train step
goes on while the arrays are written) and keep the last `checkpoint.keep`. WORKDIR may be a
bucket (gs://...): orbax writes there itself (tensorstore for the arrays).
"""
import contextlib
import errno
import os
import time

import grain
import jax
import orbax.checkpoint as ocp

from jaxret import storage
from jaxret.errors import UserError
from jaxret.param_rules import param_paths


class Checkpointer:
  def __init__(self, workdir, *, every, keep, async_save=True):
    self.directory = storage.join(storage.absolute(workdir), "checkpoints")  # or gs://...
    self.every = every
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=every,
            enable_async_checkpointing=async_save),
        # Handlers named up front, so checkpoint metadata can be read before any restore.
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler()})

  def latest_step(self):
    return self.manager.latest_step()

  def all_steps(self):
    return list(self.manager.all_steps())

  def save(self, step, state, data_iterator, *, force=False):
    """Save if `step` is on the interval (or `force`); returns whether a save started."""
    if not force and (self.every <= 0 or step % self.every):
      return False
    # The grain handler writes the iterator state synchronously, before the next batch is
    # drawn; only the arrays are written in the background.
    with self._storage_errors(step):
      return self.manager.save(
          step, force=force,
          args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=grain.checkpoint.CheckpointSave(data_iterator)))

  def due(self, step):
    """Whether `save(step)` would save on the interval."""
    return self.every > 0 and step % self.every == 0

  @contextlib.contextmanager
  def _storage_errors(self, step):
    """A full disk or an unwritable workdir is one line; the tmp folder of the failed save is
    never listed as a checkpoint, so the earlier ones stay the latest."""
    try:
      yield
    except UserError:
      raise
    except Exception as e:  # orbax/tensorstore wrap the OS error in their own types
      why = _storage_problem(e)
      if why is None:
        raise
      before = [s for s in self.all_steps() if s != step]
      latest = f"the latest intact one is step {max(before)}" if before else "none was saved yet"
      raise UserError(f"could not write checkpoint step {step} to {self.directory}: {why}; "
                      f"earlier checkpoints are intact ({latest}); free space or fix the "
                      "permissions and rerun the same command to resume") from None

  def check_compatible(self, step, abstract_state):
    """Fail with a clear line if the checkpoint's parameters differ from the model's."""
    saved = self.manager.item_metadata(step)["state"]
    if saved is None:
      return
    saved_params = _shapes(getattr(saved, "tree", saved)["params"])
    want = _shapes(abstract_state.params)
    if saved_params != want:
      missing = sorted(set(want) - set(saved_params))
      extra = sorted(set(saved_params) - set(want))
      diff = sorted(k for k in set(want) & set(saved_params) if want[k] != saved_params[k])
      if diff:
        k = diff[0]
        detail = f"parameter '{k}' has shape {saved_params[k]} there but {want[k]} in this config"
      elif missing:
        detail = f"it has no parameter '{missing[0]}'"
      else:
        detail = f"it has an extra parameter '{extra[0]}'"
      raise UserError(
          f"{self.directory} holds a checkpoint (step {step}) of a different model: {detail}; "
          "use a new --workdir, or the config that wrote it")

  def restore(self, step, abstract_state, data_iterator):
    """-> state placed in the shardings of `abstract_state`; the iterator is restored in place."""
    self.check_compatible(step, abstract_state)
    restored = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return restored["state"]

  def restore_state(self, step, abstract_state):
    """Only the train state (evaluation and export need no data iterator)."""
    self.check_compatible(step, abstract_state)
    restored = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"]

  def restore_latest(self, abstract_state, data_iterator):
    """-> (step, state) from the newest readable checkpoint, or (None, None) if there is none.

    A checkpoint that fails to read (a torn or corrupted write) is moved aside as
    `<step>.corrupt-<time>` (orbax lists only integer names) and the one before it is tried,
    saying so: the run loses the steps since then, not the whole run.
    """
    for step in sorted(self.all_steps(), reverse=True):
      try:
        return step, self.restore(step, abstract_state, data_iterator)
      except UserError:
        raise
      except Exception as e:  # noqa: BLE001 - any failure to read means this step is unusable
        aside = storage.join(self.directory, f"{step}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        if jax.process_index() == 0:
          storage.rename(storage.join(self.directory, str(step)), aside)
        print(f"checkpoint step {step} in {self.directory} is unreadable "
              f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); moved it "
              f"to {aside} and falling back to the one before", flush=True)
        self.manager.reload()
    return None, None

  def wait(self):
    with self._storage_errors(self.latest_step()):
      self.manager.wait_until_finished()

  def close(self):
    try:
      self.wait()
    finally:
      self.manager.close()


def _storage_problem(e):
  """'no space left on device' etc. when `e` (or what it wraps) is such an OS error."""
  texts = {errno.ENOSPC: "no space left on device", errno.EROFS: "read-only file system",
           errno.EACCES: "permission denied", errno.EDQUOT: "disk quota exceeded"}
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in texts:
      return texts[e.errno]
    msg = str(e)
    for code, text in texts.items():
      if os.strerror(code) in msg or f"os_error_code='{code}'" in msg:
        return text
    e = e.__cause__ or e.__context__
  return None


def _shapes(tree):
  """{'a/b/kernel': shape} for any tree whose leaves have a .shape."""
  names = jax.tree.leaves(param_paths(tree))
  return {n: tuple(getattr(leaf, "shape", ())) for n, leaf in zip(names, jax.tree.leaves(tree))}
