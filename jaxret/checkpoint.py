"""Orbax checkpoints of the train state together with the grain iterator state.

Layout: WORKDIR/checkpoints/<step>/{state,data}. Saves are asynchronous (the train step
goes on while the arrays are written) and keep the last `checkpoint.keep`.
"""
import os

import grain
import jax
import orbax.checkpoint as ocp

from jaxret.errors import UserError
from jaxret.param_rules import param_paths


class Checkpointer:
  def __init__(self, workdir, *, every, keep, async_save=True):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
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
    return self.manager.save(
        step, force=force,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                data=grain.checkpoint.CheckpointSave(data_iterator)))

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

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def _shapes(tree):
  """{'a/b/kernel': shape} for any tree whose leaves have a .shape."""
  names = jax.tree.leaves(param_paths(tree))
  return {n: tuple(getattr(leaf, "shape", ())) for n, leaf in zip(names, jax.tree.leaves(tree))}
