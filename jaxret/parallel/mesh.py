"""The device mesh: ('data', 'fsdp', 'tensor'), sized from the config's `mesh` section."""
import math
import os

import jax
from jax.sharding import AxisType, Mesh

from jaxret.errors import UserError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")   # the batch is split over both; FSDP is data parallel too


def mesh_shape(mesh_cfg, num_devices):
  """Resolve the one -1 (if any) and check the product equals the number of devices."""
  sizes = [int(mesh_cfg[a]) for a in AXES]
  desc = ",".join(f"{a}={s}" for a, s in zip(AXES, sizes))
  if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise UserError(f"mesh {desc} is invalid: sizes must be positive, with at most one -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise UserError(f"mesh {desc} does not fit {num_devices} devices: {num_devices} is not "
                      f"divisible by {known}; change --config.mesh.*")
    sizes[sizes.index(-1)] = num_devices // known
  elif known != num_devices:
    raise UserError(f"mesh {desc} needs {known} devices but {num_devices} are available; "
                    f"set the sizes so their product is {num_devices} (or use -1 for one axis)")
  return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_cfg, len(devices))
  # Auto axes: shardings are propagated by XLA from the in/out shardings and the logical
  # constraints, which is what flax's logical partitioning expects.
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def batch_parallelism(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def _in_detectable_cluster():
  """A multi-process allocation that jax.distributed can configure from its environment."""
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")  # a multi-host TPU slice


def _local_gpu_count(environ):
  """GPUs this process may use: CUDA_VISIBLE_DEVICES's entries, else SLURM_GPUS_ON_NODE."""
  visible = environ.get("CUDA_VISIBLE_DEVICES")
  if visible is not None:
    entries = [v for v in visible.split(",") if v.strip()]
    # "-1" hides every GPU; Slurm writes "NoDevFiles" when the job has none on this node.
    if not entries or entries[0].strip() in ("-1", "NoDevFiles"):
      raise UserError(f"--local-device-ids all: CUDA_VISIBLE_DEVICES={visible!r} names no GPU; "
                      "request GPUs for the job (e.g. sbatch --gpus-per-node=8)")
    return len(entries)
  on_node = environ.get("SLURM_GPUS_ON_NODE", "")
  if on_node.isdigit() and int(on_node) > 0:
    return int(on_node)
  raise UserError("--local-device-ids all: cannot count this node's GPUs (neither "
                  "CUDA_VISIBLE_DEVICES nor SLURM_GPUS_ON_NODE is set); pass the ids, "
                  "e.g. --local-device-ids 0,1,2,3")


def resolve_local_device_ids(spec, environ=None):
  """`--local-device-ids`: None, 'all' or '0,1,...' -> None or a list of GPU indices.

  The ids index the GPUs CUDA shows this process, i.e. after CUDA_VISIBLE_DEVICES, so 'all'
  is range(number of visible GPUs): the entries of CUDA_VISIBLE_DEVICES (which srun sets to the
  node's allocated GPUs), else SLURM_GPUS_ON_NODE. jax.distributed would otherwise give each
  SLURM task only the GPU numbered SLURM_LOCALID, which is right for one task per GPU and
  wrong for one task per node.
  """
  if spec is None:
    return None
  environ = os.environ if environ is None else environ
  if spec.strip() == "all":
    return list(range(_local_gpu_count(environ)))
  try:
    ids = [int(v) for v in spec.split(",")]
  except ValueError:
    ids = None
  if not ids or any(i < 0 for i in ids) or len(set(ids)) != len(ids):
    raise UserError(f"--local-device-ids {spec!r}: give 'all' or distinct GPU indices "
                    "separated by commas, e.g. 0,1,2,3")
  return ids


def initialize_distributed(coordinator=None, num_processes=None, process_id=None, *,
                           auto=False, local_device_ids=None):
  """Join the multi-process job, before anything else touches JAX devices.

  All three explicit arguments win; `auto` asks JAX to detect the cluster (TPU slice, SLURM,
  ...) itself; otherwise a SLURM job with several tasks or a TPU slice that names its workers
  is joined automatically; otherwise this is a single-process run and nothing happens.
  `local_device_ids` ('all', '0,1,...', see `resolve_local_device_ids`) sets the GPUs this
  process owns, instead of JAX's one GPU per SLURM task; it needs a multi-process job.
  """
  explicit = (coordinator, num_processes, process_id)
  kwargs = {}
  if local_device_ids is not None:
    kwargs["local_device_ids"] = resolve_local_device_ids(local_device_ids)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise UserError("--coordinator, --num-processes and --process-id go together: give all "
                      "three, or none to detect the cluster from the environment")
    if not 0 <= process_id < num_processes:
      raise UserError(f"--process-id {process_id} must be in [0, {num_processes})")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, **kwargs)
  elif auto or _in_detectable_cluster():
    jax.distributed.initialize(**kwargs)
  elif kwargs:
    raise UserError("--local-device-ids applies to a multi-process job: add --distributed (or "
                    "--coordinator/--num-processes/--process-id), or choose a single process's "
                    "GPUs with CUDA_VISIBLE_DEVICES")
