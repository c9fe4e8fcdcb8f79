"""The one exception type for user mistakes.

Raise `UserError` with a single line that names the thing that is wrong and the fix.
The CLI prints it as `jaxret: error: ...` and exits with status 2, without a traceback.
"""


class UserError(Exception):
  """A mistake the user can fix (bad config, path, input); message is one actionable line."""


def nearest(name, candidates):
  """The closest valid spelling of `name` among `candidates`, or None."""
  import difflib
  match = difflib.get_close_matches(str(name), [str(c) for c in candidates], n=1, cutoff=0.5)
  return match[0] if match else None


def did_you_mean(name, candidates):
  """' (did you mean 'x'?)' when a close candidate exists, else ''."""
  best = nearest(name, candidates)
  return f" (did you mean '{best}'?)" if best else ""


class Preempted(Exception):
  """Training stopped on a signal after saving the current step; rerunning resumes it.
  The CLI exits with PREEMPTED_STATUS, which launch scripts read as "requeue me"."""

  def __init__(self, signal_name, step):
    super().__init__(f"stopped by {signal_name} at step {step}: a checkpoint of step {step} is "
                     "saved; rerun the same command to resume from it")
    self.signal_name, self.step = signal_name, step


PREEMPTED_STATUS = 143  # 128 + SIGTERM, what a shell reports for a job ended by SIGTERM
