"""Files that live on local disk or in a bucket (`gs://BUCKET/...`): what jaxret reads and writes
itself in a workdir (config.json, metrics.jsonl, eval.json, plots, tokenizer copies). Orbax and
tensorstore write checkpoints to either on their own.

Remote paths go through etils.epath, whose backend for gs:// without TensorFlow is fsspec's
gcsfs. An object store has no folders, appends or renames: `write_*` upload the whole object
(it appears whole or not at all, so the write is atomic there too), `makedirs` does nothing,
and `rename` copies and deletes. Local writes go to a temporary file that replaces the target.
"""
import atexit
import os
import posixpath
import shutil
import tempfile


def is_remote(path):
  """True for a URL such as gs://bucket/dir (anything with a scheme)."""
  return "://" in os.fspath(path)


def absolute(path):
  """A local path made absolute; a remote one as it is (without a trailing '/')."""
  path = os.fspath(path)
  return path.rstrip("/") if is_remote(path) else os.path.abspath(path)


def join(path, *parts):
  path = os.fspath(path)
  return posixpath.join(path, *parts) if is_remote(path) else os.path.join(path, *parts)


def _epath(path):
  import fsspec
  from etils import epath
  # gcsfs keeps folder listings for the life of the process unless told not to: objects that
  # another process (or the lock's client) wrote since would stay unseen. jaxret's calls are
  # few; each asks the bucket. (A setting of the user's own wins; applies to new instances.)
  fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)
  return epath.Path(path)


def exists(path):
  return _epath(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path):
  return _epath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def isfile(path):
  return _epath(path).is_file() if is_remote(path) else os.path.isfile(path)


def listdir(path):
  """Sorted names in a folder (a remote 'folder' is a name prefix)."""
  if is_remote(path):
    return sorted(p.name for p in _epath(path).iterdir())
  return sorted(os.listdir(path))


def makedirs(path):
  if not is_remote(path):  # objects need no folders
    os.makedirs(path, exist_ok=True)


def read_bytes(path):
  if is_remote(path):
    return _epath(path).read_bytes()
  with open(path, "rb") as f:
    return f.read()


def read_text(path):
  return read_bytes(path).decode("utf-8")


def write_bytes(path, data):
  """Replace `path` whole: a reader sees the old or the new content, never a part."""
  if is_remote(path):
    _epath(path).write_bytes(data)
    return
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_text(path, text):
  write_bytes(path, text.encode("utf-8"))


def remove(path):
  if is_remote(path):
    _epath(path).unlink()
  else:
    os.remove(path)


def rmtree(path):
  if is_remote(path):
    _epath(path).rmtree()
  else:
    shutil.rmtree(path)


def rename(src, dst):
  """A file or folder to a new name in the same store (in a bucket: copy, then delete)."""
  if is_remote(src):
    _epath(src).rename(dst)
  else:
    os.replace(src, dst)


def copy(src, dst):
  """A file or folder (recursively), between local and remote paths in either direction."""
  if isdir(src):
    makedirs(dst)
    for name in listdir(src):
      copy(join(src, name), join(dst, name))
  else:
    if not is_remote(dst):
      os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    write_bytes(dst, read_bytes(src))


def local_copy(path):
  """`path` itself when local; a remote file or folder is downloaded to a temporary folder
  (removed at exit), for libraries that read local files only (tokenizers)."""
  if not is_remote(path):
    return path
  tmp = tempfile.mkdtemp(prefix="jaxret-")
  atexit.register(shutil.rmtree, tmp, True)
  local = os.path.join(tmp, posixpath.basename(absolute(path)))
  copy(path, local)
  return local
