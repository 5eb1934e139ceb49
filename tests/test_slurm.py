"""On a real single-node SLURM (slurm-wlm + munge, started here as root in a temp folder, stopped by PID at the end):
a 3-task array of the embedded default (one seed per task); a requeue in the middle of a run (USR1 as SLURM's
--signal sends it) that resumes to the uninterrupted result, through the array script with 1 and 2 processes, the
multi-node script (srun + torchrun c10d, 1 node x 2 processes) and a submitit multirun submitted as one job array;
two processes equal to one; the eval script over the sweep; the report over the finished sweep. Skips with the
reason where no cluster starts. Also, without a cluster: the accelerate configs' keys reach accelerate's launcher
(the trainer under FSDP: test_fsdp.py)."""
import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
# every run here: seed from the sweep line, no dropout (masks depend on the process layout), 4 micro-batches/step
COMMON = ["wandb.mode=disabled", "model.epochs=1", "train.max_steps=40", "train.save_every=10", "+peft=qv",
          "++peft.lora_dropout=0", "model.per_device_batch_size=8", "++dataset.eval_samples=64"]
SMALL = ["--gpus-per-node=0", "--cpus-per-task=1", "--mem=1G"]  # the scripts ask for a GPU node; this one has none


class Cluster:
    """munged + slurmctld + slurmd in the foreground, as children of this process, with state in `root`."""

    def __init__(self, root: Path):
        self.root, self.procs = root, []
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
                    "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}

    def _spawn(self, name, cmd):
        log = open(self.root / f"{name}.out", "w")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                           start_new_session=True))

    def start(self):
        os.chmod(self.root, 0o755)
        munge = self.root / "munge"
        munge.mkdir(mode=0o755)  # munged refuses a socket folder others can write to
        key, sock = munge / "munge.key", munge / "munge.socket"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
        self._spawn("munged", ["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={sock}",
                               f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log",
                               f"--seed-file={munge}/munged.seed"])
        self._wait(sock.exists, 10, "munged did not create its socket")
        node = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
        ports = _free_ports(2)
        for d in ("state", "spool"):
            (self.root / d).mkdir()
        self.conf.write_text("\n".join([
            "ClusterName=peftlabtest", f"SlurmctldHost={socket.gethostname()}", "SlurmUser=root", "SlurmdUser=root",
            f"SlurmctldPort={ports[0]}", f"SlurmdPort={ports[1]}", "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={sock},cred_expire=5",  # a requeued job otherwise waits ~120 s for old credentials
            f"StateSaveLocation={self.root}/state", f"SlurmdSpoolDir={self.root}/spool",
            f"SlurmctldPidFile={self.root}/slurmctld.pid", f"SlurmdPidFile={self.root}/slurmd.pid",
            f"SlurmctldLogFile={self.root}/slurmctld.log", f"SlurmdLogFile={self.root}/slurmd.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core", "SchedulerParameters=sched_interval=1,bf_interval=1", "MpiDefault=none",
            "ReturnToService=2", "MinJobAge=600",
            f"{node} State=UNKNOWN", "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""]))
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
        self._wait(lambda: self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip() == "idle", 30,
                   "the node did not become idle")

    def _wait(self, ok, timeout, what):
        deadline = time.time() + timeout
        while not ok():
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead or time.time() > deadline:
                logs = "".join(f"\n--- {f.name}\n" + f.read_text()[-1500:] for f in sorted(self.root.glob("*.*"))
                               if f.suffix in (".out", ".log"))
                raise RuntimeError(f"{what} (exited: {dead}){logs}")
            time.sleep(0.1)

    def run(self, *cmd, check=True):
        r = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if check and r.returncode:
            raise RuntimeError(f"{' '.join(cmd)}: {r.stdout}{r.stderr}")
        return r

    def sbatch(self, *args, env=None) -> str:
        r = subprocess.run(["sbatch", "--parsable", f"--chdir={ROOT}", *args], env={**self.env, **(env or {})},
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip().split(";")[0]

    def jobs(self, job_id: str) -> list[dict]:
        """scontrol's record of the job (one per array task): JobState, ExitCode, Restarts, ..."""
        out = self.run("scontrol", "-o", "show", "job", job_id).stdout
        return [dict(kv.split("=", 1) for kv in line.split() if "=" in kv) for line in out.splitlines()]

    def wait(self, job_id: str, timeout=300) -> list[dict]:
        deadline = time.time() + timeout
        while any(j["JobState"] not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
                  for j in self.jobs(job_id)):
            assert time.time() < deadline, f"job {job_id} not done in {timeout} s: {self.jobs(job_id)}"
            time.sleep(0.3)
        return self.jobs(job_id)

    def stop(self):
        ids = self.run("squeue", "-h", "-o", "%A", check=False).stdout.split() if self.procs else []
        if ids:  # our own cluster's jobs: their slurmstepd would outlive slurmd
            self.run("scancel", *ids, check=False)
            deadline = time.time() + 15
            while self.run("squeue", "-h", check=False).stdout.strip() and time.time() < deadline:
                time.sleep(0.2)
        for p in reversed(self.procs):  # slurmd, slurmctld, munged: by PID
            p.terminate()
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    missing = [p for p in ("munged", "mungekey", "slurmctld", "slurmd", "sbatch") if not shutil.which(p)]
    if missing:
        pytest.skip(f"SLURM test cluster: {missing} not installed (run .ci/slurm_setup.sh as root)")
    if os.geteuid() != 0:
        pytest.skip("SLURM test cluster: slurmd must run as root (SlurmdUser=root)")
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
    except (RuntimeError, subprocess.SubprocessError, OSError) as e:
        c.stop()
        pytest.skip(f"SLURM test cluster did not start: {e}")
    yield c
    c.stop()


def adapter(run_dir) -> dict:
    return load_file(str(Path(run_dir) / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(a, b, atol):
    ta, tb = adapter(a), adapter(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=atol, msg=k)


def metrics(run_dir) -> list[dict]:
    return [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def sweep_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sweep") / "sweep.txt"
    r = subprocess.run([sys.executable, "-m", "peftlab.sweep", "seed=1,2,3", "-o", str(path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return path


@pytest.fixture(scope="session")
def array_runs(cluster, sweep_file, tmp_path_factory):
    """The 3-task array: one run per seed, single process."""
    out = tmp_path_factory.mktemp("array")
    t = time.time()
    job = cluster.sbatch("--array=0-2", *SMALL, f"--output={out}/%A_%a.log", str(ROOT / "slurm/array.sbatch"),
                         str(sweep_file), *COMMON, env={"RUN_ROOT": str(out / "runs")})
    tasks = cluster.wait(job)
    print(f"3-task array: {time.time() - t:.1f} s")
    logs = "".join(f.read_text() for f in out.glob("*.log"))
    assert [j["JobState"] for j in tasks] == ["COMPLETED"] * 3, logs
    return job, out / "runs"


def test_array_runs_one_seed_per_task(array_runs):
    job, runs = array_runs
    summaries = [json.loads((runs / str(k) / "summary.json").read_text()) for k in range(3)]
    assert [s["seed"] for s in summaries] == [1, 2, 3]
    assert all(s["steps"] == 40 and s["processes"] == 1 for s in summaries)
    assert len({s["final_train_loss"] for s in summaries}) == 3  # different seeds, different runs
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(runs / "1" / ".hydra" / "config.yaml")
    assert cfg.wandb.group == f"peftlab-{job}" and cfg.wandb.name == "seed=2" and cfg.resume is True


def usr1_after_step_8(cluster, job, run):
    """Signal the batch shell as --signal=B:USR1 would once the run has logged step 8; the task's final record."""
    deadline = time.time() + 240
    while not ((run / "metrics.jsonl").exists() and any(r.get("step", 0) >= 8 for r in metrics(run))):
        assert time.time() < deadline and cluster.jobs(job)[0]["JobState"] in ("PENDING", "RUNNING")
        time.sleep(0.05)
    cluster.run("scancel", "--signal=USR1", "--batch", f"{job}_0")
    return cluster.wait(job)


def test_requeue_in_the_middle_resumes_to_the_uninterrupted_result(cluster, array_runs, sweep_file, tmp_path):
    """USR1 to the batch shell (as --signal=B:USR1@300 sends it): checkpoint, scontrol requeue, resume, same end."""
    run = tmp_path / "runs" / "0"
    t = time.time()
    job = cluster.sbatch("--array=0", *SMALL, f"--output={tmp_path}/%A_%a.log", str(ROOT / "slurm/array.sbatch"),
                         str(sweep_file), *COMMON, env={"RUN_ROOT": str(tmp_path / "runs")})
    (task,) = usr1_after_step_8(cluster, job, run)
    log = next(tmp_path.glob("*.log")).read_text()
    print(f"requeued run: {time.time() - t:.1f} s")
    assert task["JobState"] == "COMPLETED" and task["Restarts"] == "1", log
    assert "USR1 received, forwarding" in log and "stop signal received; checkpoint saved at step" in log
    assert "and the job requeued" in log and "restart 1 on" in log
    stopped_at = int(log.split("checkpoint saved at step ")[1].split()[0])
    assert 8 <= stopped_at < 40
    assert [r["step"] for r in metrics(run) if "train/loss" in r] == list(range(1, 41))  # none lost or repeated
    full = array_runs[1] / "0"
    assert_same_adapter(run, full, atol=1e-6)
    assert metrics(run)[-1]["train/loss"] == pytest.approx(metrics(full)[-1]["train/loss"], rel=1e-6)


def test_two_processes_under_the_array_script_equal_one_through_a_requeue(cluster, array_runs, sweep_file, tmp_path):
    """accelerate launch over 2 CPU processes (gloo); USR1 in the middle reaches both trainers through the launcher."""
    run = tmp_path / "runs" / "0"
    job = cluster.sbatch("--array=0", "--gpus-per-node=0", "--cpus-per-task=2", "--mem=1G",
                         f"--output={tmp_path}/%A_%a.log", str(ROOT / "slurm/array.sbatch"), str(sweep_file), *COMMON,
                         env={"RUN_ROOT": str(tmp_path / "runs"), "NPROC": "2", "ACCELERATE_USE_CPU": "1"})
    (task,) = usr1_after_step_8(cluster, job, run)
    log = next(tmp_path.glob("*.log")).read_text()
    assert task["JobState"] == "COMPLETED" and task["Restarts"] == "1", log
    assert "2 process(es)" in log and "accelerate.commands.launch" in log and "and the job requeued" in log
    assert json.loads((run / "summary.json").read_text())["processes"] == 2
    assert [r["step"] for r in metrics(run) if "train/loss" in r] == list(range(1, 41))
    assert_same_adapter(run, array_runs[1] / "0", atol=1e-5)


def test_multinode_script_on_one_node_equals_one_process_through_a_requeue(cluster, array_runs, tmp_path):
    """srun + torchrun c10d rendezvous from the SLURM environment (here 1 node x 2 processes); USR1 to the job step
    (what --signal=USR1@300 sends) reaches the trainers past torchrun, which ignores it."""
    run = tmp_path / "run"
    job = cluster.sbatch("--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", "--mem=1G",
                         f"--output={tmp_path}/%j.log", str(ROOT / "slurm/multinode.sbatch"), "seed=1", *COMMON,
                         env={"RUN_DIR": str(run), "NPROC": "2", "ACCELERATE_USE_CPU": "1"})
    deadline = time.time() + 240
    while not ((run / "metrics.jsonl").exists() and any(r.get("step", 0) >= 8 for r in metrics(run))):
        assert time.time() < deadline and cluster.jobs(job)[0]["JobState"] in ("PENDING", "RUNNING")
        time.sleep(0.05)
    cluster.run("scancel", "--signal=USR1", job)  # to the job's steps, not the batch shell
    (j,) = cluster.wait(job)
    log = next(tmp_path.glob("*.log")).read_text()
    assert j["JobState"] == "COMPLETED" and j["Restarts"] == "1", log
    assert f"rendezvous {socket.gethostname()}:" in log and "and the job requeued" in log
    assert json.loads((run / "summary.json").read_text())["processes"] == 2
    assert [r["step"] for r in metrics(run) if "train/loss" in r] == list(range(1, 41))
    assert_same_adapter(run, array_runs[1] / "0", atol=1e-5)


def test_submitit_multirun_is_one_job_array_and_a_requeued_task_resumes(cluster, array_runs, tmp_path):
    """hydra/launcher=slurm: the sweep is one array; USR1 to task 0's step in the middle (what the config's
    --signal=USR1@300 sends) checkpoints, requeues and resumes it to the uninterrupted result."""
    sweep_dir = tmp_path / "multirun"
    cmd = [sys.executable, "run_exp.py", "-m", "hydra/launcher=slurm", "seed=1,2", "resume=true", *COMMON,
           f"hydra.sweep.dir={sweep_dir}", "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1",
           "hydra.launcher.mem_gb=1"]
    t = time.time()
    p = subprocess.Popen(cmd, cwd=ROOT, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        run0 = sweep_dir / "0"
        deadline = time.time() + 240
        while not ((run0 / "metrics.jsonl").exists() and any(r.get("step", 0) >= 8 for r in metrics(run0))):
            assert p.poll() is None and time.time() < deadline, p.stdout.read() if p.poll() is not None else ""
            time.sleep(0.05)
        array_job = cluster.run("squeue", "-h", "-o", "%F").stdout.split()[0]
        cluster.run("scancel", "--signal=USR1", f"{array_job}_0")
        out = p.communicate(timeout=300)[0]
    finally:
        p.kill()
    print(f"submitit multirun with a requeue: {time.time() - t:.1f} s")
    assert p.returncode == 0, out
    task_ids = sorted(d.name for d in (sweep_dir / ".submitit").iterdir() if "_" in d.name and d.is_dir())
    assert task_ids == [f"{array_job}_0", f"{array_job}_1"]  # one array, two tasks
    tasks = cluster.wait(array_job)  # submitit returns on the result files, SLURM may still be finishing
    assert [j["JobState"] for j in tasks] == ["COMPLETED"] * 2
    assert sorted(j["Restarts"] for j in tasks) == ["0", "1"]
    log0 = (sweep_dir / ".submitit" / task_ids[0] / f"{task_ids[0]}_0_log.out").read_text()
    assert "stop signal received; checkpoint saved at step" in log0 and "and the job requeued" in log0
    for job, seed in (("0", 1), ("1", 2)):
        assert json.loads((sweep_dir / job / "summary.json").read_text())["seed"] == seed
    assert [r["step"] for r in metrics(run0) if "train/loss" in r] == list(range(1, 41))
    assert_same_adapter(run0, array_runs[1] / "0", atol=1e-6)  # the same run as array task 0, uninterrupted


@pytest.fixture(scope="session")
def evaluated_sweep(cluster, array_runs, tmp_path_factory):
    """slurm/eval.sbatch as an array over the sweep's run folders 0 and 1 (2 torchrun processes each); run 2 stays
    unscored, as a report must tolerate."""
    out = tmp_path_factory.mktemp("eval")
    job = cluster.sbatch("--array=0-1", *SMALL, f"--output={out}/%A_%a.log", str(ROOT / "slurm/eval.sbatch"),
                         str(array_runs[1]), "--limit", "16", "--batch_size", "8", env={"NPROC": "2"})
    tasks = cluster.wait(job)
    logs = "".join(f.read_text() for f in out.glob("*.log"))
    assert [j["JobState"] for j in tasks] == ["COMPLETED"] * 2, logs
    return array_runs[1]


def test_eval_script_scores_each_run_of_the_sweep(evaluated_sweep):
    assert not (evaluated_sweep / "2" / "eval").exists()
    for k in range(2):
        res = json.loads((evaluated_sweep / str(k) / "eval" / "results.json").read_text())
        assert res["processes"] == 2 and res["n"] == 16 and res["run_dir"].endswith(f"/{k}")
        assert 0 <= res["accuracy_strict"] <= 1


def test_report_over_the_finished_sweep(evaluated_sweep, tmp_path):
    runs = evaluated_sweep
    r = subprocess.run([sys.executable, "-m", "peftlab.report", str(runs), "-o", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "groups.csv") as f:
        (group,) = list(csv.DictReader(f))  # the seeds are one group
    summaries = [json.loads((runs / str(k) / "summary.json").read_text()) for k in range(3)]
    losses = torch.tensor([s["final_eval_loss"] for s in summaries], dtype=torch.float64)
    acc = torch.tensor([json.loads((runs / str(k) / "eval/results.json").read_text())["accuracy_flexible"]
                        for k in range(2)], dtype=torch.float64)  # run 2 has none: left out of the mean
    assert group["n"] == "3" and group["seeds"] == "1 2 3" and group["method"] == "lora"
    assert float(group["final_eval_loss_mean"]) == pytest.approx(float(losses.mean()), rel=1e-12)
    assert float(group["final_eval_loss_std"]) == pytest.approx(float(losses.std()), rel=1e-9)
    assert float(group["gsm8k_flexible_mean"]) == pytest.approx(float(acc.mean()), rel=1e-12)
    assert float(group["trainable_params_mean"]) == summaries[0]["trainable_params"]
    assert (tmp_path / "loss_curves.png").exists() and "| lora | default | 3 |" in r.stdout


# ---- without a cluster -------------------------------------------------------------------------------------------
def test_accelerate_configs_reach_the_launcher():
    """The yaml keys are accelerate's own (a misspelt key would be dropped silently)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    def env_of(name):
        args = launch_command_parser().parse_args(["--config_file", str(ROOT / "conf/accelerate" / name),
                                                   "--num_processes", "4", "run_exp.py"])
        args = _validate_launch_command(args)[0]
        return args, prepare_multi_gpu_env(args)

    args, env = env_of("fsdp.yaml")
    assert args.use_fsdp and args.num_processes == 4
    assert {k: env[k] for k in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "FSDP_SHARDING_STRATEGY",
                                "FSDP_CPU_RAM_EFFICIENT_LOADING")} == {
        "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1", "FSDP_SHARDING_STRATEGY": "FULL_SHARD",
        "FSDP_CPU_RAM_EFFICIENT_LOADING": "false"}  # every rank loads whole weights (the inits need them)
    args, env = env_of("ddp.yaml")
    assert args.multi_gpu and not args.use_fsdp and "ACCELERATE_USE_FSDP" not in env
    assert args.main_process_port not in (0, 29500)  # port 0 became a free port: array tasks may share a node
