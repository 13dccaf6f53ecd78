"""One geometry, three readers: Slurm resources, Trainer arguments, the launch."""

import pytest

from mnistflow.geometry import Geometry, GeometryError, PartitionNodes


def test_single_device():
    g = Geometry(1, 1, "cpu")
    assert g.trainer_kwargs() == {"accelerator": "cpu", "num_nodes": 1, "devices": 1, "strategy": "auto"}
    assert g.slurm_resources() == {"nodes": 1}


def test_multinode_one_device_per_node_uses_ntasks():
    g = Geometry(2, 1, "cpu")
    assert g.trainer_kwargs() == {"accelerator": "cpu", "num_nodes": 2, "devices": 1, "strategy": "ddp"}
    # --nodes=2 --ntasks=2: Slurm must put one task on each node.
    assert g.slurm_resources() == {"nodes": 2, "mpi": "srun", "tasks": 2}


def test_several_devices_per_node_use_tasks_per_node_and_gres():
    g = Geometry(2, 4, "gpu")
    res = g.slurm_resources()
    assert res == {"nodes": 2, "mpi": "srun", "tasks_per_node": 4, "gres": "gpu:4", "tasks_per_gpu": 0}
    assert g.trainer_kwargs()["devices"] == 4 and g.world_size == 8
    assert g.srun_args(8) == [
        "srun", "--nodes=2", "--ntasks=8", "--ntasks-per-node=4", "--cpus-per-task=8", "--kill-on-bad-exit=1",
        "--job-name=mnistflow-train", "--gres=gpu:4",
    ]


def test_auto_asks_slurm_for_gpus_cpu_does_not():
    assert Geometry(1, 1, "auto").slurm_resources()["gres"] == "gpu:1"
    assert "gres" not in Geometry(1, 1, "cpu").slurm_resources()


@pytest.mark.parametrize("kwargs, message", [
    ({"nodes": 0}, "nodes: 0 is not an integer >= 1"),
    ({"devices": -1}, "devices: -1"),
    ({"accelerator": "tpu"}, "accelerator: 'tpu' is not one of"),
])
def test_impossible_geometry(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Geometry(**kwargs)


SLURM_OK = {"SLURM_NTASKS": "4", "SLURM_STEP_ID": "0", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "2"}


def test_slurm_allocation_that_matches():
    assert Geometry(2, 2, "cpu").check_environment(SLURM_OK)["launcher"] == "srun"


@pytest.mark.parametrize("env, needle", [
    ({**SLURM_OK, "SLURM_NNODES": "1"}, "SLURM_NNODES=1 but nodes=2"),
    ({**SLURM_OK, "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1"}, "SLURM_NTASKS=2 but nodes x devices=4"),
    ({**SLURM_OK, "SLURM_NTASKS_PER_NODE": "4(x1)"}, "SLURM_NTASKS_PER_NODE=4 but devices=2"),
])
def test_slurm_mismatch_says_requested_and_granted(env, needle):
    with pytest.raises(GeometryError) as err:
        Geometry(2, 2, "cpu").check_environment(env)
    assert needle in str(err.value)
    assert "the run asked for 2 node(s) x 2 device(s) = 4 process(es)" in str(err.value)


def test_gpu_run_without_visible_gpu_fails():
    env = {"SLURM_NTASKS": "1", "SLURM_STEP_ID": "0", "SLURM_NNODES": "1", "CUDA_VISIBLE_DEVICES": ""}
    with pytest.raises(GeometryError, match="no GPU is visible"):
        Geometry(1, 1, "gpu").check_environment(env)


def test_multinode_without_launcher_fails_fast():
    with pytest.raises(GeometryError, match="without a launcher"):
        Geometry(2, 1).check_environment({})


def test_local_launcher_world_size_checked():
    env = {"NODE_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MNISTFLOW_WORLD_SIZE": "3"}
    with pytest.raises(GeometryError, match="started 3 process"):
        Geometry(2, 1).check_environment(env)
    assert Geometry(3, 1).check_environment(env)["node_rank"] == 1


def test_local_gpu_layout():
    g = Geometry(2, 2, "auto")
    assert g.local_gpus(0, 4) == ([0, 1], False) and g.local_gpus(1, 4) == ([2, 3], False)
    # one GPU, two single-device nodes: both on GPU 0, shared (gloo, not NCCL)
    assert Geometry(2, 1).local_gpus(1, 1) == ([0], True)


SINFO = """\
g1|gpu:a100:4(S:0-1)|gpu*
g2|gpu:a100:4(S:0,1),mps:400|gpu*
g3|gpu:2|gpu*
c1|(null)|cpu
c2|(null)|cpu
"""


def test_partition_nodes_from_sinfo():
    assert PartitionNodes.from_sinfo(SINFO, "gpu").gpus == (4, 4, 2)
    assert PartitionNodes.from_sinfo(SINFO).name == "gpu"  # the default partition, marked *
    assert PartitionNodes.from_sinfo(SINFO, "cpu").gpus == (0, 0)
    with pytest.raises(GeometryError, match=r"no partition 'gpus' \(sinfo lists \['cpu', 'gpu'\]\)"):
        PartitionNodes.from_sinfo(SINFO, "gpus")


@pytest.mark.parametrize(
    "geometry, partition, problem",
    [
        (Geometry(2, 4, "gpu"), "gpu", None),
        (Geometry(3, 2, "auto"), "gpu", None),
        (Geometry(3, 4, "gpu"), "gpu", "3 node(s) with 4 GPU(s) each (`nodes`, `devices`), but Slurm partition 'gpu' "
                                       "has 2 such node(s) (3 node(s): 2 with 4 GPU(s), 1 with 2 GPU(s))"),
        (Geometry(1, 8, "gpu"), "gpu", "has 0 such node(s)"),
        # auto asks Slurm for GPUs: on a partition without any, the fix is accelerator: cpu
        (Geometry(1, 1, "auto"), "cpu", "it asks for GPUs (`accelerator: auto` asks Slurm for 1 GPU(s) a node), but Slurm "
                                        "partition 'cpu' has no GPUs (2 node(s): 2 with 0 GPU(s)); set the run's `accelerator: cpu`"),
        (Geometry(2, 2, "gpu"), "cpu", "has no GPUs"),
        (Geometry(2, 2, "cpu"), "cpu", None),
        (Geometry(3, 1, "cpu"), "cpu", "3 node(s) (`nodes`), but Slurm partition 'cpu' has 2 such node(s) "
                                       "(2 node(s): 2 with 0 GPU(s)); lower the run's `devices` or `nodes`"),
    ],
)
def test_partition_problem(geometry, partition, problem):
    found = geometry.partition_problem(PartitionNodes.from_sinfo(SINFO, partition))
    if problem is None:
        assert found is None
    else:
        assert problem in found
