"""The entry points end without Python's teardown: nothing written may be lost."""

import subprocess
import sys
import textwrap

from tests.conftest import REPO

SRC = str(REPO / "src")


def test_run_and_exit_keeps_the_status_and_everything_written(tmp_path):
    log_file = tmp_path / "step.log"
    child = textwrap.dedent(f"""
        import logging, sys
        from mnistflow.cli import run_and_exit

        def main():
            logging.basicConfig(level=logging.INFO, handlers=[logging.StreamHandler(), logging.FileHandler({str(log_file)!r})])
            logging.getLogger("step").info("last log line")
            sys.stdout.write("unterminated stdout")  # still in the buffer when main returns
            sys.stderr.write("unterminated stderr")
            return 3

        run_and_exit(main)
        print("never reached")
    """)
    p = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env={"PYTHONPATH": SRC}, timeout=60)
    assert p.returncode == 3
    assert p.stdout == "unterminated stdout"
    assert "last log line" in p.stderr and p.stderr.endswith("unterminated stderr")
    assert "last log line" in log_file.read_text()


def test_an_exception_takes_the_normal_exit(tmp_path):
    child = "from mnistflow.cli import run_and_exit\ndef main():\n    raise RuntimeError('boom')\nrun_and_exit(main)\n"
    p = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env={"PYTHONPATH": SRC}, timeout=60)
    assert p.returncode == 1 and "RuntimeError: boom" in p.stderr
