"""Two "nodes" on one host: two torchrun processes with the environment Kubeflow Trainer sets train one
job together, through the real service's reporting API.

Kubeflow Trainer runs `torchrun -m <entry>` in each node's pod and injects PET_NNODES, PET_NODE_RANK,
PET_NPROC_PER_NODE, PET_MASTER_ADDR and PET_MASTER_PORT; torchrun reads every PET_<NAME> as its own
`--<name>` (torch.distributed.argparse_util.env), so the command line names none of them and the
rendezvous is torchrun's default, static, with node 0 at the master address.

Stand-in, named as such: `TwoPods` plays the Trainer's two pods. It is a launcher that starts two local
torchrun processes (node ranks 0 and 1, PET_* as above, one rank each) instead of creating a TrainJob,
since no Kubernetes API server runs here. The job says `nodes: 1, processes_per_node: 2`: world size 2,
which admission accepts without a Kubernetes launcher (it refuses nodes > 1 unless one is configured),
and the worker takes its world size from torch.distributed's environment (WORLD_SIZE 2, RANK 0/1 set by
the two torchruns), never from the spec. The result is compared with the same spec run the usual way,
one `torchrun --standalone --nproc-per-node 2`: the same two ranks, so the same weights.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from harness import all_events, channel_to, make_image_folder, make_settings, spec, stub, wait_state

from service.api.gen.tuneserve.v1 import tuneserve_pb2 as pb
from service.app import Service, start_service
from service.jobs.launcher import Launcher
from service.jobs.local_launcher import WORKER_MODULE, LocalProcessLauncher
from service.jobs.torchrun_launcher import ByWorldSize, TorchrunLauncher
from service.records import Job
from service.training.checkpoints import load_checkpoint
from tests.ports import free_ports

pytestmark = pytest.mark.slow

TWO_NODES_JOB = "two-nodes"  # the job the stand-in pods run; every other DDP job goes to plain torchrun
TOLERANCE = 1e-6  # the DDP equivalence bound (tests/unit/test_ddp.py); the same ranks should give 0

# What each pod would run, started twice by one parent so the job is one process group to the service:
# it exits with the first node's failure, else 0. OMP_NUM_THREADS=1 as torchrun sets it by itself only
# for more than one process per node: the ranks then compute exactly as the one-node run's do.
PODS = f"""
import os, subprocess, sys
port, job_id = sys.argv[1], sys.argv[2]
command = [sys.executable, "-m", "torch.distributed.run", "--max-restarts", "0",
           "-m", "{WORKER_MODULE}", "--job-id", job_id]
nodes = [
    subprocess.Popen(command, env={{**os.environ, "PET_NNODES": "2", "PET_NODE_RANK": str(rank),
                                   "PET_NPROC_PER_NODE": "1", "PET_MASTER_ADDR": "127.0.0.1",
                                   "PET_MASTER_PORT": port, "OMP_NUM_THREADS": "1"}})
    for rank in (0, 1)
]
codes = [node.wait() for node in nodes]
sys.exit(next((code for code in codes if code), 0))
"""


class TwoPods(LocalProcessLauncher):
    """Stand-in for Kubeflow Trainer's two pods: two torchruns on this host, one node rank each."""

    def argv(self, job: Job) -> list[str]:
        return [sys.executable, "-c", PODS, str(free_ports(1)[0]), job.id]


class ByName(ByWorldSize):
    """The two-node job to the stand-in pods, other DDP jobs to torchrun --standalone."""

    def __init__(self, single: Launcher, ddp: Launcher, nodes: Launcher) -> None:
        super().__init__(single, ddp)
        self.nodes = nodes

    def launcher_for(self, job: Job) -> Launcher:
        return self.nodes if job.spec.name == TWO_NODES_JOB else super().launcher_for(job)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("ddp-nodes")
    settings = make_settings(root, report_heartbeat_s=0.2)
    make_image_folder(settings.data_root / "ds", per_class=16)  # 24 to train, 8 to validate
    launcher = ByName(LocalProcessLauncher(settings), TorchrunLauncher(settings), TwoPods(settings))
    running = start_service(settings, launcher=launcher)
    try:
        yield running
    finally:
        running.stop(drain=False)


@pytest.fixture(scope="module")
def channel(service: Service) -> Iterator[grpc.Channel]:
    with channel_to(service) as ch:
        yield ch


def test_two_torchrun_nodes_with_the_trainers_variables_train_one_job_like_one_node_of_two(
    service: Service, channel: grpc.Channel
) -> None:
    client = stub(channel)
    training = {"epochs": 2, "batch_size": 8, "seed": 3}
    resources = {"gpus": 0, "nodes": 1, "processes_per_node": 2}

    def run(name: str) -> pb.Job:
        job = client.CreateJob(pb.CreateJobRequest(spec=spec(name, training=training, resources=resources)))
        final = wait_state(client, job.id, (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED), timeout=300)
        assert final.state == pb.SUCCEEDED, final.error
        assert final.attempts == 1 and final.result.epochs_completed == 2
        return final

    one_node, two_nodes = run("one-node"), run(TWO_NODES_JOB)
    events = all_events(client, two_nodes.id)
    assert [e.kind for e in events].count("EPOCH") == 2  # rank 0 alone reports, once per epoch
    assert any(e.message.startswith("DDP over 2 processes (gloo)") for e in events)
    log = (service.settings.job_dir(two_nodes.id) / "worker.log").read_text()
    # each torchrun ran one rank: node 0 rank 0, node 1 rank 1, one group of two
    assert "rank 0 of 2 joined" in log and "rank 1 of 2 joined" in log
    assert Path(two_nodes.result.archive_path).is_file()

    expected = load_checkpoint(Path(one_node.result.checkpoint_dir) / "last.pt")["model"]
    got = load_checkpoint(Path(two_nodes.result.checkpoint_dir) / "last.pt")["model"]
    assert expected.keys() == got.keys()
    worst = max((expected[k].double() - got[k].double()).abs().max().item() for k in expected)
    assert worst <= TOLERANCE, f"largest parameter difference {worst:.3g}"
