"""grain pipelines: per-process numpy batches for training and evaluation.

Training: one global order shared by every process,
  records -> seeded shuffle, reshuffled every epoch -> repeat forever -> decode
  [-> weighted mix of several such sources] -> random caption and crop -> tokenize
  -> batch(per-process batch) -> [p::P]
so global batch k is mini-batches kP..kP+P-1 of that order, process p holding the p-th. The
global batch is the same records whatever the number of processes (a 2-host run sees exactly
the batches of a 1-host run), and each process decodes only its own rows. Everything is a
MapDataset (index-addressable), so the iterator state is one integer and `set_state`
resumes exactly, also across epochs.

Evaluation (`eval_records`): whole records in file order -> decode -> center crop -> batch
(the last batch may be smaller), every caption kept untokenized for the evaluator; broken
records are left out.

Broken records (undecodable image, no usable caption) never stop training: element i of the
order is replaced by the next usable record (transforms.SkipBad), a rule of the index alone,
so the guarantees above hold; the iterator counts them (`skipped`) in its resumable state.

Elements are read by an in-process thread pool; `workers` > 0 adds grain worker processes
(mp_prefetch) after batching, each producing whole batches of the same order.
"""

import os
from pathlib import Path

import grain
import numpy as np

from jaxret.data import caption_swaps, sources, transforms
from jaxret.errors import UserError


def _read_options(batch_size):
  # A bounded look-ahead (in elements): enough to keep threads busy, not a 500-deep
  # buffer of full-size images as grain's default would hold.
  return grain.ReadOptions(num_threads=min(8, os.cpu_count() or 1),
                           prefetch_buffer_size=max(64, min(batch_size, 1024)))


def _process_shard(process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # Only needed for the defaults; keeps explicit-shard use jax-free.
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  return process_index, process_count


def _tokenize(data_dir, manifest, text_len):
  tokenize = transforms.Tokenize(Path(data_dir) / manifest["tokenizer"], text_len)
  tokenize.tokenizer  # Load now: a bad tokenizer file fails here, not in a reader thread.
  return tokenize


def _check_batch_size(batch_size):
  # (text_len is checked by the tokenizer, the one place that knows its layout.)
  if batch_size < 1:
    raise UserError(f"batch size {batch_size} must be at least 1: fix the batch size in the config")


def _mark_absl_flags_parsed():
  # grain's worker processes read absl flags; outside absl.app nobody parsed them.
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _same_tokenizer(data_dir, manifest, other_dir):
  """Mixture sources must tokenize alike: one model has one vocabulary."""
  other = sources.load_manifest(other_dir)
  mine = (Path(data_dir) / manifest["tokenizer"]).read_bytes()
  if (Path(other_dir) / other["tokenizer"]).read_bytes() != mine:
    raise UserError(f"mixture source '{other_dir}' has a different tokenizer from '{data_dir}': "
                    f"convert it with --tokenizer {Path(data_dir) / manifest['tokenizer']}")


def _source_order(data_dir, split, seed, keep_meta=False, keep_teacher=False):
  """One source's records: shuffled, reshuffled every epoch, repeated forever, broken
  records substituted (SkipBad); uint8 images at their stored size."""
  records = grain.MapDataset.source(sources.open_split(data_dir, split))
  ds = (records.seed(seed)
        .shuffle()
        .repeat(None)  # reseed_each_epoch (default): a new order every epoch.
        .map(transforms.DecodeRecord(skip_bad=True, keep_meta=keep_meta,
                                     keep_teacher=keep_teacher)))
  return transforms.SkipBad(ds), len(records)


def train_iterator(data_dir, *, batch_size, text_len, seed, image_size=None, augment=None,
                   mixture=None, process_index=None, process_count=None, split="train",
                   workers=0, hard_negatives=0, teacher_tokens=None, teacher_views=False):
  """Infinite, resumable iterator of this process's rows of each global training batch.

  Yields {"image": uint8 [batch_size,S,S,3], "text": int32 [batch_size,text_len]} with S =
  `image_size` (default: the data's stored size). `augment` = dict(crop_scale, crop_ratio,
  flip) takes a random resized crop per example (transforms.TrainView); None takes the
  evaluation view. `mixture` = [(dir, weight), ...] draws training records from those
  sources in proportion to the weights (each shuffled and repeated on its own), with the
  tokenizer of `data_dir`; by default the records are `data_dir`'s.
  `batch_size` is per process (the global batch is batch_size * process_count). Save and
  restore the position with `get_state()`/`set_state()` (or grain.checkpoint.CheckpointSave/
  Restore). `workers` > 0 decodes in that many worker processes (grain mp_prefetch, spawned:
  the calling script needs an `if __name__ == "__main__":` guard); batches and resume are
  the same as with 0. `hard_negatives` = k adds "neg_text" int32 [batch_size, k, text_len]:
  swapped variants of each example's caption (transforms.HardNegatives). Distillation:
  `teacher_tokens` = (tokenizer file, length) adds "teacher_text"; `teacher_views` takes the
  records' stored teacher views and adds "teacher_image_emb" and "teacher_text_emb" [d]
  (data/teacher_store.py) in place of the random crop.
  """
  _check_batch_size(batch_size)
  index, count = _process_shard(process_index, process_count)
  manifest = sources.load_manifest(data_dir)
  image_size = int(image_size or manifest["image_size"])
  if not mixture:
    ds, n = _source_order(data_dir, split, seed, keep_meta=hard_negatives > 0,
                          keep_teacher=teacher_views)
    if n < batch_size * count:
      raise UserError(f"split '{split}' of '{data_dir}' has {n} records, fewer than one global "
                      f"batch of {batch_size * count}; lower the batch size or use more data")
  else:
    parts = []
    for k, (source_dir, _) in enumerate(mixture):  # weights checked by sources.parse_mixture
      _same_tokenizer(data_dir, manifest, source_dir)
      parts.append(_source_order(source_dir, split, seed * 1009 + k, hard_negatives > 0,
                                 teacher_views)[0])
    ds = grain.MapDataset.mix(parts, [float(w) for _, w in mixture]).seed(seed)
  if teacher_views:
    ds = ds.random_map(transforms.TeacherView(image_size))
  else:
    ds = ds.random_map(transforms.TrainView(image_size, augment))
  if teacher_tokens:
    ds = ds.map(transforms.TokenizeTeacher(*teacher_tokens))
  if hard_negatives:
    ds = ds.random_map(transforms.HardNegatives(hard_negatives, manifest.get("classes")))
  ds = (ds.map(_tokenize(data_dir, manifest, text_len))
        .batch(batch_size, drop_remainder=True))[index::count]
  ds = ds.to_iter_dataset(_read_options(batch_size))
  if workers:
    _mark_absl_flags_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(workers),
                                                     per_worker_buffer_size=2))
  return CountSkipped(iter(ds))


