"""`jaxret data teacher`: the copy of a data dir with a teacher's embeddings of several
augmented views of each image and of each caption (the format: jaxret/data/teacher_store.py)."""

import dataclasses
import json
import shutil
from pathlib import Path

import msgpack
import numpy as np

from jaxret.data import sources, transforms
from jaxret.data.teacher_store import apply_view, sample_views
from jaxret.errors import UserError


def write_teacher_data(teacher_path, data_dir, out_dir, *, split="train", views=4, seed=0,
                       image_size=None, crop_scale=(0.9, 1.0), crop_ratio=(3 / 4, 4 / 3),
                       flip=False, batch_size=64, progress=True):
  """Writes the copy of `data_dir` with the teacher's embeddings in `split` (module doc)."""
  import jax
  from tqdm import tqdm
  from jaxret.parallel.mesh import make_mesh
  from jaxret.parallel import partitioning
  from jaxret.inference.teacher import load_teacher, teacher_embeddings
  data_dir, out_dir = Path(data_dir), Path(out_dir)
  if out_dir.resolve() == data_dir.resolve():
    raise UserError("--out must be a new folder: the teacher's records are a copy of --data")
  manifest = sources.load_manifest(data_dir)
  paths = sources.split_files(data_dir, split, manifest)
  size = int(image_size or manifest["image_size"])
  mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.local_devices())
  teacher = load_teacher(teacher_path, mesh, partitioning.DEFAULT_RULES,
                         str(data_dir / manifest["tokenizer"]), 0)
  teacher = dataclasses.replace(teacher, own_tokens=True)  # captions: the teacher's tokenizer
  from jaxret.data.tokenizers import load_tokenizer
  tokenizer = load_tokenizer(teacher.tokenizer_path, teacher.text_len)
  sharding = partitioning.batch_sharding(mesh)
  n_dev = mesh.size

  @jax.jit
  def embed(params, images, texts):
    return teacher_embeddings(teacher, params, {"image": images, "teacher_text": texts})

  def run(images, texts):
    """Embeddings of any number of images and texts, in batches padded to the devices."""
    n = max(len(images), len(texts))
    step = -(-batch_size // n_dev) * n_dev
    out_i, out_t = [], []
    for lo in range(0, n, step):
      im, tx = images[lo:lo + step], texts[lo:lo + step]
      pad_i = step - len(im)
      pad_t = step - len(tx)
      im = np.concatenate([im, np.zeros((pad_i, size, size, 3), np.uint8)]) if len(im) else \
          np.zeros((step, size, size, 3), np.uint8)
      tx = np.concatenate([tx, np.zeros((pad_t, teacher.text_len), np.int32)]) if len(tx) else \
          np.zeros((step, teacher.text_len), np.int32)
      with partitioning.activate(mesh):
        ei, et = embed(teacher.params, jax.device_put(im, sharding), jax.device_put(tx, sharding))
      out_i.append(np.asarray(ei)[:step - pad_i])
      out_t.append(np.asarray(et)[:step - pad_t])
    return np.concatenate(out_i), np.concatenate(out_t)

  if out_dir.exists() and any(out_dir.iterdir()):
    raise UserError(f"--out '{out_dir}' is not empty: pick a new folder")
  out_dir.mkdir(parents=True, exist_ok=True)
  decode = transforms.DecodeRecord()
  from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
  total = manifest["splits"][split].get("num_records")
  bar = tqdm(total=total, desc=f"teacher {split}", unit="rec", disable=not progress)
  index = 0
  for path in paths:
    reader = ArrayRecordReader(str(path))
    raws = reader.read_all()
    reader.close()
    writer = ArrayRecordWriter(str(out_dir / path.name), "group_size:1")
    for lo in range(0, len(raws), batch_size):
      chunk = raws[lo:lo + batch_size]
      images, texts, plan = [], [], []
      for raw in chunk:
        image, captions, record = decode.decode(raw)
        rng = np.random.default_rng([seed, index])
        record_views = sample_views(image.shape, views, rng, crop_scale, crop_ratio, flip)
        images += [apply_view(image, v, size) for v in record_views]
        texts += [tokenizer.encode(c) for c in captions]
        plan.append((record, record_views, len(captions)))
        index += 1
      image_emb, text_emb = run(np.stack(images), np.stack(texts))
      i = t = 0
      for record, record_views, n_captions in plan:
        record["teacher"] = {"views": record_views, "dim": int(image_emb.shape[1]),
                             "image_emb": image_emb[i:i + views].astype(np.float32).tobytes(),
                             "text_emb": text_emb[t:t + n_captions].astype(np.float32).tobytes()}
        i, t = i + views, t + n_captions
        writer.write(msgpack.packb(record))
        bar.update()
    writer.close()
  bar.close()
  # The other splits, the tokenizer and whatever else the folder holds, unchanged.
  for item in data_dir.iterdir():
    if item.name == sources.MANIFEST or (out_dir / item.name).exists():
      continue
    (shutil.copytree if item.is_dir() else shutil.copy2)(item, out_dir / item.name)
  entry = dict(manifest["splits"][split])
  entry["sha256"] = {p.name: sources.file_sha256(out_dir / p.name) for p in paths}
  manifest["splits"][split] = entry
  manifest["teacher"] = {"path": str(teacher_path), "split": split, "views": int(views),
                         "image_size": size, "dim": int(image_emb.shape[1]),
                         "crop_scale": list(crop_scale), "crop_ratio": list(crop_ratio),
                         "flip": bool(flip)}
  (out_dir / sources.MANIFEST).write_text(json.dumps(manifest, indent=1))
  return out_dir
