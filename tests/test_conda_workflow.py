"""The real workflow under ``--sdm conda`` and ``--sdm env-modules``, offline.

Conda: a copy of the workflow whose envs/*.yaml are replaced by tiny env files (same file
names) over local channels built at test time: the conda test double's channel
(tests/conda/channel.py) and ``venv-python`` (tests/conda/venv_python.py), whose
``bin/python`` runs this venv's Python. So Snakemake creates every environment the
workflow declares, and each job runs inside its activated environment (with no venv on
PATH, only the environment's ``python`` can import torch), on a small slice of real MNIST
digits. Modules: a ``module`` test double (tests/envmodules).

Not exercised here, nor anywhere in CI: the conda-forge solve of the real envs/*.yaml.
Those are only checked statically (they parse, every package is pinned, channels are
explicit); see README, "Conda and modules".
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conda.fixtures import conda_double  # noqa: F401  (registers the fixture)
from tests.conda.venv_python import build_venv_python_channel
from tests.conftest import REPO, SNAKEMAKE, VENV_BIN, copy_workflow
from tests.envmodules import events as module_events
from tests.envmodules import module_double_env, write_modulefile

pytestmark = pytest.mark.conda

TORCH_RULES = {"environment", "download", "prepare", "train", "evaluate"}
SOFTWARE_CHANGED = "Software environment definition has changed since last execution"
RECORD = "results/env/train_env.json"
# A small slice of the loopback mirror's digits: every rule runs, in seconds.
EXPERIMENT = {
    "dataset": {"name": "mnist", "timeout_s": 5, "retries": 1, "val_size": 200, "train_limit": 1000},
    "train": {"model": "mlp", "lr": 0.003, "epochs": 1, "batch_size": 100, "accelerator": "cpu"},
    "runs": {"single": {"nodes": 1, "devices": 1}},
    "evaluate": {"batch_size": 1000},
}


# --------------------------------------------------------------------------- helpers


def path_without_venv(path: str) -> str:
    venv = VENV_BIN.resolve()
    return os.pathsep.join(p for p in path.split(os.pathsep) if p and Path(p).resolve() != venv)


@dataclass
class CondaWorkflow:
    """A copy of the workflow, run with the conda double and no venv on PATH."""

    root: Path
    condaenvs: Path
    env: dict
    configfile: str

    def path(self, relative: str) -> Path:
        return self.root / relative

    def snakemake(self, *args: str, sdm=("conda",), timeout: int = 300, check: bool = True, env: dict | None = None):
        sdm_args = ["--sdm", *sdm, "--conda-prefix", str(self.condaenvs)] if sdm else []
        cmd = [
            "timeout",
            "-k",
            "10",
            str(timeout),
            SNAKEMAKE,
            "--configfile",
            self.configfile,
            "--cores",
            "2",
            *sdm_args,
            *args,
        ]
        t0 = time.monotonic()
        proc = subprocess.run(cmd, cwd=self.root, env=env or self.env, capture_output=True, text=True)
        print(
            f"snakemake {' '.join(args)} (sdm {' '.join(sdm) or '-'}): rc={proc.returncode} {time.monotonic() - t0:.1f}s"
        )
        if check and proc.returncode != 0:
            logs = sorted(self.root.glob("results/logs/**/*.log"))
            pytest.fail(
                f"snakemake {args} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
                + "".join(f"\n--- {p.relative_to(self.root)}\n{p.read_text()[-2000:]}" for p in logs)
            )
        return proc

    def env_prefixes(self) -> dict[str, Path]:
        """Created environments by the env file they were made from (envs/<name>.yaml -> prefix)."""
        files = {p.read_text(): p.stem for p in self.path("envs").glob("*.yaml")}
        return {
            files[Path(f"{d}.yaml").read_text()]: d
            for d in sorted(self.condaenvs.iterdir())
            if d.is_dir() and Path(f"{d}.yaml").exists() and Path(f"{d}.yaml").read_text() in files
        }


def new_workflow(root: Path, cd, config: dict, experiment: dict | None = None) -> CondaWorkflow:
    copy_workflow(root)
    if experiment is not None:
        (root / "config/config.yaml").write_text(yaml.safe_dump(experiment))
    (root / "conda-test.yaml").write_text(yaml.safe_dump(config))
    env = {**cd.env, "PATH": path_without_venv(cd.env["PATH"])}
    return CondaWorkflow(root, root.parent / f"{root.name}-condaenvs", env, "conda-test.yaml")


def tiny_env(channels: list[str], *deps: str) -> str:
    return "# Test-only stand-in (tests/test_conda_workflow.py) for the real env file of this name.\n" + yaml.safe_dump(
        {"channels": channels, "dependencies": list(deps)}, sort_keys=False
    )


def write_tiny_envs(root: Path, channels: list[str]) -> None:
    """Replace every env file the workflow can declare; each solves to something else."""
    envs = root / "envs"
    assert {p.name for p in envs.glob("*.yaml")} == {"train.yaml", "train-cuda.yaml", "report.yaml"}
    (envs / "train.yaml").write_text(tiny_env(channels, "venv-python=1.0", "tinytool=1.0"))
    (envs / "train-cuda.yaml").write_text(tiny_env(channels, "venv-python=1.0", "tinytool=3.0"))
    (envs / "report.yaml").write_text(tiny_env(channels, "venv-python=1.0", "tinytool==2.0"))


def creates(calls: list[list[str]]) -> list[list[str]]:
    return [c for c in calls if c[:2] == ["env", "create"] or c[:1] == ["create"]]


def arg(call: list[str], flag: str) -> str:
    return call[call.index(flag) + 1]


def planned(dry_run_stdout: str) -> dict[str, str]:
    """rule -> reason, from a dry run's job listing."""
    jobs = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", dry_run_stdout):
        m = re.match(r"(?:local)?rule (\w+):", block)
        if m:
            reason = re.search(r"^\s+reason: (.*)$", block, re.MULTILINE)
            jobs[m.group(1)] = reason.group(1) if reason else ""
    return jobs


