"""`jaxret train|eval|export|import-hf|embed|search|data`: parses arguments, then calls library code.

A user mistake (bad config key, path, mesh, ...) prints one line `jaxret: error: ...` and
exits with status 2; nothing already saved is touched.
"""
import argparse
import os
import sys

from jaxret.errors import PREEMPTED_STATUS, Preempted, UserError


def _parser():
  p = argparse.ArgumentParser(prog="jaxret", description=__doc__.splitlines()[0])
  sub = p.add_subparsers(dest="command", required=True)

  t = sub.add_parser("train", help="train (or resume) from a config file",
                     epilog="Override config keys with --config.KEY=VALUE, e.g. "
                            "--config.batch_size=64.")
  t.add_argument("--config", required=True, help="path/to/config.py[:arg]")
  t.add_argument("--workdir", required=True, help="checkpoints, metrics, eval results")
  t.add_argument("--no-progress", action="store_true", help="no progress bar")
  multi = t.add_argument_group(
      "multi-process", "join a multi-host job explicitly (SLURM and TPU pods are detected "
      "from the environment); see launch/")
  multi.add_argument("--coordinator", help="HOST:PORT of process 0")
  multi.add_argument("--num-processes", type=int)
  multi.add_argument("--process-id", type=int)
  multi.add_argument("--distributed", action="store_true",
                     help="let jax.distributed detect the cluster (TPU slice, SLURM, ...)")
  multi.add_argument("--local-device-ids", metavar="all|I,J,...",
                     help="the GPUs this process owns: 'all' (every GPU CUDA_VISIBLE_DEVICES, "
                          "else SLURM_GPUS_ON_NODE, gives it: one process per node) or indices; "
                          "default: JAX's choice (one GPU per SLURM task)")

  e = sub.add_parser("eval", help="evaluate a workdir's checkpoint with its saved config")
  e.add_argument("--workdir", required=True)
  e.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  e.add_argument("--tasks", default=None,
                 help="comma-separated evaluations instead of the config's eval.tasks "
                      "(retrieval, hubness, zeroshot, compositional)")
  e.add_argument("--data-dir", default=None,
                 help="the data set to evaluate on instead of the config's data.dir (e.g. when "
                      "the run was trained with a relative path)")

  pl = sub.add_parser("plot", help="(re)draw a workdir's PNG plots from eval.json and "
                                   "metrics.jsonl")
  pl.add_argument("--workdir", required=True)

  x = sub.add_parser("export", help="write a workdir's checkpoint as a transformers model folder")
  x.add_argument("--workdir", required=True)
  x.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  x.add_argument("--format", default="hf", choices=("hf",),
                 help="hf: transformers CLIPModel (CLIP towers) or SiglipModel (MAP head)")
  x.add_argument("--out", required=True, help="the model folder to write")
  x.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")

  h = sub.add_parser("import-hf", help="transformers CLIP/SigLIP folder -> jaxret parameters")
  h.add_argument("dir", help="a transformers CLIPModel or SiglipModel folder")
  h.add_argument("--out", required=True, help="folder for params/, model.json, tokenizer.json")
  h.add_argument("--tokenizer", help="order the token table by this tokenizer.json's ids "
                                     "(e.g. the fine-tuning data's); default: the folder's")
  h.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")

  i = sub.add_parser("inspect", help="plan a config on a mesh of any size without allocating",
                     epilog="Override config keys with --config.KEY=VALUE.")
  i.add_argument("--config", required=True, help="path/to/config.py[:arg]")
  i.add_argument("--mesh", default="", help="e.g. data=64,fsdp=4,tensor=1 (default: 1 device)")
  i.add_argument("--no-compile", action="store_true",
                 help="skip compiling one device's step (no activation figure; FLOPs are "
                      "counted from the traced step either way)")

  em = sub.add_parser("embed", help="embed images, captions or a data split into a store "
                      "(float16 shards; rerun to resume)")
  em.add_argument("--model", required=True, help="a workdir, `jaxret export` folder or "
                  "`jaxret import-hf` folder")
  em.add_argument("--step", type=int, default=None, help="a workdir's checkpoint (default: latest)")
  em.add_argument("--out", required=True, help="the store folder")
  em.add_argument("--images", help="an image folder (searched recursively)")
  em.add_argument("--captions", help="a text file, one caption a line")
  em.add_argument("--data", help="a data dir (`jaxret data demo|convert`): its --split's images")
  em.add_argument("--split", default="test")
  em.add_argument("--tokens", action="store_true",
                  help="also keep FILIP token embeddings (for search --rerank)")
  em.add_argument("--shard-size", type=int, default=10000, help="embeddings per shard file")
  em.add_argument("--batch-size", type=int, default=64)
  em.add_argument("--no-progress", action="store_true", help="no progress bar")

  se = sub.add_parser("search", help="the exact top-k of a store for text or image queries")
  se.add_argument("query", nargs="*",
                  help="the text(s) to search for; several share one model load")
  se.add_argument("--index", required=True, help="a store written by `jaxret embed`")
  se.add_argument("--image", help="query with this image instead of a text")
  se.add_argument("--k", type=int, default=10)
  se.add_argument("--model", help="default: the model that built the store")
  se.add_argument("--rerank", action="store_true",
                  help="rescore the top --candidates by FILIP late interaction (needs a store "
                       "embedded with --tokens)")
  se.add_argument("--candidates", type=int, default=100, help="for --rerank")
  se.add_argument("--show", help="write the query and its top-k images to this PNG (several "
                                 "queries: PATH-1.png, PATH-2.png, ... for PATH.png)")

  d = sub.add_parser("data", help="data tools")
  dsub = d.add_subparsers(dest="data_command", required=True)
  demo = dsub.add_parser("demo", help="build the embedded demo data set")
  demo.add_argument("--out", required=True)
  demo.add_argument("--num-train", type=int, default=40000)
  demo.add_argument("--num-test", type=int, default=1000)
  demo.add_argument("--source", default="auto", choices=("auto", "fashion-mnist", "digits"))
  demo.add_argument("--seed", type=int, default=0)
  tt = dsub.add_parser("train-tokenizer", help="train a CLIP-style byte-level BPE (or a "
                       "SentencePiece model) on captions")
  tt.add_argument("inputs", nargs="+", help="text files (one caption per line), or data dirs "
                  "(every caption of their train split)")
  tt.add_argument("--kind", default="bpe", choices=("bpe", "sentencepiece"),
                  help="bpe: tokenizer.json; sentencepiece: a unigram .model (SigLIP's kind)")
  tt.add_argument("--out", required=True, help="tokenizer.json (bpe; with --clip-files also "
                  "vocab.json + merges.txt next to it) or NAME.model (sentencepiece) to write")
  tt.add_argument("--vocab-size", type=int, default=None,
                  help="at most this many tokens (default: 49408 bpe, 32000 sentencepiece)")
  tt.add_argument("--min-frequency", type=int, default=2, help="bpe: rarest pair merged")
  tt.add_argument("--clip-files", action="store_true",
                  help="bpe: also write CLIP's vocab.json + merges.txt layout")
  te = dsub.add_parser("teacher", help="copy a data dir with a teacher's embeddings of several "
                       "augmented views of each image (and of each caption) for offline "
                       "distillation (loss.distill.source=offline)")
  te.add_argument("--teacher", required=True, help="a workdir, `jaxret export` or `jaxret "
                  "import-hf` folder")
  te.add_argument("--data", required=True, help="the converted data dir to copy")
  te.add_argument("--out", required=True, help="a new folder: the copy, with the embeddings")
  te.add_argument("--split", default="train", help="the split that gets them (default: train)")
  te.add_argument("--views", type=int, default=4, help="augmented views per image (default 4)")
  te.add_argument("--image-size", type=int, default=None, help="the student's model.image.size "
                  "(default: the data's stored size)")
  te.add_argument("--crop-scale", type=float, nargs=2, default=(0.9, 1.0),
                  help="random resized crop area range, as data.augment.crop_scale")
  te.add_argument("--flip", action="store_true", help="mirror half the views")
  te.add_argument("--seed", type=int, default=0)
  te.add_argument("--batch-size", type=int, default=64)
  te.add_argument("--no-progress", action="store_true")
  cv = dsub.add_parser(
      "convert", help="your image-text data to ArrayRecord shards + manifest: adds or replaces "
      "a split of --out, keeps the others (rerun to resume)",
      epilog="Caption layouts (--captions, detected from the content): JSONL or CSV rows of an "
      "image path and caption(s); COCO captions_<split>.json; Karpathy dataset_coco.json / "
      "dataset_flickr30k.json (every split in one go: train = Karpathy's train + restval, as "
      "usual, then val and test); Flickr30k results.csv ('image_name| comment_number| "
      "comment'). Later splits reuse the tokenizer of the first.")
  cv.add_argument("--out", required=True, help="the data dir (may already hold other splits)")
  cv.add_argument("--images", help="image folder the caption file's paths start from")
  cv.add_argument("--captions", help="caption file: JSONL, CSV, COCO captions_*.json, Karpathy "
                  "dataset_*.json or Flickr30k results.csv")
  cv.add_argument("--karpathy", metavar="DATASET_JSON",
                  help="Karpathy split file (dataset_coco.json, dataset_flickr30k.json): writes "
                  "train (train + restval), val and test, or just --split")
  cv.add_argument("--format", dest="caption_format", default="auto",
                  choices=("auto", "jsonl", "csv", "coco", "karpathy", "flickr30k"),
                  help="layout of --captions (default: detected)")
  cv.add_argument("--tars", nargs="+", help="webdataset tar shards (image + .txt/.json), read as "
                  "streams; .tar.gz too")
  cv.add_argument("--tfds", help="TFDS dataset name or prepared folder (ArrayRecord format)")
  cv.add_argument("--tfds-data-dir", help="TFDS data_dir holding --tfds NAME")
  cv.add_argument("--tfds-split", help="TFDS split to read (default: --split)")
  cv.add_argument("--image-key", help="TFDS image feature (default: the first image feature)")
  cv.add_argument("--caption-key", help="TFDS caption feature (default: the first text one)")
  cv.add_argument("--split", default=None, help="the split to write (default: train; for a "
                  "Karpathy file, all of its splits)")
  cv.add_argument("--image-size", type=int, default=224,
                  help="stored shorter side in pixels, aspect kept (training crops to "
                  "model.image.size); the same for every split of --out")
  cv.add_argument("--shard-size", type=int, default=1000,
                  help="images per shard (caption files, TFDS; a tar makes one shard)")
  cv.add_argument("--tokenizer", help="tokenizer file/folder to ship (default: the data dir's, "
                  "else train a BPE on the captions)")
  cv.add_argument("--vocab-size", type=int, default=49408, help="for the trained tokenizer")
  cv.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
  return p


