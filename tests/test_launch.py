"""The cluster launch scripts, run against fake `sbatch`, `srun`, `scontrol` and `gcloud`
(tests/fakes/) that record what they were asked to do; and `--local-device-ids` down to
`jax.distributed.initialize`. Every launch command the scripts' headers, the README and the
config docstrings show is run here as shown."""
import ast
import glob
import os
import re
import shlex
import subprocess
import time

import jax
import pytest

from jaxret import cli
from jaxret.errors import UserError
from jaxret.parallel import mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKES = os.path.join(ROOT, "tests", "fakes")
FAKE_VENV = os.path.join(FAKES, "venv")
SLURM = "launch/gpu_slurm.sbatch"
TPU = "launch/tpu_pod.sh"
REPO = "https://example.com/you/jaxret.git"


# ---- helpers ---------------------------------------------------------------------------------
def _env(tmp_path, **knobs):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "SRUN_", "FAKE_", "CUDA_VISIBLE"))
         and k not in ("VENV", "REPO", "REF", "PROJECT", "VERSION", "SPOT", "WATCH", "POLL",
                       "MAX_RESTARTS", "DATA_BUCKET", "MOUNT", "RUN", "MAX_REQUEUES")}
  env.update(PATH=FAKES + os.pathsep + env["PATH"], FAKE_LOG=str(tmp_path / "calls.log"),
             VENV=FAKE_VENV)
  env.update({k: str(v) for k, v in knobs.items()})
  return env


def _sh(command, env, cwd=ROOT):
  return subprocess.run(["bash", "-c", command], env=env, cwd=cwd, capture_output=True,
                        text=True, timeout=60)


def _calls(tmp_path):
  """The fakes' log, one argv list per call (the lines were written with printf %q)."""
  log = tmp_path / "calls.log"
  if not log.exists():
    return []
  decode = ('while IFS= read -r line; do eval "a=($line)"; printf "%s\\0" "${a[@]}"; '
            'printf "\\1\\0"; done < "$1"')
  out = subprocess.run(["bash", "-c", decode, "_", str(log)], capture_output=True, text=True,
                       check=True).stdout
  calls, cur = [], []
  for word in out.split("\0")[:-1]:
    if word == "\1":
      calls.append(cur)
      cur = []
    else:
      cur.append(word)
  return calls


def _named(calls, *prefix):
  return [c for c in calls if c[:len(prefix)] == list(prefix)]


def _join_continuations(text):
  return re.sub(r"\\\n\s*", " ", text)


def _header_commands(path, marker):
  """The commands a script's header comment shows (its lines indented by three spaces)."""
  header = []
  with open(os.path.join(ROOT, path)) as f:
    for line in f:
      if not line.startswith("#"):
        break
      header.append(line[1:])
  lines = _join_continuations("".join(header)).splitlines()
  return [ln.strip() for ln in lines
          if ln.startswith("   ") and not ln.strip().startswith("#") and marker in ln]


def _doc_commands():
  """Launch commands the README's bash blocks and the config docstrings show."""
  texts = []
  with open(os.path.join(ROOT, "README.md")) as f:
    texts += re.findall(r"```bash\n(.*?)```", f.read(), re.S)
  for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
    with open(path) as f:
      texts.append(ast.get_docstring(ast.parse(f.read())) or "")
  commands = []
  for text in texts:
    for line in _join_continuations(text).splitlines():
      line = line.strip()
      if not line.startswith("#") and (TPU in line or SLURM in line):
        commands.append(line)
  return commands


def _jaxret_args(command, script):
  """The jaxret arguments of a shown launch command (what follows the script and its `--`)."""
  words = shlex.split(command)
  rest = words[words.index(script) + 1:]
  return rest[rest.index("--") + 1:] if "--" in rest else rest


def _ssh_commands(calls):
  return [c[c.index("--command") + 1] for c in _named(calls, "gcloud", "compute", "tpus",
                                                       "tpu-vm", "ssh")]


def _starts(calls):
  return [c for c in _ssh_commands(calls) if "nohup " in c]


