"""``snakemake --sdm conda`` end to end, offline, against the conda TEST DOUBLE.

The double (tests/conda/conda_double.py) implements only the conda calls that
Snakemake 9.27.1 makes, over py-rattler and a tiny local channel built at test
time (tests/conda/channel.py).  These tests check how Snakemake drives conda
(which calls, env creation/reuse, pin files, activation per rule, rerun
triggers); they do not exercise a real conda-forge solve.

Snakemake runs with ``conda_double.env``: ``tests/conda/bin`` first on PATH and
the Slurm client tools hidden from PATH (with ``sinfo`` visible, the Slurm
executor plugin queries ``scontrol show config`` on every Snakemake start, up to
~10 s when no controller answers).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

# `tests.conda` must be importable however pytest is started (`python -m pytest`
# puts the repo root on sys.path, a bare `pytest` does not).
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from tests.conda.fixtures import (
    conda_double,
)  # noqa: E402,F401  (registers the fixture)

SNAKEFILE = """
rule all:
    input: "a.txt", "b.txt"

rule a:
    output: "a.txt"
    conda: "envs/a.yaml"
    shell: TOOL_REPORT

rule b:
    output: "b.txt"
    conda: "envs/b.yaml"
    shell: TOOL_REPORT
"""

# Written into the Snakefile as a plain string so both rules share the code.
TOOL_REPORT = r"""
echo "version=$(tinytool --version)" > {output}
echo "lib=$(cat "$CONDA_PREFIX/share/tinylib/VERSION")" >> {output}
echo "prefix=$CONDA_PREFIX" >> {output}
echo "tool_prefix=$(tinytool --prefix)" >> {output}
echo "which=$(command -v tinytool)" >> {output}
"""


def env_yaml(channel_url: str, *deps: str) -> str:
    return "channels:\n  - {}\ndependencies:\n{}".format(
        channel_url, "".join(f"  - {d}\n" for d in deps)
    )


def make_workflow(
    root: Path, channel_url: str, a_deps=("tinytool=1.0",), b_deps=("tinytool==2.0",)
) -> Path:
    wf = root / "wf"
    (wf / "envs").mkdir(parents=True)
    (wf / "Snakefile").write_text(f"TOOL_REPORT = {TOOL_REPORT!r}\n" + SNAKEFILE)
    (wf / "envs" / "a.yaml").write_text(env_yaml(channel_url, *a_deps))
    (wf / "envs" / "b.yaml").write_text(env_yaml(channel_url, *b_deps))
    return wf


def snakemake(
    cd, wf: Path, *args: str, check: bool = True
) -> subprocess.CompletedProcess:
    cmd = [
        "timeout",
        "-k",
        "5",
        "120",
        sys.executable,
        "-m",
        "snakemake",
        "--sdm",
        "conda",
        "--cores",
        "1",
        "--conda-prefix",
        str(wf.parent / "condaenvs"),
        *args,
    ]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=wf, env=cd.env, capture_output=True, text=True)
    elapsed = time.monotonic() - t0
    print(f"snakemake {' '.join(args)}: rc={proc.returncode} {elapsed:.2f}s")
    if check and proc.returncode != 0:
        pytest.fail(
            f"snakemake {args} failed (rc={proc.returncode}):\n"
            f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}\n"
            f"--- conda double calls\n{cd.calls()}"
        )
    return proc


def report(path: Path) -> dict:
    return dict(line.split("=", 1) for line in path.read_text().splitlines())


def creates(calls: list[list[str]]) -> list[list[str]]:
    """conda calls that create an environment (``env create`` or ``create``)."""
    return [c for c in calls if c[:2] == ["env", "create"] or c[:1] == ["create"]]


def arg(call: list[str], flag: str) -> str:
    return call[call.index(flag) + 1]


def env_dirs(condaenvs: Path) -> list[Path]:
    return sorted(p for p in condaenvs.iterdir() if p.is_dir())


PROBE_CALLS = [
    ["info", "--json"],
    ["--version"],
    ["config", "--get", "channel_priority", "--json"],
]
CLEAN_CALL = ["clean", "-y", "--tarballs"]


@pytest.mark.conda
def test_create_envs_only(conda_double, tmp_path):
    """(a) --conda-create-envs-only creates both envs through `conda env create`."""
    cd = conda_double
    cd.reset_log()
    wf = make_workflow(tmp_path, cd.channel_url)
    condaenvs = tmp_path / "condaenvs"

    snakemake(cd, wf, "--conda-create-envs-only")

    calls = cd.calls()
    assert cd.failed_calls() == []
    # Snakemake probes the installation first (info, version, channel priority) ...
    assert calls[:3] == PROBE_CALLS
    # ... then, per env file, one `env create` followed by `conda clean -y --tarballs`
    # (--conda-cleanup-pkgs defaults to `tarballs`), nothing else.
    made = creates(calls)
    assert len(made) == 2
    assert calls[3:] == [made[0], CLEAN_CALL, made[1], CLEAN_CALL]
    for call in made:
        assert call[:4] == ["env", "create", "--quiet", "--no-default-packages"]
        prefix = Path(arg(call, "--prefix"))
        assert prefix.parent == condaenvs
        # Snakemake copies the env file to <prefix>.yaml and passes that copy
        assert arg(call, "--file") == f"{prefix}.yaml"

    dirs = env_dirs(condaenvs)
    assert [str(d) for d in dirs] == sorted(arg(c, "--prefix") for c in made)
    versions = {}
    for d in dirs:
        assert (d / "conda-meta").is_dir() and (d / "bin" / "tinytool").is_file()
        versions[Path(f"{d}.yaml").read_text()] = (
            d / "share/tinylib/VERSION"
        ).read_text().strip(), subprocess.run(
            [d / "bin" / "tinytool", "--version"], capture_output=True, text=True
        ).stdout.strip()
    assert versions == {
        (wf / "envs/a.yaml").read_text(): ("1.0", "tinytool 1.0"),
        (wf / "envs/b.yaml").read_text(): ("1.0", "tinytool 2.0"),
    }
    # nothing ran
    assert not (wf / "a.txt").exists() and not (wf / "b.txt").exists()
    assert cd.activations() == []


@pytest.mark.conda
def test_rules_run_in_their_own_env(conda_double, tmp_path):
    """(b) each rule's shell runs with its own env activated."""
    cd = conda_double
    cd.reset_log()
    wf = make_workflow(tmp_path, cd.channel_url)
    condaenvs = tmp_path / "condaenvs"

    snakemake(cd, wf)

    a, b = report(wf / "a.txt"), report(wf / "b.txt")
    assert a["version"] == "tinytool 1.0" and a["lib"] == "1.0"
    assert b["version"] == "tinytool 2.0" and b["lib"] == "1.0"
    assert a["prefix"] != b["prefix"]
    for r in (a, b):
        prefix = Path(r["prefix"])
        assert prefix.parent == condaenvs
        assert r["tool_prefix"] == r["prefix"]
        assert r["which"] == f"{prefix}/bin/tinytool"
    assert sorted(cd.activations()) == sorted([a["prefix"], b["prefix"]])
    assert sorted(arg(c, "--prefix") for c in creates(cd.calls())) == sorted(
        [a["prefix"], b["prefix"]]
    )
    assert cd.failed_calls() == []


