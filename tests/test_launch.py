"""The launchers in launch/: missing settings are named, dry runs print the right commands, the
JobSet manifest is well-formed, and local.sh really runs (and stops) several training processes."""

from __future__ import annotations

import functools
import http.server
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_train import config_file  # the training tests' tiny run settings

from grc_jax.data import demo_world

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ["tpu_pod.sh", "slurm.sbatch", "local.sh", "render_jobset.sh"]
TRAIN = re.compile(r"python3? -m grc_jax\.train --config=configs/tiny\.py")
# Settings the scripts read: cleared so that the caller's environment cannot satisfy a test.
SETTINGS = {
    "TPU_NAME",
    "ZONE",
    "PROJECT",
    "CONFIG",
    "ACCELERATOR_TYPE",
    "NUM_SLICES",
    "STAGES",
    "WORKDIR",
    "GIT_URL",
    "DRY_RUN",
    "ACCELERATOR",
    "IMAGE",
    "WORKDIR_CLAIM",
    "TRAIN_ARGS",
    "PYTHON",
    "PORT",
    "TIMEOUT",
    "REPO_DIR",
    "JAX_LOCAL_DEVICE_IDS",
    "MEGASCALE_COORDINATOR_ADDRESS",
    "MEGASCALE_NUM_SLICES",
    "MEGASCALE_SLICE_ID",
    "REMOTE_ENV",
    "DETACH",
    "NUM_PROCESSES",
    "SLURM_GPUS_ON_NODE",
    "JAX_PLATFORMS",
    "JAX_CPU_COLLECTIVES_IMPLEMENTATION",
    "XLA_FLAGS",
    "REMOTE_DIR",
    "LOG",
}
SETTINGS |= {k for k in os.environ if k.startswith("SLURM_")}
TPU = {
    "TPU_NAME": "grc-test",
    "ZONE": "us-east5-a",
    "PROJECT": "my-project",
    "CONFIG": "configs/tiny.py",
    "ACCELERATOR_TYPE": "v5p-32",
}
JOBSET = {"IMAGE": "example.com/grc:1", "CONFIG": "configs/tiny.py", "WORKDIR_CLAIM": "grc-runs"}


