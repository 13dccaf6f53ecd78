"""pytest fixture for the offline conda TEST DOUBLE (see ``tests/conda/conda_double.py``).

Use it from a test module (or a conftest) with::

    from tests.conda.fixtures import conda_double  # noqa: F401  (registers the fixture)

    @pytest.mark.conda
    def test_something(conda_double, tmp_path):
        conda_double.reset_log()
        subprocess.run([... "snakemake", "--sdm", "conda", ...], env=conda_double.env, ...)
        assert ["env", "create"] == conda_double.calls()[-1][:2]

The fixture is session scoped: the channel (5 packages, well under a second)
and the package cache are built/shared once; the call log is shared too, so
call :meth:`CondaDouble.reset_log` at the start of a test that inspects it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from . import double_env
from .channel import LocalChannel, build_channel, explicit_pin_lines


@dataclass
class CondaDouble:
    #: environment for subprocesses (PATH with tests/conda/bin first, CONDA_DOUBLE_*)
    env: dict
    channel: LocalChannel
    #: JSON-lines log written by the double and by bin/activate
    log_path: Path
    #: CONDA_DOUBLE_ROOT: package cache, repodata cache, named envs, PATH shadow dirs
    state_dir: Path

    @property
    def channel_url(self) -> str:
        return self.channel.url

    def events(self) -> list[dict]:
        if not self.log_path.exists():
            return []
        return [
            json.loads(l) for l in self.log_path.read_text().splitlines() if l.strip()
        ]

    def calls(self) -> list[list[str]]:
        """argv (without the leading ``conda``) of every conda call since the last reset."""
        return [e["argv"] for e in self.events() if e["event"] == "call"]

    def failed_calls(self) -> list[tuple[list[str], int]]:
        return [
            (e["argv"], e["rc"])
            for e in self.events()
            if e["event"] == "exit" and e["rc"] != 0
        ]

    def activations(self) -> list[str]:
        """Env prefixes that ``bin/activate`` was sourced with since the last reset."""
        return [e["prefix"] for e in self.events() if e["event"] == "activate"]

    def reset_log(self) -> None:
        self.log_path.write_text("")

    def pin_file_text(
        self, packages: list[tuple[str, str]], platform: str = "linux-64"
    ) -> str:
        """``@EXPLICIT`` pin file for ``[(name, version), ...]`` from the channel's real files."""
        return explicit_pin_lines(self.channel, packages, platform)


@pytest.fixture(scope="session")
def conda_double(tmp_path_factory) -> CondaDouble:
    base = tmp_path_factory.mktemp("conda-double")
    channel = build_channel(base / "channel")
    log_path = base / "calls.jsonl"
    log_path.write_text("")
    state_dir = base / "state"
    env = double_env(channel_url=channel.url, state_dir=state_dir, log_path=log_path)
    yield CondaDouble(env=env, channel=channel, log_path=log_path, state_dir=state_dir)