@pytest.mark.conda
def test_second_run_reuses_env(conda_double, tmp_path):
    """(c) rerunning a rule after deleting its output reuses the existing env."""
    cd = conda_double
    wf = make_workflow(tmp_path, cd.channel_url)
    snakemake(cd, wf)
    first = report(wf / "a.txt")
    b_mtime = (wf / "b.txt").stat().st_mtime_ns
    env_meta = Path(first["prefix"]) / "conda-meta"
    meta_before = sorted(p.name for p in env_meta.iterdir())

    (wf / "a.txt").unlink()
    cd.reset_log()
    proc = snakemake(cd, wf)

    calls = cd.calls()
    assert creates(calls) == [], calls
    assert calls == PROBE_CALLS  # a run with existing envs only probes conda
    assert report(wf / "a.txt") == first
    assert (wf / "b.txt").stat().st_mtime_ns == b_mtime  # b was not rerun
    assert cd.activations() == [first["prefix"]]
    assert sorted(p.name for p in env_meta.iterdir()) == meta_before
    assert "Creating conda environment" not in proc.stderr


@pytest.mark.conda
def test_editing_env_file_reruns_only_its_rule(conda_double, tmp_path):
    """(d) editing envs/b.yaml makes a dry run plan rule b but not rule a.

    Snakemake 9.27.1's default --rerun-triggers is all of them: mtime, params,
    input, software-env, code.  The software-env trigger compares the stored
    hash of the job's software stack (conda env file content, pin file,
    post-deploy script) with the current one.
    """
    cd = conda_double
    wf = make_workflow(tmp_path, cd.channel_url)
    snakemake(cd, wf)
    b_yaml = wf / "envs" / "b.yaml"
    b_yaml.write_text(b_yaml.read_text().replace("tinytool==2.0", "tinytool==3.0"))

    cd.reset_log()
    proc = snakemake(cd, wf, "--dry-run")

    planned = set(re.findall(r"^rule (\w+):", proc.stdout, re.MULTILINE))
    assert planned == {"b", "all"}, proc.stdout
    assert (
        "Software environment definition has changed since last execution"
        in proc.stdout
    )
    # the dry run announces the new env but creates nothing
    assert "Conda environment envs/b.yaml will be created." in proc.stderr + proc.stdout
    assert cd.calls() == PROBE_CALLS
    assert cd.activations() == []


