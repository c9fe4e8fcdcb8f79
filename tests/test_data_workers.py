"""Worker processes (grain mp_prefetch): the same batches as in-process, and exact resume."""

import json

import numpy as np

from jaxret.data import pipeline


def make(demo_dir, workers):
  # With random crops and flips: their rng must be the same in a worker process.
  return pipeline.train_iterator(demo_dir, batch_size=16, text_len=20, seed=5, process_index=0,
                                 process_count=1, workers=workers, image_size=48,
                                 augment=dict(crop_scale=(0.3, 1), crop_ratio=(0.5, 2), flip=True))


def test_workers_give_the_same_batches_and_resume_exactly(demo_dir):
  ref = make(demo_dir, 0)
  want = [next(ref) for _ in range(8)]
  it = make(demo_dir, 2)
  got = [next(it) for _ in range(4)]
  state = json.loads(json.dumps(it.get_state()))
  it.close()
  resumed = make(demo_dir, 2)
  resumed.set_state(state)
  got += [next(resumed) for _ in range(4)]
  resumed.close()
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g["image"], w["image"])
    np.testing.assert_array_equal(g["text"], w["text"])


def test_training_with_a_worker_process(tiny_config, tmp_path):
  from jaxret.train.loop import train
  cfg = tiny_config("softmax", "data.workers=1", "total_steps=3", "eval_every=0")
  train(cfg, str(tmp_path), progress=False)
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
  assert all(r["data/skipped"] == 0 for r in rows if "loss" in r)