SWAP_PROBE = 200  # records checked at start for data.hard_negatives


def check_hard_negatives(data_dir, split, k):
  """Refuses, before training, hard negatives on data whose first SWAP_PROBE captions have
  no swappable word (NegCLIP-style swaps need colours, counts, relations or objects)."""
  if not k:
    return
  manifest = sources.load_manifest(data_dir)
  records = sources.open_split(data_dir, split)
  for i in range(min(SWAP_PROBE, len(records))):
    record = sources.decode_record(records[i])
    for caption in transforms.clean_captions(record.get("captions", []))[:1]:
      variants = caption_swaps.swaps_for_record(record.get("meta"), caption, 1, 0,
                                                classes=manifest.get("classes"))
      if any(variants.values()):
        return
  raise UserError(f"data.hard_negatives={k}: none of the first {min(SWAP_PROBE, len(records))} "
                  f"captions of '{data_dir}' split '{split}' has a swappable word (a colour, "
                  f"count, spatial relation or common object; jaxret/data/caption_swaps.py); "
                  f"set data.hard_negatives=0")


class CountSkipped(grain.DatasetIterator):
  """Takes the per-row "skipped" marks out of each batch and keeps their running total
  (`skipped`, this process's rows) in the iterator state, so it survives resume."""

  def __init__(self, parent):
    super().__init__(parent)
    self.skipped = 0

  def __next__(self):
    batch = next(self._parent)
    self.skipped += int(batch.pop("skipped").sum())
    return batch

  def get_state(self):
    return {"parent": self._parent.get_state(), "skipped": self.skipped}

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self.skipped = int(state["skipped"])


def skipped_total(iterator):
  """Broken records skipped so far by every process (a collective when there are several)."""
  import jax
  if jax.process_count() == 1:
    return iterator.skipped
  from jax.experimental import multihost_utils
  return int(multihost_utils.process_allgather(np.int64(iterator.skipped)).sum())


class _WholeRecord(grain.transforms.Map):
  """Evaluation of several captions and of labels: the evaluation view of the image, every
  caption and the meta."""

  def __init__(self, image_size):
    self.decode = transforms.DecodeRecord(skip_bad=True, keep_meta=True)
    self.crop = transforms.CenterCrop(image_size)

  def map(self, element):
    return self.crop.map(self.decode.map(element))


def eval_records(data_dir, *, batch_size, split="test", max_records=None, image_size=None):
  """Finite, fixed-order batches of whole records (the first `max_records`, default all).

  Each pass yields {"image": uint8 [b,S,S,3] (resized shorter side, center crop; S =
  `image_size`, default the stored size), "captions": [[str, ...]] * b,
  "meta": [dict] * b}, the last batch possibly smaller; captions are not tokenized, so the
  evaluator can take several per image.
  """
  _check_batch_size(batch_size)
  manifest = sources.load_manifest(data_dir)
  ds = grain.MapDataset.source(sources.open_split(data_dir, split))
  if max_records is not None and max_records < len(ds):
    ds = ds[:max_records]
  ds = (ds.map(_WholeRecord(image_size or manifest["image_size"])).filter(transforms.DropBad())
        .to_iter_dataset(_read_options(batch_size)))
  return ds.batch(batch_size, drop_remainder=False, batch_fn=transforms.collate)