def dry_run_with_edit(wf: CondaWorkflow, relpath: str, old: str, new: str) -> str:
    """A dry run's stdout with `old` replaced by `new` in one file, which is restored after."""
    path = wf.path(relpath)
    original = path.read_text()
    assert old in original, f"{relpath} has no {old!r}"
    try:
        path.write_text(original.replace(old, new))
        return wf.snakemake("--dry-run").stdout
    finally:
        path.write_text(original)


def recorded_envs(wf: CondaWorkflow) -> dict[str, set[str]]:
    """rule -> the env files its outputs were made with, from Snakemake's metadata records.

    Each output's record in .snakemake/metadata/ keeps the content of the job's conda env
    file (base64, key "conda_env"); the software-env trigger compares its hash.
    """
    names = {p.read_text(): p.stem for p in wf.path("envs").glob("*.yaml")}
    rules: dict[str, set[str]] = {}
    for path in wf.path(".snakemake/metadata").iterdir():
        record = json.loads(path.read_text())
        content = base64.b64decode(record["conda_env"]).decode() if record.get("conda_env") else None
        rules.setdefault(record["rule"], set()).add(names.get(content, "?"))
    return rules


def conda(cd, *argv: str) -> str:
    """Run the conda double, as a user with channel access would run conda; its stdout."""
    proc = subprocess.run(["conda", *argv], env=cd.env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def tinytool_version(prefix: Path) -> str:
    return subprocess.run([prefix / "bin" / "tinytool", "--version"], capture_output=True, text=True).stdout.strip()


# --------------------------------------------------------------------------- the chain under --sdm conda


@dataclass
class Chain:
    wf: CondaWorkflow
    create_calls: list
    create_proc: subprocess.CompletedProcess
    run_events: list
    channels: list


@pytest.fixture(scope="module")
def chain(conda_double, mirror, tmp_path_factory) -> Chain:
    """Create the environments on their own (as on a login node), then run the whole chain."""
    cd = conda_double
    base = tmp_path_factory.mktemp("conda-chain")
    shim = build_venv_python_channel(base / "venv-python-channel")
    wf = new_workflow(base / "wf", cd, mirror.overlay(), EXPERIMENT)
    channels = [shim.url, cd.channel_url]
    write_tiny_envs(wf.root, channels)

    cd.reset_log()
    create_proc = wf.snakemake("--conda-create-envs-only")
    create_calls = cd.calls()
    assert not wf.path("results").exists(), "--conda-create-envs-only ran jobs"

    cd.reset_log()
    wf.snakemake()
    return Chain(wf, create_calls, create_proc, cd.events(), channels)


def test_create_envs_only_creates_every_declared_environment(chain):
    made = creates(chain.create_calls)
    # the torch environment (software.variant: cpu) and the report environment; not train-cuda
    prefixes = chain.wf.env_prefixes()
    assert sorted(prefixes) == ["report", "train"]
    assert sorted(arg(c, "--prefix") for c in made) == sorted(str(p) for p in prefixes.values())
    assert all(c[:2] == ["env", "create"] for c in made)  # no pin files: solved from the yaml
    assert tinytool_version(prefixes["train"]) == "tinytool 1.0"
    assert tinytool_version(prefixes["report"]) == "tinytool 2.0"
    for prefix in prefixes.values():
        assert (prefix / "bin/python").is_file() and (prefix / "conda-meta").is_dir()
    assert "Creating conda environment" in chain.create_proc.stdout + chain.create_proc.stderr


def test_each_rule_runs_inside_its_environment(chain):
    prefixes = chain.wf.env_prefixes()
    record = json.loads(chain.wf.path(RECORD).read_text())
    # The record was written inside the torch environment: its python, its CONDA_PREFIX.
    assert record["conda_prefix"] == str(prefixes["train"])
    assert record["packages"]["torch"] and record["packages"]["pytorch-lightning"]
    activations = [e["prefix"] for e in chain.run_events if e["event"] == "activate"]
    # environment, download, prepare, train, evaluate in the torch env; summarize in the report env
    assert activations.count(str(prefixes["train"])) == len(TORCH_RULES)
    assert activations.count(str(prefixes["report"])) == 1
    assert len(activations) == len(TORCH_RULES) + 1
    # and Snakemake recorded each rule's outputs with its env file (what the software-env trigger checks)
    assert recorded_envs(chain.wf) == {**{rule: {"train"} for rule in TORCH_RULES}, "summarize": {"report"}}
    assert creates([e["argv"] for e in chain.run_events if e["event"] == "call"]) == []
    assert chain.wf.path("results/summary/runs.md").read_text().count("| single |") == 1
    metrics = json.loads(chain.wf.path("results/runs/single/eval/metrics.json").read_text())
    assert 0.5 < metrics["accuracy"] <= 1.0


def test_second_run_reuses_the_environment(chain, conda_double):
    wf = chain.wf
    before = json.loads(wf.path(RECORD).read_text())
    conda_double.reset_log()
    wf.snakemake(RECORD, "--forcerun", "environment")
    assert creates(conda_double.calls()) == []
    assert conda_double.activations() == [before["conda_prefix"]]
    assert json.loads(wf.path(RECORD).read_text())["conda_prefix"] == before["conda_prefix"]
    assert "Nothing to be done" in wf.snakemake("--dry-run").stdout


def test_editing_report_env_reruns_only_summarize(chain):
    jobs = planned(dry_run_with_edit(chain.wf, "envs/report.yaml", "tinytool==2.0", "tinytool==3.0"))
    assert set(jobs) == {"summarize", "all"}, jobs
    assert SOFTWARE_CHANGED in jobs["summarize"]


def test_editing_train_env_reruns_the_torch_rules(chain):
    wf = chain.wf
    jobs = planned(dry_run_with_edit(wf, "envs/train.yaml", "tinytool=1.0", "tinytool=2.0"))
    # Every rule made with envs/train.yaml reruns (see recorded_envs); Snakemake names the
    # software change for the first jobs of the chain and "updated input" for those after them.
    assert set(jobs) == TORCH_RULES | {"summarize", "all"}, jobs
    assert {rule for rule, reason in jobs.items() if SOFTWARE_CHANGED in reason} == {"environment", "download"}
    assert all(SOFTWARE_CHANGED in jobs[r] or "Input files updated by another job" in jobs[r] for r in jobs)

    # the CUDA env file is not declared with software.variant: cpu, so editing it changes nothing
    assert "Nothing to be done" in dry_run_with_edit(wf, "envs/train-cuda.yaml", "tinytool=3.0", "tinytool=2.0")


def test_cuda_variant_declares_train_cuda(chain, conda_double):
    wf = chain.wf
    conda_double.reset_log()
    wf.snakemake("--conda-create-envs-only", "--config", "software={variant: cuda}")
    made = creates(conda_double.calls())
    assert len(made) == 1 and Path(arg(made[0], "--file")).read_text() == wf.path("envs/train-cuda.yaml").read_text()
    assert tinytool_version(wf.env_prefixes()["train-cuda"]) == "tinytool 3.0"
    jobs = planned(wf.snakemake("--dry-run", "--config", "software={variant: cuda}").stdout)
    assert set(jobs) == TORCH_RULES | {"summarize", "all"}
    assert {rule for rule, reason in jobs.items() if SOFTWARE_CHANGED in reason} == {"environment", "download"}


def test_pin_file_is_what_snakemake_installs(chain, conda_double, tmp_path):
    """envs/report.linux-64.pin.txt, made as README says (`conda list --explicit --md5`)."""
    wf, cd = chain.wf, conda_double
    # A solved environment that differs from what report.yaml solves to (tinytool 1.0, not 2.0).
    variant = tmp_path / "report-variant.yaml"
    variant.write_text(tiny_env(chain.channels, "venv-python=1.0", "tinytool=1.0"))
    solved = tmp_path / "solved"
    conda(cd, "env", "create", "--file", str(variant), "--prefix", str(solved))
    pin = wf.path("envs/report.linux-64.pin.txt")
    pin.write_text(conda(cd, "list", "--explicit", "--md5", "--prefix", str(solved)))
    assert "@EXPLICIT" in pin.read_text() and "tinytool-1.0-0.tar.bz2#" in pin.read_text()
    try:
        jobs = planned(wf.snakemake("--dry-run").stdout)
        assert set(jobs) == {"summarize", "all"} and SOFTWARE_CHANGED in jobs["summarize"]

        cd.reset_log()
        proc = wf.snakemake("--conda-create-envs-only")
        made = creates(cd.calls())
        assert len(made) == 1 and made[0][0] == "create"  # `conda create --file <pin>`, no solve
        assert Path(arg(made[0], "--file")).read_text() == pin.read_text()
        assert "Using pinnings from" in proc.stdout + proc.stderr
        assert tinytool_version(Path(arg(made[0], "--prefix"))) == "tinytool 1.0"
    finally:
        pin.unlink()
    assert "Nothing to be done" in wf.snakemake("--dry-run").stdout


# --------------------------------------------------------------------------- an existing, named environment


def test_named_existing_environment(conda_double, tmp_path):
    """software.conda_env: the tutorial's `conda activate torch-pl-env`, made by Snakemake's rules."""
    cd = conda_double
    shim = build_venv_python_channel(tmp_path / "venv-python-channel")
    name = f"torch-pl-env-{uuid.uuid4().hex[:8]}"
    env_file = tmp_path / "torch-pl-env.yaml"
    env_file.write_text(tiny_env([shim.url, cd.channel_url], "venv-python=1.0", "tinytool=2.0"))
    conda(cd, "env", "create", "--name", name, "--file", str(env_file))
    wf = new_workflow(tmp_path / "wf", cd, {"software": {"conda_env": name}})

    cd.reset_log()
    wf.snakemake("--conda-create-envs-only")
    assert creates(cd.calls()) == [] and not list(wf.condaenvs.glob("*/conda-meta"))
    wf.snakemake(RECORD)
    record = json.loads(wf.path(RECORD).read_text())
    assert record["conda_prefix"] == str(cd.state_dir / "envs" / name)
    assert cd.activations() == [record["conda_prefix"]]
    assert creates(cd.calls()) == []


# --------------------------------------------------------------------------- environment modules

MODULEFILE = """# modulefile for the module test double: a Python with torch on PATH
export PATH="{venv}:$PATH"
"""


@pytest.fixture
def modules_wf(conda_double, tmp_path):
    """A copy of the workflow, a MODULEPATH with pytorch/2.12-test, the module double exported."""

    def make(modules: list[str]) -> tuple[CondaWorkflow, Path]:
        modulepath = tmp_path / "modulefiles"
        write_modulefile(modulepath, "pytorch/2.12-test", MODULEFILE.format(venv=VENV_BIN))
        wf = new_workflow(tmp_path / "wf", conda_double, {"software": {"modules": modules}})
        log = tmp_path / "modules.jsonl"
        wf.env = module_double_env(wf.env, modulepath, log)
        return wf, log

    return make


def test_modules_load_for_the_rule(modules_wf):
    wf, log = modules_wf(["pytorch/2.12-test"])
    wf.snakemake(RECORD, sdm=("env-modules",))
    record = json.loads(wf.path(RECORD).read_text())
    # no venv on PATH: only the module's PATH finds a Python with torch
    assert record["modules"] == ["pytorch/2.12-test"] and record["conda_prefix"] is None
    assert [(e["event"], e["module"]) for e in module_events(log)] == [
        ("purge", ""),
        ("load", "pytorch/2.12-test"),
        ("is-loaded", "pytorch/2.12-test"),
    ]


def test_module_that_fails_to_load_fails_the_rule(modules_wf):
    wf, log = modules_wf(["pytorch/2.12-test", "pytorch/missing"])
    proc = wf.snakemake(RECORD, sdm=("env-modules",), check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "Unable to locate a modulefile for 'pytorch/missing'" in out  # the module system's error
    assert "environment module pytorch/missing is not loaded" in out  # and the workflow's check
    # pytorch/2.12-test did load, so the command would have found torch and succeeded: it never
    # started (no record, an empty log).
    assert [(e["event"], e["module"]) for e in module_events(log)][:3] == [
        ("purge", ""),
        ("load", "pytorch/2.12-test"),
        ("load-failed", "pytorch/missing"),
    ]
    assert not wf.path(RECORD).exists()
    assert (
        not wf.path("results/logs/environment.log").exists()
        or wf.path("results/logs/environment.log").read_text() == ""
    )


def test_snakemake_alone_runs_the_command_after_a_failed_load(conda_double, tmp_path):
    """Why the workflow checks: Snakemake's envmodules print a failed load and run the command."""
    (tmp_path / "Snakefile").write_text(
        'rule a:\n    output: "a.txt"\n    envmodules: "pytorch/missing"\n    shell: "touch {output}"\n'
    )
    env = module_double_env(conda_double.env, tmp_path / "modulefiles", tmp_path / "modules.jsonl")
    cmd = ["timeout", "-k", "10", "120", SNAKEMAKE, "--sdm", "env-modules", "--cores", "1"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert "Unable to locate a modulefile for 'pytorch/missing'" in proc.stdout + proc.stderr
    assert proc.returncode == 0 and (tmp_path / "a.txt").exists()


def test_configured_modules_without_env_modules_fail(modules_wf):
    wf, log = modules_wf(["pytorch/2.12-test"])
    proc = wf.snakemake(RECORD, sdm=(), check=False)
    assert proc.returncode != 0
    assert "environment module pytorch/2.12-test is not loaded" in proc.stdout + proc.stderr
    assert "load" not in [e["event"] for e in module_events(log)]
    assert not wf.path(RECORD).exists()


# --------------------------------------------------------------------------- the real env files, statically

PINNED = re.compile(
    r"^(?P<name>[a-z0-9][a-z0-9_.-]*)(?:==|=)(?P<version>[0-9][A-Za-z0-9_.+]*)(?:=(?P<build>[A-Za-z0-9_.*+]+))?$"
)


def real_env_files() -> dict[str, dict]:
    return {p.stem: yaml.safe_load(p.read_text()) for p in sorted((REPO / "envs").glob("*.yaml"))}


def test_real_env_files_are_pinned_with_explicit_channels():
    envs = real_env_files()
    assert set(envs) == {"train", "train-cuda", "report"}
    for name, env in envs.items():
        assert set(env) <= {"name", "channels", "dependencies"}, name
        assert env["channels"] == ["conda-forge", "nodefaults"], name  # explicit; never `defaults`
        for dep in env["dependencies"]:
            assert isinstance(dep, str), f"{name}: {dep!r} (pip sections are not reproducible here)"
            assert PINNED.match(dep), f"{name}: {dep!r} is not pinned to one version"


def test_real_env_files_agree():
    def pins(env):
        return {m["name"]: (m["version"], m["build"]) for m in map(PINNED.match, env["dependencies"])}

    envs = {name: pins(env) for name, env in real_env_files().items()}
    train, cuda, report = envs["train"], envs["train-cuda"], envs["report"]
    assert {"python", "pytorch", "pytorch-lightning", "matplotlib-base", "numpy"} <= set(train)
    assert "torchvision" not in train  # never imported by the package; torchmetrics would import it
    assert {k: v for k, (v, _) in cuda.items() if k != "cuda-version"} == {k: v for k, (v, _) in train.items()}
    assert train["pytorch"][1].startswith("cpu") and cuda["pytorch"][1].startswith("cuda")
    assert "cuda-version" in cuda and "pytorch" not in report
    assert report["python"] == train["python"] and report["matplotlib-base"] == train["matplotlib-base"]


def test_lock_files_are_solver_output():
    """Lock files are generated on a machine with channel access (README), never written by hand."""
    for pin in sorted((REPO / "envs").glob("*.pin.txt")):
        lines = [line for line in pin.read_text().splitlines() if line.strip()]
        assert (
            re.fullmatch(r"[a-z0-9_.-]+\.linux-64\.pin\.txt", pin.name)
            and (REPO / "envs" / f"{pin.name.split('.')[0]}.yaml").exists()
        )
        assert "# platform: linux-64" in lines and "@EXPLICIT" in lines, pin
        packages = lines[lines.index("@EXPLICIT") + 1 :]
        assert packages and all(
            re.fullmatch(r"https://conda\.anaconda\.org/conda-forge/\S+\.(conda|tar\.bz2)#[0-9a-f]{32,64}", p)
            for p in packages
        ), pin


def test_software_config_defaults_and_validation():
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    schema = str(REPO / "workflow/schemas/config.schema.yaml")
    config = {"runs": {"single": {}}}
    validate(config, schema)
    assert config["software"] == {"variant": "cpu", "conda_env": "", "modules": []}
    for ok in (
        {"conda_env": "torch-pl-env"},
        {"conda_env": "/shared/envs/torch"},
        {"variant": "cuda", "modules": ["anaconda3/2021.11", "PyTorch/2.1.2-foss-2023a-CUDA-12.1.1"]},
    ):
        validate({"runs": {"single": {}}, "software": ok}, schema)
    for bad in (
        {"variant": "rocm"},
        {"conda_env": "envs/train.yaml"},
        {"conda_env": "x; rm -rf /"},
        {"modules": ["cuda/12 && true"]},
        {"module": []},
    ):
        with pytest.raises(WorkflowError):
            validate({"runs": {"single": {}}, "software": bad}, schema)


def test_readme_documents_conda_and_modules():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Conda and modules") :]
    for needle in (
        "--conda-create-envs-only",
        "--conda-prefix",
        "conda list --explicit --md5",
        "linux-64.pin.txt",
        "software.conda_env",
        "software.modules",
        "--sdm env-modules",
        "not exercised in CI",
    ):
        assert needle in section, needle