@pytest.mark.conda
def test_pin_file_is_used(conda_double, tmp_path):
    """(e) envs/a.linux-64.pin.txt beside envs/a.yaml is installed instead of solving a.yaml."""
    cd = conda_double
    # a.yaml alone solves to the newest tinytool (3.0, with tinylib 2.0) ...
    wf = make_workflow(tmp_path, cd.channel_url, a_deps=("tinytool >=1.0",))
    control = subprocess.run(
        [
            "conda",
            "env",
            "create",
            "--quiet",
            "--file",
            str(wf / "envs/a.yaml"),
            "--prefix",
            str(tmp_path / "control"),
        ],
        env=cd.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert control.returncode == 0, control.stderr
    assert (tmp_path / "control/share/tinylib/VERSION").read_text() == "2.0\n"
    assert (
        subprocess.run(
            [tmp_path / "control/bin/tinytool", "--version"],
            capture_output=True,
            text=True,
        ).stdout
        == "tinytool 3.0\n"
    )
    # ... the pin file (URLs + md5 from the channel's repodata) says 1.0 / 1.0.
    pin = wf / "envs" / "a.linux-64.pin.txt"
    pin.write_text(cd.pin_file_text([("tinylib", "1.0"), ("tinytool", "1.0")]))
    assert "@EXPLICIT" in pin.read_text() and cd.channel_url in pin.read_text()

    cd.reset_log()
    proc = snakemake(cd, wf)

    a = report(wf / "a.txt")
    assert a["version"] == "tinytool 1.0" and a["lib"] == "1.0"
    made = creates(cd.calls())
    a_call = [c for c in made if arg(c, "--prefix") == a["prefix"]]
    assert len(a_call) == 1
    call = a_call[0]
    # `conda create` (not `conda env create`) with Snakemake's copy of the pin file
    assert call[0] == "create"
    assert arg(call, "--file") == f"{a['prefix']}.pin.txt"
    assert "--yes" in call
    assert Path(arg(call, "--file")).read_text() == pin.read_text()
    assert "Using pinnings from" in proc.stderr
    # b has no pin file: solved from b.yaml as before
    b_call = [c for c in made if c is not call]
    assert len(b_call) == 1 and b_call[0][:2] == ["env", "create"]
    assert cd.failed_calls() == []


@pytest.mark.conda
def test_unsupported_call_fails_loudly(conda_double):
    """The double refuses calls it does not implement (exit 2, naming the call)."""
    cd = conda_double
    cd.reset_log()
    proc = subprocess.run(
        ["conda", "run", "-p", "/nonexistent", "true"],
        env=cd.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "unsupported call `conda run -p /nonexistent true`" in proc.stderr
    assert cd.calls() == [["run", "-p", "/nonexistent", "true"]]
    assert cd.failed_calls() == [(["run", "-p", "/nonexistent", "true"], 2)]