def script(name: str, *args: str, timeout: float = 30, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    return subprocess.run(
        ["bash", str(LAUNCH / name), *args],
        cwd=REPO,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("name", SCRIPTS)
def test_bash_syntax(name: str) -> None:
    result = subprocess.run(["bash", "-n", str(LAUNCH / name)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "name, env, missing",
    [
        *[
            ("tpu_pod.sh", {k: v for k, v in TPU.items() if k != gone}, gone)
            for gone in ("TPU_NAME", "ZONE", "PROJECT", "CONFIG")
        ],
        ("slurm.sbatch", {"DRY_RUN": "1"}, "CONFIG"),
        ("local.sh", {"DRY_RUN": "1"}, "CONFIG"),
        *[
            ("render_jobset.sh", {"ACCELERATOR": "tpu", **{k: v for k, v in JOBSET.items() if k != gone}}, gone)
            for gone in ("IMAGE", "CONFIG", "WORKDIR_CLAIM")
        ],
        ("render_jobset.sh", JOBSET, "ACCELERATOR"),
    ],
)
def test_a_missing_setting_is_named(name: str, env: dict[str, str], missing: str) -> None:
    result = script(name, **env)
    assert result.returncode != 0
    assert f"{missing} is not set" in result.stderr, result.stderr
    assert "+ " not in result.stdout  # nothing was run, or printed as if it would be


def test_tpu_pod_needs_an_accelerator_type_only_to_create() -> None:
    env = {k: v for k, v in TPU.items() if k != "ACCELERATOR_TYPE"}
    assert script("tpu_pod.sh", DRY_RUN="1", STAGES="train", **env).returncode == 0
    result = script("tpu_pod.sh", DRY_RUN="1", **env)
    assert result.returncode != 0 and "ACCELERATOR_TYPE is not set" in result.stderr


def test_tpu_pod_dry_run_prints_create_copy_install_and_train_on_all_workers() -> None:
    result = script("tpu_pod.sh", "--config.train.steps=3", DRY_RUN="1", WORKDIR="/mnt/runs/tiny", **TPU)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("+ ")]
    assert "gcloud compute tpus tpu-vm describe grc-test --zone=us-east5-a --project=my-project" in lines[0]
    assert "gcloud compute tpus tpu-vm create grc-test" in lines[1] and "--accelerator-type=v5p-32" in lines[1]
    assert "tpu-vm scp" in lines[2] and "--worker=all" in lines[2]
    assert all("tpu-vm ssh grc-test" in line and "--worker=all" in line for line in lines[3:])
    assert "pip install" in lines[4]
    train = lines[-1]
    assert TRAIN.search(train) and "--workdir=/mnt/runs/tiny --config.train.steps=3" in train, train


def _remote_commands(stdout: str) -> list[list[str]]:
    """The words of each command tpu_pod.sh would run on the workers (its ssh --command=...)."""
    words = [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ") and " ssh " in line]
    return [shlex.split(w.split("=", 1)[1]) for ws in words for w in ws if w.startswith("--command=")]


def test_tpu_pod_keeps_paths_with_spaces_whole_on_the_workers() -> None:
    env = {**TPU, "CONFIG": "configs/my tiny.py", "REMOTE_DIR": "my dir", "LOG": "my log.txt", "DETACH": "1"}
    result = script("tpu_pod.sh", DRY_RUN="1", STAGES="copy,install,train", WORKDIR="/mnt/my runs", **env)
    assert result.returncode == 0, result.stderr
    copy, install, train = _remote_commands(result.stdout)
    assert copy[:3] == ["mkdir", "-p", "my dir"] and copy[-5:-2] == ["-C", "my dir", "&&"]
    assert install[:2] == ["cd", "my dir"]
    assert train[:2] == ["cd", "my dir"]
    assert "--config=configs/my tiny.py" in train and "--workdir=/mnt/my runs" in train
    assert train[train.index(">") + 1] == "my log.txt"
    home = script("tpu_pod.sh", DRY_RUN="1", STAGES="install", **{**TPU, "REMOTE_DIR": "~/runs dir"})
    [line] = [line for line in home.stdout.splitlines() if line.startswith("+ ") and " ssh " in line]
    [command] = [w.split("=", 1)[1] for w in shlex.split(line[2:]) if w.startswith("--command=")]
    assert command.startswith("cd ~/'runs dir' && ")  # ~ still expands on the workers


def test_tpu_pod_multislice_uses_a_queued_resource_and_every_slice() -> None:
    result = script("tpu_pod.sh", DRY_RUN="1", NUM_SLICES="2", STAGES="create,train,stop,delete", **TPU)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "queued-resources create grc-test" in out and "--node-count=2" in out and "--node-prefix=grc-test" in out
    for node in ("grc-test-0", "grc-test-1"):
        train = r"python3 -m grc_jax\.train --config=configs/tiny\.py"
        assert re.search(rf"tpu-vm ssh {node} .*--worker=all .*{train}", out)
    assert "pkill -TERM" in out and "queued-resources delete grc-test" in out


class _Metadata(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest's output clean
        pass


@pytest.fixture
def metadata_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A stand-in for the TPU VM metadata server: files under computeMetadata/v1/instance/attributes."""
    attributes = tmp_path / "computeMetadata" / "v1" / "instance" / "attributes"
    attributes.mkdir(parents=True)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Metadata, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", attributes
    finally:
        server.shutdown()


def test_tpu_worker_flags_come_from_the_metadata(metadata_server: tuple[str, Path]) -> None:
    address, attributes = metadata_server
    (attributes / "agent-worker-number").write_text("1")
    (attributes / "worker-network-endpoints").write_text("w0:0:10.0.0.2,w1:1:10.0.0.3,w2:2:10.0.0.4,w3:3:10.0.0.5")
    command = ["--on-worker", "python3", "-m", "grc_jax.train", "--config=configs/tiny.py"]
    single = script("tpu_pod.sh", *command, DRY_RUN="1", GCE_METADATA_IP=address)
    assert single.returncode == 0, single.stderr
    assert (
        "--config=configs/tiny.py --coordinator_address=10.0.0.2:8482 --num_processes=4 --process_id=1" in single.stdout
    ), single.stdout
    # Multislice: GCP's tpu-env names the coordinator and this worker's slice.
    (attributes / "tpu-env").write_text(
        "MEGASCALE_COORDINATOR_ADDRESS: '10.1.0.9:8080'\nMEGASCALE_NUM_SLICES: '2'\n"
        "MEGASCALE_SLICE_ID: '1'\nMEGASCALE_PORT: '8080'\n"
    )
    multi = script("tpu_pod.sh", *command, DRY_RUN="1", GCE_METADATA_IP=address)
    assert "--coordinator_address=10.1.0.9:8482 --num_processes=8 --process_id=5" in multi.stdout, multi.stdout


def test_slurm_dry_run_prints_srun_with_one_process_per_node() -> None:
    result = script(
        "slurm.sbatch", "--config.train.steps=3", DRY_RUN="1", CONFIG="configs/tiny.py", SLURM_GPUS_ON_NODE="4"
    )
    assert result.returncode == 0, result.stderr
    srun = next(line for line in result.stdout.splitlines() if line.startswith("+ srun "))
    assert "--ntasks-per-node=1" in srun and "--kill-on-bad-exit=1" in srun
    assert TRAIN.search(srun) and srun.endswith("--workdir=runs/tiny --config.train.steps=3"), srun
    assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3" in result.stdout  # every GPU of the node, not just SLURM_LOCALID's
    header = (LAUNCH / "slurm.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=1" in header and "#SBATCH --signal=TERM@" in header


def test_slurm_refuses_to_run_outside_slurm() -> None:
    result = script("slurm.sbatch", CONFIG="configs/tiny.py")
    assert result.returncode != 0 and "SLURM_JOB_ID is not set" in result.stderr


def _documents(text: str) -> list[tuple[str, str]]:
    """(kind, the document's own text) for each document; pyyaml checks the syntax where installed."""
    raw = [d for d in re.split(r"^---[ \t]*$", text, flags=re.M) if re.search(r"^kind:", d, flags=re.M)]
    try:
        import yaml
    except ImportError:  # pyyaml comes with transformers (the hf extra); without it, a rougher check
        assert "\t" not in text
        return [(re.search(r"^kind: *(\S+)", d, re.M).group(1), d) for d in raw]
    parsed = [d for d in yaml.safe_load_all(text) if d is not None]
    assert len(parsed) == len(raw)
    return [(d["kind"], r) for d, r in zip(parsed, raw)]


def test_jobset_template_parses_with_a_tpu_and_a_gpu_variant() -> None:
    docs = _documents((LAUNCH / "jobset.yaml").read_text())
    assert [kind for kind, _ in docs] == ["JobSet", "JobSet"]
    for (_, text), accelerator in zip(docs, ("tpu", "gpu")):
        assert f"grc-jax/accelerator: {accelerator}" in text
        assert "apiVersion: jobset.x-k8s.io/v1alpha2" in text
        assert "python -m grc_jax.train --config=__CONFIG__ --workdir=__WORKDIR__" in text


@pytest.mark.parametrize(
    "accelerator, extra, replicas, parallelism, resource",
    [
        ("tpu", {"NUM_SLICES": "2", "TPU_TOPOLOGY": "2x2x4"}, 2, 4, ("google.com/tpu", 4)),
        ("gpu", {"NUM_NODES": "3"}, 1, 3, ("nvidia.com/gpu", 8)),
    ],
)
def test_rendered_jobset_is_complete(
    accelerator: str, extra: dict[str, str], replicas: int, parallelism: int, resource: tuple[str, int]
) -> None:
    yaml = pytest.importorskip("yaml")
    result = script("render_jobset.sh", ACCELERATOR=accelerator, TRAIN_ARGS="--config.train.steps=3", **JOBSET, **extra)
    assert result.returncode == 0, result.stderr
    assert "__" not in result.stdout.replace("__init__", "")
    [doc] = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert doc["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and doc["kind"] == "JobSet"
    job = doc["spec"]["replicatedJobs"][0]
    assert job["replicas"] == replicas and job["template"]["spec"]["parallelism"] == parallelism
    container = job["template"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"][resource[0]] == resource[1]
    assert TRAIN.search(container["command"][-1]) and "--config.train.steps=3" in container["command"][-1]
    if accelerator == "gpu":
        assert "--num_processes=3" in container["command"][-1]


def test_jobset_keeps_paths_with_spaces_whole() -> None:
    yaml = pytest.importorskip("yaml")
    env = {**JOBSET, "CONFIG": "configs/my tiny.py", "WORKDIR": "/workdir/my runs"}
    result = script("render_jobset.sh", ACCELERATOR="tpu", **env)
    assert result.returncode == 0, result.stderr
    [doc] = [d for d in yaml.safe_load_all(result.stdout) if d]
    command = doc["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    [train] = [shlex.split(line) for line in command.splitlines() if "grc_jax.train" in line]
    assert "--config=configs/my tiny.py" in train and "--workdir=/workdir/my runs" in train
    bad = script("render_jobset.sh", ACCELERATOR="tpu", CHIPS_PER_HOST="0", **JOBSET)
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "render_jobset.sh: CHIPS_PER_HOST must be a positive whole number, got '0'"
    )


def test_local_dry_run_prints_one_command_per_process() -> None:
    result = script("local.sh", DRY_RUN="1", CONFIG="configs/tiny.py", NUM_PROCESSES="3", PORT="4321")
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stdout.splitlines() if line.startswith("+ ")]
    assert len(commands) == 3
    for i, command in enumerate(commands):
        assert TRAIN.search(command)
        # the environment local.sh exports, so the printed line runs as local.sh does
        assert command.startswith("+ env JAX_PLATFORMS=cpu JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo XLA_FLAGS=")
        assert "--xla_force_host_platform_device_count=1" in command
        assert f"--coordinator_address=127.0.0.1:4321 --num_processes=3 --process_id={i}" in command


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    demo_world.write_demo_world(str(out), seed=0, num_entities=40, num_heldout=8)
    return out


@pytest.mark.subprocess
def test_local_fails_fast_on_a_config_error(world: Path, tmp_path: Path) -> None:
    config = config_file(tmp_path, world)
    start = time.monotonic()
    result = script(
        "local.sh",
        "--config.train.stpes=3",
        timeout=90,
        CONFIG=str(config),
        WORKDIR=str(tmp_path / "run"),
        PYTHON=sys.executable,
        TIMEOUT="80",
    )
    assert result.returncode not in (0, 124), result.stdout[-2000:]
    assert "unknown key 'train.stpes'" in result.stdout and "exited with status" in result.stderr
    assert time.monotonic() - start < 60


FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for python: process 1 fails after a second; the others wait, process 0 ignoring SIGTERM.
for a; do case $a in --process_id=*) id=${a#--process_id=};; esac; done
echo $$ > "$PIDS/$id"
[ "$id" = 1 ] && [ -z "${ALL_WAIT:-}" ] && { sleep 1; exit 7; }
[ "$id" = 0 ] && trap '' TERM
exec sleep 120
"""


def _dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.subprocess
@pytest.mark.parametrize("case", ["one_fails", "timeout"])
def test_local_stops_every_process_when_one_fails_or_time_runs_out(tmp_path: Path, case: str) -> None:
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    (tmp_path / "pids").mkdir()
    env = {
        "CONFIG": "configs/tiny.py",
        "PYTHON": str(fake),
        "PORT": "1",
        "NUM_PROCESSES": "3",
        "KILL_GRACE": "1",
        "PIDS": str(tmp_path / "pids"),
        "WORKDIR": str(tmp_path / "run"),
    }
    if case == "timeout":
        env.update(ALL_WAIT="1", TIMEOUT="2")
    start = time.monotonic()
    result = script("local.sh", timeout=30, **env)
    assert result.returncode == (7 if case == "one_fails" else 124), result.stderr
    assert time.monotonic() - start < 15
    pids = {int(p.name): int(p.read_text()) for p in (tmp_path / "pids").iterdir()}
    assert sorted(pids) == [0, 1, 2]
    assert all(_dead(pid) for pid in pids.values()), pids  # process 0 too, which ignored SIGTERM
    for pid in pids.values():  # in case the assertion above failed, leave nothing behind
        if not _dead(pid):
            os.kill(pid, signal.SIGKILL)