def _split_overrides(argv):
  """Pull `--config.KEY=VALUE` items out of argv (argparse can't declare them)."""
  rest, overrides = [], []
  for a in argv:
    if a.startswith("--config."):
      overrides.append(a[len("--config."):])
    else:
      rest.append(a)
  return rest, overrides


def run(argv):
  argv, overrides = _split_overrides(argv)
  args = _parser().parse_args(argv)
  if overrides and args.command not in ("train", "inspect"):
    raise UserError(f"--config.{overrides[0]}: config overrides apply to `jaxret train` and "
                    "`jaxret inspect` only")

  if args.command == "train":
    from jaxret.parallel.mesh import initialize_distributed
    initialize_distributed(args.coordinator, args.num_processes, args.process_id,
                           auto=args.distributed, local_device_ids=args.local_device_ids)
    from jaxret.experiment import load_config
    from jaxret.train.loop import train
    cfg = load_config(args.config, overrides)
    train(cfg, args.workdir, progress=not args.no_progress)
  elif args.command == "inspect":
    from jaxret.experiment import load_config
    from jaxret.train import planner
    cfg = load_config(args.config, overrides)
    p = planner.plan(cfg, planner.parse_mesh(args.mesh), compile_activations=not args.no_compile)
    print(planner.format_plan(p, args.config))
  elif args.command == "eval":
    from jaxret.eval.run import evaluate_workdir
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    evaluate_workdir(args.workdir, step=args.step, tasks=tasks, data_dir=args.data_dir)
  elif args.command == "plot":
    from jaxret.eval.plots import plot_workdir
    for path in plot_workdir(args.workdir):
      print(f"wrote {path}")
  elif args.command == "export":
    from jaxret.export.hf import export_workdir
    export_workdir(args.workdir, args.out, step=args.step, overwrite=args.overwrite)
  elif args.command == "import-hf":
    from jaxret.export.hf_import import import_to
    import_to(args.dir, args.out, tokenizer_path=args.tokenizer, overwrite=args.overwrite)
  elif args.command == "embed":
    from jaxret.inference.embed import embed_to_store
    embed_to_store(args.model, args.out, images=args.images, captions=args.captions,
                   data=args.data, split=args.split, tokens=args.tokens,
                   shard_size=args.shard_size, step=args.step, batch_size=args.batch_size,
                   progress=not args.no_progress)
  elif args.command == "search":
    from jaxret.inference.search import search_queries
    search_queries(args.index, args.query, image=args.image, k=args.k, model_path=args.model,
                   rerank_=args.rerank, candidates=args.candidates, show=args.show)
  elif args.command == "data" and args.data_command == "demo":
    from jaxret.data.demo import build_demo
    build_demo(args.out, num_train=args.num_train, num_test=args.num_test, seed=args.seed,
               source=args.source)
  elif args.command == "data" and args.data_command == "train-tokenizer":
    from jaxret.data.tokenizer_training import train_tokenizer_cli
    train_tokenizer_cli(args.inputs, args.out, kind=args.kind, vocab_size=args.vocab_size,
                        min_frequency=args.min_frequency, clip_files=args.clip_files)
  elif args.command == "data" and args.data_command == "teacher":
    from jaxret.inference.teacher_data import write_teacher_data
    if args.views < 1:
      raise UserError(f"--views must be at least 1, got {args.views}")
    out = write_teacher_data(args.teacher, args.data, args.out, split=args.split,
                             views=args.views, seed=args.seed, image_size=args.image_size,
                             crop_scale=tuple(args.crop_scale), flip=args.flip,
                             batch_size=args.batch_size, progress=not args.no_progress)
    print(f"wrote {out}: the teacher's embeddings of {args.views} views per image of split "
          f"'{args.split}'")
  elif args.command == "data" and args.data_command == "convert":
    from jaxret.data.convert import convert
    convert(args.out, split=args.split, images=args.images, captions=args.captions,
            caption_format=args.caption_format, karpathy=args.karpathy, tars=args.tars,
            tfds=args.tfds, tfds_data_dir=args.tfds_data_dir, tfds_split=args.tfds_split,
            image_key=args.image_key, caption_key=args.caption_key, shard_size=args.shard_size,
            image_size=args.image_size, tokenizer=args.tokenizer, workers=args.workers,
            vocab_size=args.vocab_size)


def main(argv=None):
  if argv is None:  # a program, not a call from Python: huge pages for XLA:CPU's buffers
    from jaxret import hugepages
    hugepages.reexec_if_needed()
  try:
    run(sys.argv[1:] if argv is None else argv)
  except UserError as e:
    print(f"jaxret: error: {e}", file=sys.stderr)
    sys.exit(2)
  except FloatingPointError as e:
    print(f"jaxret: error: {e}", file=sys.stderr)
    sys.exit(1)
  except Preempted as e:
    print(f"jaxret: {e}", file=sys.stderr)
    sys.exit(PREEMPTED_STATUS)
  except KeyboardInterrupt:
    print("jaxret: interrupted; rerun the same command to resume from the last checkpoint",
          file=sys.stderr)
    sys.exit(130)


if __name__ == "__main__":
  main()
