"""The frozen teacher of `loss.distill`: any folder `jaxret.load` reads (a workdir, a `jaxret
export` folder, a `jaxret import-hf` folder), its parameters placed on the student's mesh by
the student's logical-axis rules, so a teacher shards like the student (FSDP and TP included).

Online, the train step runs the teacher's forward pass on the student's batch (images resized
on the device when the two image sizes differ; captions tokenized by the teacher's own
tokenizer when it is not the student's). Offline, `jaxret data teacher` has stored its
embeddings in the records and the step reads them instead (jaxret/data/teacher_store.py).
"""

import dataclasses
import os

import jax
import jax.numpy as jnp

from jaxret import storage
from jaxret.errors import UserError
from jaxret.parallel import partitioning


@dataclasses.dataclass(frozen=True)
class Teacher:
  module: object            # the teacher's TwoTower
  params: object            # on the student's mesh
  image_size: int
  tokenizer_path: str       # its tokenizer file, local
  text_len: int             # its model.text.max_len
  own_tokens: bool          # captions need the teacher's tokenizer ("teacher_text")
  path: str = ""


def tokenizer_path(path):
  """The tokenizer file a teacher folder's model encodes with."""
  from jaxret.inference import loaders
  kind = loaders.folder_kind(path)
  if kind == "workdir":
    from jaxret.workdir import load_run_config
    return loaders.workdir_tokenizer(path, load_run_config(path))
  return os.path.join(path, "tokenizer.json")


def param_shardings(module, image_size, mesh, rules):
  """A teacher's parameter shardings on `mesh` (concrete or abstract) by the student's rules."""
  from jaxret.experiment import dummy_inputs
  boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), *dummy_inputs(
      module, image_size, mesh.size)))
  return partitioning.logical_shardings(boxed, mesh, rules)["params"]


def load_teacher(path, mesh, rules, student_tokenizer_path, student_text_len):
  """-> Teacher; one-line UserError when the folder cannot be loaded."""
  from jaxret.inference.loaders import load
  try:
    loaded = load(path, devices=list(mesh.devices.flat))
    tok_path = tokenizer_path(path)
  except UserError as e:
    raise UserError(f"loss.distill.teacher '{path}' cannot be loaded: {e}") from None
  module = loaded.module
  params = jax.device_put(loaded.params, param_shardings(module, loaded.image_size, mesh, rules))
  same = (int(module.text.max_len) == int(student_text_len)
          and storage.read_bytes(tok_path) == storage.read_bytes(student_tokenizer_path))
  return Teacher(module, params, loaded.image_size, tok_path, int(module.text.max_len),
                 own_tokens=not same, path=path)


def teacher_embeddings(teacher, params, batch):
  """(image_emb, text_emb) [B, d] of the teacher on a training batch, without gradient;
  offline batches carry them already."""
  if "teacher_image_emb" in batch:
    return batch["teacher_image_emb"], batch["teacher_text_emb"]
  image = batch["image"]
  if image.shape[1] != teacher.image_size:  # the student's crop, at the teacher's size
    size = (image.shape[0], teacher.image_size, teacher.image_size, image.shape[3])
    image = jnp.round(jax.image.resize(image.astype(jnp.float32), size, "bilinear"))
    image = jnp.clip(image, 0, 255).astype(jnp.uint8)
  text = batch["teacher_text"] if teacher.own_tokens else batch["text"]
  out = teacher.module.apply({"params": params}, image, text)
  return jax.lax.stop_gradient((out["image_emb"], out["text_emb"]))