def _started_argv(start):
  """The argv a TPU start command runs on each worker (decoding its inner `bash -c` word)."""
  word = re.search(r"nohup [a-z ]*bash -c (.*) > /dev/null 2>&1 < /dev/null &$", start).group(1)
  inner = subprocess.run(["bash", "-c", f'x={word}; printf %s "$x"'], capture_output=True,
                         text=True, check=True).stdout
  job = inner.split("; ")[1]
  return shlex.split(job[:job.index(">>")])


def test_scripts_are_valid_bash():
  for script in (SLURM, TPU, "launch/local_multihost.sh"):
    subprocess.run(["bash", "-n", os.path.join(ROOT, script)], check=True)


def test_every_shown_command_is_collected():
  assert len(_header_commands(SLURM, "sbatch ")) == 3
  assert len(_header_commands(TPU, TPU)) == 2
  docs = _doc_commands()
  assert sum(TPU in c for c in docs) == 3 and sum(SLURM in c for c in docs) == 2


# ---- SLURM -----------------------------------------------------------------------------------
@pytest.mark.parametrize("command", _header_commands(SLURM, "sbatch "))
def test_slurm_header_commands(command, tmp_path):
  r = _sh(command, _env(tmp_path))
  assert r.returncode == 0, r.stderr
  calls = _calls(tmp_path)
  (sbatch,) = _named(calls, "sbatch")
  for directive in ("--signal=USR1@300", "--requeue", "--open-mode=append",
                    "--ntasks-per-node=8", "--gpus-per-node=8"):
    assert directive in sbatch
  (srun,) = _named(calls, "srun")
  (env,) = _named(calls, "srun-env")
  assert "SRUN_CPUS_PER_TASK=12" in env  # from #SBATCH --cpus-per-task=12
  (jaxret,) = _named(calls, "jaxret")
  args = _jaxret_args(command, SLURM)
  jaxret_bin = os.path.join(FAKE_VENV, "bin", "jaxret")
  if args[0] != "train":  # run once as one task, nothing added
    assert srun == ["srun", "--nodes=1", "--ntasks=1", jaxret_bin, *args]
    assert "not requeued" in r.stdout
  elif "--ntasks-per-node=1" in command:  # one process per node owns all its GPUs
    assert srun == ["srun", "--kill-on-bad-exit=1", jaxret_bin, *args, "--distributed",
                    "--local-device-ids", "all"]
    assert "4 nodes, 4 processes (1 per node)" in r.stdout
  else:  # one process per GPU: JAX's SLURM_LOCALID choice stands
    assert srun == ["srun", "--kill-on-bad-exit=1", jaxret_bin, *args, "--distributed"]
    assert "4 nodes, 32 processes (8 per node)" in r.stdout
  assert jaxret == ["jaxret", *srun[srun.index(jaxret_bin) + 1:]]
  assert not _named(calls, "scontrol")


TRAIN = "sbatch --nodes=2 launch/gpu_slurm.sbatch train --config configs/clip.py:b16 --workdir /w"


@pytest.mark.parametrize("status", [0, 1, 143])
def test_slurm_requeues_only_after_status_143(status, tmp_path):
  r = _sh(TRAIN, _env(tmp_path, FAKE_JAXRET_EXIT=status, FAKE_SLURM_JOB_ID=777))
  assert r.returncode == status
  requeues = _named(_calls(tmp_path), "scontrol")
  assert requeues == ([["scontrol", "requeue", "777"]] if status == 143 else [])
  if status == 143:
    assert "requeueing job 777" in r.stdout


def test_slurm_does_not_requeue_when_slurm_ends_the_job(tmp_path):
  """scancel, preemption or the hard time limit also SIGTERM the batch shell: no requeue."""
  r = _sh(TRAIN, _env(tmp_path, FAKE_JAXRET_EXIT=143, FAKE_SRUN_TERM_BATCH=1))
  assert r.returncode == 143
  assert "because SLURM ended the job" in r.stdout
  assert not _named(_calls(tmp_path), "scontrol")


