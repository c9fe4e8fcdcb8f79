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
