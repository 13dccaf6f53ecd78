"""The local launcher: real node processes, failures propagate with the rank named."""

import sys

from mnistflow.geometry import Geometry
from mnistflow.launch import run_local

NODE = "import os,sys; r=int(os.environ['NODE_RANK']); print('node', r, os.environ['MASTER_ADDR'], os.environ['MASTER_PORT']); {body}"


def test_every_node_gets_a_rank_and_the_same_master(tmp_path, capfd):
    code = run_local(Geometry(3, 1), [sys.executable, "-c", NODE.format(body="")], env={})
    assert code == 0
    lines = sorted(l for l in capfd.readouterr().out.splitlines() if l.startswith("node"))
    assert [l.split()[1] for l in lines] == ["0", "1", "2"]
    assert len({tuple(l.split()[2:]) for l in lines}) == 1


def test_one_failing_node_stops_the_others(tmp_path, caplog):
    body = "sys.exit(3) if r == 1 else __import__('time').sleep(60)"
    code = run_local(Geometry(2, 1), [sys.executable, "-c", NODE.format(body=body)], env={}, grace_s=2)
    assert code == 3
    assert "node rank 1 exited with code 3" in caplog.text