def test_slurm_requeues_at_most_max_requeues_times(tmp_path):
  r = _sh(TRAIN, _env(tmp_path, FAKE_JAXRET_EXIT=143, FAKE_SLURM_RESTART_COUNT=19))
  assert "start 20" in r.stdout and len(_named(_calls(tmp_path), "scontrol")) == 1
  (tmp_path / "calls.log").unlink()
  r = _sh(TRAIN, _env(tmp_path, FAKE_JAXRET_EXIT=143, FAKE_SLURM_RESTART_COUNT=20))
  assert r.returncode == 143 and "MAX_REQUEUES=20" in r.stdout
  assert not _named(_calls(tmp_path), "scontrol")


def test_slurm_other_commands_are_not_requeued(tmp_path):
  r = _sh("sbatch --nodes=1 launch/gpu_slurm.sbatch export --workdir /w --out /m",
          _env(tmp_path, FAKE_JAXRET_EXIT=143))
  assert r.returncode == 143
  calls = _calls(tmp_path)
  assert _named(calls, "jaxret") == [["jaxret", "export", "--workdir", "/w", "--out", "/m"]]
  assert not _named(calls, "scontrol")


def test_slurm_without_arguments_prints_usage(tmp_path):
  r = _sh("sbatch launch/gpu_slurm.sbatch", _env(tmp_path))
  assert r.returncode == 2 and "usage:" in r.stderr and not _named(_calls(tmp_path), "srun")


# ---- --local-device-ids ----------------------------------------------------------------------
@pytest.fixture
def initialize_calls(monkeypatch):
  for var in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "CUDA_VISIBLE_DEVICES",
              "SLURM_GPUS_ON_NODE"):
    monkeypatch.delenv(var, raising=False)
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  return calls


def test_local_device_ids_reach_jax_distributed(initialize_calls, monkeypatch):
  mesh.initialize_distributed(auto=True)
  assert initialize_calls.pop() == {}  # JAX's own choice: one GPU per SLURM task
  monkeypatch.setenv("SLURM_GPUS_ON_NODE", "8")
  mesh.initialize_distributed(auto=True, local_device_ids="all")
  assert initialize_calls.pop() == {"local_device_ids": list(range(8))}
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")  # what CUDA shows wins: ids 0..3
  mesh.initialize_distributed(auto=True, local_device_ids="all")
  assert initialize_calls.pop() == {"local_device_ids": [0, 1, 2, 3]}
  monkeypatch.setenv("SLURM_NTASKS", "16")  # detected SLURM job, explicit ids
  mesh.initialize_distributed(local_device_ids="2,3")
  assert initialize_calls.pop() == {"local_device_ids": [2, 3]}
  mesh.initialize_distributed("10.0.0.1:1234", 2, 1, local_device_ids="0")
  assert initialize_calls.pop() == {"coordinator_address": "10.0.0.1:1234", "num_processes": 2,
                                    "process_id": 1, "local_device_ids": [0]}


@pytest.mark.parametrize("spec, env, message", [
    ("all", {}, "cannot count this node's GPUs"),
    ("all", {"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, "names no GPU"),
    ("0,x", {}, "give 'all' or distinct GPU indices"),
    ("1,1", {}, "give 'all' or distinct GPU indices"),
])
def test_bad_local_device_ids_are_one_line(initialize_calls, monkeypatch, spec, env, message):
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  with pytest.raises(UserError, match=message):
    mesh.initialize_distributed(auto=True, local_device_ids=spec)
  assert not initialize_calls


def test_local_device_ids_need_a_multi_process_job(initialize_calls, monkeypatch):
  monkeypatch.setenv("SLURM_GPUS_ON_NODE", "8")
  with pytest.raises(UserError, match="applies to a multi-process job"):
    mesh.initialize_distributed(local_device_ids="all")
  assert not initialize_calls


def test_cli_passes_local_device_ids(monkeypatch):
  seen = {}

  class Stop(Exception):
    pass

  def record(*args, **kwargs):
    seen.update(args=args, kwargs=kwargs)
    raise Stop

  monkeypatch.setattr(mesh, "initialize_distributed", record)
  with pytest.raises(Stop):
    cli.run(["train", "--config", "configs/demo.py", "--workdir", "w", "--distributed",
             "--local-device-ids", "all"])
  assert seen == {"args": (None, None, None),
                  "kwargs": {"auto": True, "local_device_ids": "all"}}


# ---- TPU -------------------------------------------------------------------------------------
def _tpu(tmp_path, args, **knobs):
  knobs.setdefault("REPO", REPO)
  return _sh(f"launch/tpu_pod.sh {args}", _env(tmp_path, **knobs))


@pytest.mark.parametrize("accelerator, image", [
    ("v4-32", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-8", "v2-alpha-tpuv5"), ("v6e-8", "v2-alpha-tpuv6e")])
def test_tpu_image_follows_the_accelerator_type(accelerator, image, tmp_path):
  r = _tpu(tmp_path, f"s z {accelerator} -- train --config c --workdir gs://b/w",
           FAKE_TPU_STATE="MISSING,READY")
  assert r.returncode == 0, r.stderr
  (create,) = _named(_calls(tmp_path), "gcloud", "compute", "tpus", "tpu-vm", "create")
  assert create[create.index("--version") + 1] == image
  assert create[create.index("--accelerator-type") + 1] == accelerator
  assert "--spot" not in create


def test_tpu_version_overrides_and_unknown_types_fail_clearly(tmp_path):
  r = _tpu(tmp_path, "s z v3-8 -- train --config c --workdir gs://b/w")
  assert r.returncode == 2 and "no TPU VM image known for accelerator type 'v3-8'" in r.stderr
  assert _calls(tmp_path) == []  # nothing created
  r = _tpu(tmp_path, "s z v3-8 -- train --config c --workdir gs://b/w",
           FAKE_TPU_STATE="MISSING,READY", VERSION="tpu-vm-base", SPOT=1)
  assert r.returncode == 0, r.stderr
  (create,) = _named(_calls(tmp_path), "gcloud", "compute", "tpus", "tpu-vm", "create")
  assert create[create.index("--version") + 1] == "tpu-vm-base" and "--spot" in create


def test_tpu_reuses_a_ready_slice_and_installs_python_311(tmp_path):
  r = _tpu(tmp_path, "s z v4-8 -- train --config c --workdir gs://b/w",
           FAKE_TPU_STATE="READY", REF="v1.2", PROJECT="proj")
  assert r.returncode == 0, r.stderr
  calls = _calls(tmp_path)
  assert [c[4] for c in _named(calls, "gcloud")] == ["describe", "ssh", "ssh"]  # install, start
  (describe,) = _named(calls, "gcloud", "compute", "tpus", "tpu-vm", "describe")
  assert "--format=value(state)" in describe and "proj" in describe
  install = _ssh_commands(calls)[0]
  assert "uv venv -q --seed --python 3.11 .venv" in install
  assert "curl -LsSf https://astral.sh/uv/install.sh | sh" in install
  assert f"git clone -q {REPO} jaxret" in install and "git checkout -q v1.2" in install
  assert ".venv/bin/pip install -q -c constraints.txt -e '.[tpu]'" in install
  assert "gcsfuse" not in " ".join(_ssh_commands(calls))  # no DATA_BUCKET, no mount


@pytest.mark.parametrize("states, deleted, waits", [
    ("PREEMPTED,READY", True, 0), ("TERMINATED,READY", True, 0), ("CREATING,READY", False, 1)])
def test_tpu_slice_state_before_reuse(states, deleted, waits, tmp_path):
  r = _tpu(tmp_path, "s z v4-8 -- train --config c --workdir gs://b/w", FAKE_TPU_STATE=states)
  assert r.returncode == 0, r.stderr
  calls = _calls(tmp_path)
  verbs = [c[4] for c in _named(calls, "gcloud")]
  if deleted:
    assert verbs[:4] == ["describe", "delete", "create", "describe"]
    assert "--quiet" in _named(calls, "gcloud", "compute", "tpus", "tpu-vm", "delete")[0]
  else:
    assert verbs[:2] == ["describe", "describe"] and "create" not in verbs
  assert _named(calls, "sleep") == [["sleep", "60"]] * waits
  assert len(_starts(calls)) == 1


def test_tpu_refuses_a_slice_in_another_state(tmp_path):
  r = _tpu(tmp_path, "s z v4-8 -- train --config c --workdir gs://b/w", FAKE_TPU_STATE="STOPPED")
  assert r.returncode == 1 and "slice s is STOPPED" in r.stderr
  assert not _ssh_commands(_calls(tmp_path))


def test_tpu_header_command_runs_detached_with_a_log_per_worker(tmp_path):
  """The first header command, then its start command run on a (local) worker: it returns while
  jaxret runs in its own session, which writes the worker's log and, at the end, its status."""
  command = _header_commands(TPU, TPU)[0]
  r = _sh(command, _env(tmp_path, FAKE_TPU_STATE="MISSING,READY"))
  assert r.returncode == 0, r.stderr
  calls = _calls(tmp_path)
  args = _jaxret_args(command, TPU)
  (start,) = _starts(calls)
  run = re.search(r"jaxret-logs/([\w.-]+)\.log", start).group(1)
  assert run.startswith("my-slice-")
  follow = [ln.strip() for ln in r.stdout.splitlines() if "tail -f" in ln]
  assert follow == [f"gcloud compute tpus tpu-vm ssh my-slice --zone us-central2-b --worker=all "
                    f"--command 'tail -f ~/jaxret-logs/{run}.log'"]
  # the printed follow command, as a user would paste it
  (tmp_path / "calls.log").unlink()
  assert _sh(follow[0], _env(tmp_path)).returncode == 0
  assert _ssh_commands(_calls(tmp_path)) == [f"tail -f ~/jaxret-logs/{run}.log"]

  # a worker: the start command from an ssh session that ends right after it
  home = tmp_path / "worker0"
  (home / "jaxret" / ".venv").mkdir(parents=True)
  os.symlink(os.path.join(FAKE_VENV, "bin"), home / "jaxret" / ".venv" / "bin")
  release = tmp_path / "release"
  worker = _env(tmp_path, HOME=home, FAKE_JAXRET_WAIT_FOR=release)
  (tmp_path / "calls.log").unlink()
  r = _sh(start, worker, cwd=home)
  assert r.returncode == 0, r.stderr
  logs = home / "jaxret-logs"
  for _ in range(100):  # the detached jaxret has started
    if [c for c in _calls(tmp_path) if c[0] == "jaxret-session"]:
      break
    time.sleep(0.1)
  assert not (logs / f"{run}.status").exists()  # still running after the session ended
  (jaxret,) = _named(_calls(tmp_path), "jaxret")
  assert jaxret == ["jaxret", *args, "--distributed"]
  (session,) = _named(_calls(tmp_path), "jaxret-session")
  assert int(session[1]) != os.getsid(0)  # setsid: not in the ssh session
  status_check = _sh(_status_command(tmp_path, run), worker, cwd=home)
  assert status_check.stdout.split() == ["jaxret-status:", "running"]
  again = _sh(start, worker, cwd=home)  # a second start on a busy worker is refused
  assert again.returncode == 1 and "already running" in again.stderr
  release.touch()
  for _ in range(200):
    if (logs / f"{run}.status").exists() and (logs / f"{run}.status").read_text():
      break
    time.sleep(0.1)
  assert (logs / f"{run}.status").read_text() == "0\n"
  assert f"fake jaxret: {' '.join(args)} --distributed" in (logs / f"{run}.log").read_text()
  status_check = _sh(_status_command(tmp_path, run), worker, cwd=home)
  assert status_check.stdout.split() == ["jaxret-status:", "0"]


def _status_command(tmp_path, run):
  """The watch loop's status check for `run`, as the script sends it (captured by a fake)."""
  log = tmp_path / "status.log"
  env = _env(tmp_path, FAKE_TPU_STATE="READY,READY,READY", FAKE_JOB_STATUS="0", RUN=run)
  env["FAKE_LOG"] = str(log)
  subprocess.run(["bash", "-c", "launch/tpu_pod.sh --watch s z v4-8 -- train --workdir gs://b/w"],
                 env={**env, "REPO": REPO}, cwd=ROOT, capture_output=True, check=True)
  sub = tmp_path / "status"
  sub.mkdir(exist_ok=True)
  os.replace(log, sub / "calls.log")
  return [c for c in _ssh_commands(_calls(sub)) if "jaxret-status:" in c][0]


def test_tpu_watch_header_command_recreates_after_preemption(tmp_path):
  """The --watch header command: the spot slice is preempted while jaxret runs; the script
  deletes and recreates it, reinstalls, remounts the bucket, restarts the same command, and
  stops when every worker reports status 0."""
  command = _header_commands(TPU, TPU)[1]
  assert "--watch" in command and "DATA_BUCKET=BUCKET" in command and "SPOT=1" in command
  r = _sh(command, _env(tmp_path, FAKE_TPU_STATE="READY,READY,PREEMPTED,PREEMPTED,READY,READY",
                        FAKE_JOB_STATUS="running,0"))
  assert r.returncode == 0, r.stderr
  assert "restart 1 of 10" in r.stdout and "jaxret finished on every worker" in r.stdout
  calls = _calls(tmp_path)
  steps = []
  for c in calls:
    if c[0] == "sleep":
      steps.append("sleep " + c[1])
    elif c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] and c[4] != "ssh":
      steps.append(c[4])
    elif c[0] == "gcloud":
      cmd = c[c.index("--command") + 1]
      steps.append("install" if "uv venv" in cmd else "mount" if "gcsfuse" in cmd
                   else "start" if "nohup " in cmd else "status")
  assert steps == ["describe", "install", "mount", "start",
                   "sleep 60", "describe", "status",
                   "sleep 60", "describe", "describe", "delete", "create", "describe",
                   "install", "mount", "start",
                   "sleep 60", "describe", "status"]
  (create,) = _named(calls, "gcloud", "compute", "tpus", "tpu-vm", "create")
  assert "--spot" in create and create[create.index("--version") + 1] == "v2-alpha-tpuv5-lite"
  starts = _starts(calls)
  assert starts[0] == starts[1]  # the same command (and log), which resumes from the workdir
  assert _started_argv(starts[0]) == [".venv/bin/jaxret", *_jaxret_args(command, TPU),
                                      "--distributed"]
  mount = [c for c in _ssh_commands(calls) if "gcsfuse" in c][0]
  assert "gcsfuse --implicit-dirs BUCKET /mnt/data" in mount
  assert "apt-get -q -y -o DPkg::Lock::Timeout=600 install gcsfuse" in mount


@pytest.mark.parametrize("statuses, code, starts, message", [
    ("running,1", 1, 1, "jaxret failed with status 1"),
    ("143", 1, 3, "restarted 2 times (MAX_RESTARTS): giving up"),
    ("lost,0", 0, 2, "restart 1 of 2"),
])
def test_tpu_watch_stops_on_failure_and_after_max_restarts(statuses, code, starts, message,
                                                          tmp_path):
  r = _tpu(tmp_path, "--watch s z v4-8 -- train --config c --workdir gs://b/w",
           FAKE_TPU_STATE="READY", FAKE_JOB_STATUS=statuses, MAX_RESTARTS=2)
  assert r.returncode == code
  assert message in r.stdout + r.stderr
  calls = _calls(tmp_path)
  assert len(_starts(calls)) == starts
  assert not _named(calls, "gcloud", "compute", "tpus", "tpu-vm", "create")


def test_tpu_watch_warns_about_a_workdir_on_the_workers_disks(tmp_path):
  r = _tpu(tmp_path, "--watch s z v4-8 -- train --config c --workdir runs/w",
           FAKE_TPU_STATE="READY", FAKE_JOB_STATUS="0")
  assert r.returncode == 0 and "does not keep: a restart would start over" in r.stderr


# ---- commands shown in the README and the config docstrings -----------------------------------
@pytest.mark.parametrize("command", _doc_commands())
def test_documented_launch_commands_run(command, tmp_path):
  r = _sh(command, _env(tmp_path, FAKE_TPU_STATE="MISSING,READY", FAKE_JOB_STATUS="0"))
  assert r.returncode == 0, r.stderr
  calls = _calls(tmp_path)
  if SLURM in command:
    (jaxret,) = _named(calls, "jaxret")
    assert jaxret[1:len(_jaxret_args(command, SLURM)) + 1] == _jaxret_args(command, SLURM)
  else:
    (start,) = _starts(calls)
    assert _started_argv(start) == [".venv/bin/jaxret", *_jaxret_args(command, TPU),
                                    "--distributed"]
