"""TEST DOUBLE for the ``conda`` command -- NOT conda.

This script stands in for conda so that ``snakemake --sdm conda`` can be
tested offline.  It implements only the calls that Snakemake 9.27.1
(``snakemake/deployment/conda.py``) makes, backed by py-rattler
(``py-rattler==0.28.0``) solving and installing from *local* ``file://``
channels (see ``tests/conda/channel.py``).  The real conda-forge solve, real
conda's activation machinery, ``.condarc`` handling, networking, and any other
conda behaviour are NOT exercised; a test passing with this double says that
Snakemake drives conda as expected and that the resulting environments are
activated for the jobs, nothing about whether real channels can satisfy an
environment file.

It is run through the launcher ``tests/conda/bin/conda`` (a bash script that
execs ``$CONDA_DOUBLE_PYTHON conda_double.py "$@"``), because the Python with
py-rattler (the project venv) need not be on ``PATH``.

Supported calls (anything else exits with status 2 and a message naming the
unsupported call, so that new Snakemake calls are noticed):

* ``conda --version``                                   -> ``conda 24.7.1``
* ``conda info --json``                                 -> conda_prefix, root_prefix, platform, ...
* ``conda config --get channel_priority --json``        -> strict
* ``conda env create [--quiet] [--no-default-packages] --file ENV.yaml (--prefix P | --name N) [--yes]``
* ``conda create [--quiet] [--yes] [--no-default-packages] (--prefix P | --name N) --file PIN.txt``
  (``@EXPLICIT`` URL list: exactly those packages; a plain spec list: solved)
* ``conda create ... (--prefix P | --name N) PKG_FILE...`` (Snakemake's env-archive reinstall)
* ``conda list [--explicit] [--md5] (--prefix P | --name N)``   (Snakemake's ``--archive``)
* ``conda env export (--prefix P | --name N)``          (Snakemake's ``conda: <name or dir>`` envs)
* ``conda clean -y --tarballs [--packages]``            (Snakemake's ``--conda-cleanup-pkgs``)

Activation is not done by this script: Snakemake sources
``<conda_prefix>/bin/activate <env>``, and ``conda_prefix`` reported here is
``tests/conda``, so ``tests/conda/bin/activate`` (and ``bin/deactivate``) do it.

Environment variables:

* ``CONDA_DOUBLE_PYTHON``  (read by the launcher) Python that has py-rattler.
* ``CONDA_DOUBLE_CHANNEL`` ``file://`` URL (or path) of the local channel that any
  channel *name* in an env file (``conda-forge``, ``bioconda``, ...) maps to, and
  the default channel when an env file lists none.  ``http(s)://`` channels are
  refused (offline).
* ``CONDA_DOUBLE_ROOT``    state directory: package cache (``pkgs/``), repodata
  cache, and ``envs/`` for ``--name`` envs.  Default: ``$TMPDIR/conda-double-<uid>``.
* ``CONDA_DOUBLE_LOG``     if set, one JSON line per invocation is appended
  (``{"event": "call", "argv": [...], ...}``, then ``{"event": "exit", "rc": ...}``);
  ``bin/activate`` appends ``{"event": "activate", "prefix": ...}``.
* ``CONDA_DOUBLE_VERSION`` version to report (default ``24.7.1``, Snakemake's minimum).

A process that has run py-rattler's installer has been seen to crash at
interpreter exit (3 runs in 10), so every call ends with ``os._exit`` after
flushing its output.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from urllib.parse import unquote, urlparse

DEFAULT_VERSION = "24.7.1"
PLATFORM = "linux-64"
SUBDIRS = [PLATFORM, "noarch"]
PROG = "conda (test double)"


class Unsupported(Exception):
    """A call (subcommand or option) the double does not implement: exit 2."""


class CondaError(Exception):
    """A call the double understands but that fails, as conda would: exit 1."""


# --------------------------------------------------------------------------- paths


def root_prefix() -> Path:
    # tests/conda: holds bin/conda, bin/activate, bin/deactivate like a conda install.
    return Path(__file__).resolve().parent


def state_dir() -> Path:
    d = os.environ.get("CONDA_DOUBLE_ROOT") or os.path.join(
        tempfile.gettempdir(), f"conda-double-{os.getuid()}"
    )
    return Path(d)


def envs_dir() -> Path:
    return state_dir() / "envs"


def pkgs_dir() -> Path:
    return state_dir() / "pkgs"


def target_prefix(args) -> Path:
    if getattr(args, "prefix", None):
        return Path(os.path.abspath(args.prefix))
    if getattr(args, "name", None):
        return envs_dir() / args.name
    raise Unsupported("a target environment (--prefix or --name) is required")


# --------------------------------------------------------------------------- logging


def log_event(event: dict) -> None:
    path = os.environ.get("CONDA_DOUBLE_LOG")
    if not path:
        return
    line = json.dumps(event) + "\n"
    # One O_APPEND write per event keeps lines whole under concurrent callers.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- argument parsing


class _Parser(argparse.ArgumentParser):
    def error(
        self, message
    ):  # argparse would exit 2 with a usage line; say what is missing
        raise Unsupported(message)

    def exit(self, status=0, message=None):
        if message:
            raise Unsupported(message.strip())
        raise Unsupported(f"argparse exit {status}")


def _target_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("-p", "--prefix")
    g.add_argument("-n", "--name")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="conda", add_help=False, allow_abbrev=False)
    parser.add_argument("--version", "-V", action="store_true")
    sub = parser.add_subparsers(dest="cmd", parser_class=_Parser)

    info = sub.add_parser("info", add_help=False)
    info.add_argument("--json", action="store_true", required=True)

    config = sub.add_parser("config", add_help=False)
    config.add_argument("--get", required=True, choices=["channel_priority"])
    config.add_argument("--json", action="store_true", required=True)

    env = sub.add_parser("env", add_help=False)
    env_sub = env.add_subparsers(dest="env_cmd", parser_class=_Parser, required=True)
    env_create = env_sub.add_parser("create", add_help=False)
    env_create.add_argument("-q", "--quiet", action="store_true")
    env_create.add_argument("--no-default-packages", action="store_true")
    env_create.add_argument("-f", "--file", required=True)
    env_create.add_argument("-y", "--yes", action="store_true")
    _target_args(env_create)
    env_export = env_sub.add_parser("export", add_help=False)
    _target_args(env_export)

    create = sub.add_parser("create", add_help=False)
    create.add_argument("-q", "--quiet", action="store_true")
    create.add_argument("-y", "--yes", action="store_true")
    create.add_argument("--no-default-packages", action="store_true")
    create.add_argument("--file", action="append", default=[])
    create.add_argument("packages", nargs="*")
    _target_args(create)

    lst = sub.add_parser("list", add_help=False)
    lst.add_argument("--explicit", action="store_true")
    lst.add_argument("--md5", action="store_true")
    _target_args(lst)

    clean = sub.add_parser("clean", add_help=False)
    clean.add_argument("-y", "--yes", action="store_true")
    clean.add_argument("-t", "--tarballs", action="store_true")
    clean.add_argument("-p", "--packages", action="store_true")
    return parser


# --------------------------------------------------------------------------- channels & specs


def _url_to_path(url: str) -> Path:
    parsed = urlparse(url)
    if parsed.scheme != "file":
        raise CondaError(f"only file:// URLs are available offline, got {url!r}")
    return Path(unquote(parsed.path))


def resolve_channel(name: str) -> str | None:
    """Channel entry of an env file -> local file:// URL (None for ``nodefaults``)."""
    if name == "nodefaults":
        return None
    if name.startswith(("http://", "https://")):
        raise CondaError(f"channel {name!r}: no network in the conda test double")
    if name.startswith("file://"):
        url = name
    elif name.startswith("/"):
        url = Path(name).as_uri()
    else:
        mapped = os.environ.get("CONDA_DOUBLE_CHANNEL")
        if not mapped:
            raise CondaError(
                f"channel name {name!r} needs CONDA_DOUBLE_CHANNEL (a file:// URL) to map to"
            )
        url = mapped if "://" in mapped else Path(mapped).resolve().as_uri()
    path = _url_to_path(url)
    if not (path / "noarch" / "repodata.json").is_file():
        raise CondaError(f"channel {name!r} -> {url}: no noarch/repodata.json there")
    return url.rstrip("/")


def default_channels() -> list[str]:
    mapped = os.environ.get("CONDA_DOUBLE_CHANNEL")
    if not mapped:
        raise CondaError("no channels given and CONDA_DOUBLE_CHANNEL is not set")
    return [resolve_channel(mapped)]


def read_env_file(path: str) -> tuple[list[str], list[str]]:
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise CondaError(f"cannot read environment file {path}: {e}")
    if not isinstance(data, dict):
        raise CondaError(f"{path}: not a mapping")
    unknown = set(data) - {"name", "channels", "dependencies", "prefix", "variables"}
    if unknown:
        raise Unsupported(f"env file keys {sorted(unknown)} in {path}")
    if data.get("variables"):
        raise Unsupported(f"'variables:' in {path}")
    channels = []
    for ch in data.get("channels") or []:
        url = resolve_channel(str(ch))
        if url and url not in channels:
            channels.append(url)
    if not channels:
        channels = default_channels()
    specs = []
    for dep in data.get("dependencies") or []:
        if not isinstance(dep, str):
            raise Unsupported(
                f"non-conda dependency entry {dep!r} (e.g. pip:) in {path}"
            )
        specs.append(dep.strip())
    return channels, specs


# --------------------------------------------------------------------------- rattler


def _gateway():
    import rattler

    return rattler.Gateway(cache_dir=state_dir() / "repodata-cache")


def solve(channels: list[str], specs: list[str]):
    import rattler

    if not specs:
        raise CondaError("no package specs to solve")
    match_specs = [rattler.MatchSpec(s) for s in specs]
    records = asyncio.run(
        rattler.solve(
            sources=[rattler.Channel(c) for c in channels],
            specs=match_specs,
            gateway=_gateway(),
            platforms=SUBDIRS,
            virtual_packages=[],
        )
    )
    return records


def explicit_records(pin_text: str, source: str):
    """``@EXPLICIT`` lines -> RepoDataRecords of exactly those local files (hash-checked)."""
    import rattler

    records = []
    for raw in pin_text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or line == "@EXPLICIT":
            continue
        url, _, digest = line.partition("#")
        path = _url_to_path(url)
        if not path.is_file():
            raise CondaError(f"{source}: package file {path} does not exist")
        data = path.read_bytes()
        if digest.startswith("sha256:"):
            ok = hashlib.sha256(data).hexdigest() == digest[len("sha256:") :]
        elif digest:
            ok = hashlib.md5(data).hexdigest() == digest
        else:
            ok = True
        if not ok:
            raise CondaError(f"{source}: checksum mismatch for {url}")
        record = asyncio.run(rattler.RepoDataRecord.from_package_archive(path))
        # as conda does for explicit URLs: the channel is the URL minus subdir/file
        record.channel = url.rsplit("/", 2)[0] + "/"
        records.append(record)
    if not records:
        raise CondaError(f"{source}: no packages listed")
    return records


def install(records, prefix: Path) -> None:
    created = not prefix.exists()
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "conda-meta").mkdir(exist_ok=True)
    try:
        _install(records, prefix)
    except BaseException:
        if created:  # roll back, as conda does
            shutil.rmtree(prefix, ignore_errors=True)
        raise


def _install(records, prefix: Path) -> None:
    import rattler

    asyncio.run(
        rattler.install(
            records,
            target_prefix=prefix,
            cache_dir=pkgs_dir(),
            platform=rattler.Platform(PLATFORM),
            show_progress=False,
            # requested_specs is not passed: py-rattler 0.28.0 hands the Python
            # MatchSpec wrappers to the extension unwrapped (TypeError).  The
            # specs are recorded in conda-meta/history instead.
            execute_link_scripts=False,
        )
    )


def write_history(prefix: Path, argv: list[str], records, specs: list[str]) -> None:
    with open(prefix / "conda-meta" / "history", "a") as f:
        f.write(f"==> {time.strftime('%Y-%m-%d %H:%M:%S')} <==\n")
        f.write(f"# cmd: conda {' '.join(argv)}\n")
        f.write(f"# conda version: {version()}\n")
        f.write("# conda test double (tests/conda/conda_double.py)\n")
        for r in records:
            f.write(f"+{r.url}\n")
        f.write(f"# update specs: {specs!r}\n")


def report(records, prefix: Path, quiet: bool) -> None:
    print(f"## Package Plan ##\n\n  environment location: {prefix}\n")
    for r in sorted(records, key=lambda r: r.name.normalized):
        print(f"    {r.name.normalized}-{r.version}-{r.build}  {r.url}")
    if not quiet:
        print("\nPreparing transaction: done\nExecuting transaction: done")


def prepare_prefix(prefix: Path, yes: bool, what: str) -> None:
    if prefix.exists() and any(prefix.iterdir()):
        if (prefix / "conda-meta").is_dir() and yes:
            shutil.rmtree(prefix)
        else:
            raise CondaError(f"{what}: prefix already exists: {prefix}")


# --------------------------------------------------------------------------- commands


def version() -> str:
    return os.environ.get("CONDA_DOUBLE_VERSION", DEFAULT_VERSION)


def cmd_info(args, argv) -> int:
    root = str(root_prefix())
    envs = sorted(str(p) for p in envs_dir().glob("*") if (p / "conda-meta").is_dir())
    info = {
        "conda_version": version(),
        "conda_prefix": root,
        "root_prefix": root,
        "conda_env_version": version(),
        "platform": PLATFORM,
        "subdir": PLATFORM,
        "envs_dirs": [str(envs_dir())],
        "pkgs_dirs": [str(pkgs_dir())],
        "envs": envs,
        "channels": (
            [os.environ["CONDA_DOUBLE_CHANNEL"]]
            if os.environ.get("CONDA_DOUBLE_CHANNEL")
            else []
        ),
        "active_prefix": os.environ.get("CONDA_PREFIX"),
        "active_prefix_name": (
            os.path.basename(os.environ["CONDA_PREFIX"])
            if os.environ.get("CONDA_PREFIX")
            else None
        ),
        "default_prefix": root,
        "offline": True,
        "python_version": "%d.%d.%d" % sys.version_info[:3],
        "sys.executable": sys.executable,
        "sys.prefix": sys.prefix,
        "conda_test_double": True,
    }
    print(json.dumps(info, indent=2, sort_keys=True))
    return 0


def cmd_config(args, argv) -> int:
    print(
        json.dumps(
            {
                "get": {"channel_priority": "strict"},
                "rc_path": None,
                "success": True,
                "warnings": [],
            },
            indent=2,
        )
    )
    return 0


def cmd_env_create(args, argv) -> int:
    prefix = target_prefix(args)
    channels, specs = read_env_file(args.file)
    prepare_prefix(prefix, args.yes, "env create")
    records = solve(channels, specs)
    install(records, prefix)
    write_history(prefix, argv, records, specs)
    report(records, prefix, args.quiet)
    return 0


def cmd_create(args, argv) -> int:
    prefix = target_prefix(args)
    if args.file and args.packages:
        raise Unsupported("create with both --file and package arguments")
    if not args.file and not args.packages:
        raise Unsupported("create without --file or packages")
    prepare_prefix(prefix, args.yes, "create")
    specs: list[str] = []
    if args.file:
        texts = []
        for fn in args.file:
            try:
                texts.append((fn, Path(fn).read_text()))
            except OSError as e:
                raise CondaError(f"cannot read {fn}: {e}")
        explicit = ["@EXPLICIT" in t.split() for _fn, t in texts]
        if all(explicit):
            records = [r for fn, t in texts for r in explicit_records(t, fn)]
        elif not any(explicit):
            specs = [
                l.strip()
                for _fn, t in texts
                for l in t.splitlines()
                if l.strip() and not l.strip().startswith("#")
            ]
            records = solve(default_channels(), specs)
        else:
            raise Unsupported("mixing @EXPLICIT and spec-list files")
    else:
        files = [p for p in args.packages if p.endswith((".tar.bz2", ".conda"))]
        if files and len(files) == len(args.packages):
            text = "\n".join(Path(os.path.abspath(p)).as_uri() for p in files)
            records = explicit_records(text, "package arguments")
        elif not files:
            specs = list(args.packages)
            records = solve(default_channels(), specs)
        else:
            raise Unsupported("mixing package files and specs")
    install(records, prefix)
    write_history(prefix, argv, records, specs)
    report(records, prefix, args.quiet)
    return 0


def _installed(prefix: Path) -> list[dict]:
    meta = prefix / "conda-meta"
    if not meta.is_dir():
        raise CondaError(f"not a conda environment: {prefix}")
    recs = [json.loads(p.read_text()) for p in sorted(meta.glob("*.json"))]
    return sorted(recs, key=lambda r: r["name"])


def cmd_list(args, argv) -> int:
    prefix = target_prefix(args)
    recs = _installed(prefix)
    if args.explicit:
        print("# This file may be used to create an environment using:")
        print("# $ conda create --name <env> --file <this file>")
        print(f"# platform: {PLATFORM}")
        print("@EXPLICIT")
        for r in recs:
            print(f"{r['url']}#{r['md5']}" if args.md5 else r["url"])
    else:
        print(f"# packages in environment at {prefix}:\n#")
        print(f"# {'Name':<24}{'Version':<16}{'Build':<10}Channel")
        for r in recs:
            print(
                f"{r['name']:<26}{r['version']:<16}{r['build']:<10}{r.get('channel') or ''}"
            )
    return 0


def cmd_env_export(args, argv) -> int:
    prefix = target_prefix(args)
    recs = _installed(prefix)
    channels = []
    for r in recs:
        ch = r.get("channel") or r["url"].rsplit("/", 2)[0]
        if ch not in channels:
            channels.append(ch)
    lines = [f"name: {prefix.name}", "channels:"] + [f"  - {c}" for c in channels]
    lines += ["dependencies:"] + [
        f"  - {r['name']}={r['version']}={r['build']}" for r in recs
    ]
    lines.append(f"prefix: {prefix}")
    print("\n".join(lines))
    return 0


def cmd_clean(args, argv) -> int:
    if not (args.tarballs or args.packages):
        raise Unsupported("clean without --tarballs/--packages")
    pkgs = pkgs_dir()
    if pkgs.is_dir():
        for entry in pkgs.iterdir():
            if (
                args.tarballs
                and entry.is_file()
                and entry.name.endswith((".tar.bz2", ".conda"))
            ):
                entry.unlink()
            elif args.packages and entry.is_dir():
                shutil.rmtree(entry)
    return 0


def dispatch(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.version:
        if args.cmd:
            raise Unsupported("--version combined with a subcommand")
        print(f"conda {version()}")
        return 0
    if args.cmd is None:
        raise Unsupported("no subcommand")
    if args.cmd == "env":
        return {"create": cmd_env_create, "export": cmd_env_export}[args.env_cmd](
            args, argv
        )
    return {
        "info": cmd_info,
        "config": cmd_config,
        "create": cmd_create,
        "list": cmd_list,
        "clean": cmd_clean,
    }[args.cmd](args, argv)


def main(argv: list[str]) -> int:
    log_event(
        {
            "event": "call",
            "argv": argv,
            "cwd": os.getcwd(),
            "pid": os.getpid(),
            "time": time.time(),
        }
    )
    try:
        rc = dispatch(argv)
    except Unsupported as e:
        print(
            f"{PROG}: unsupported call `conda {' '.join(argv)}`: {e}\n"
            f"{PROG} implements only what Snakemake 9.27.1 calls; see "
            f"{Path(__file__).resolve()}",
            file=sys.stderr,
        )
        rc = 2
    except CondaError as e:
        print(f"{PROG}: error in `conda {' '.join(argv)}`: {e}", file=sys.stderr)
        rc = 1
    except Exception:  # rattler solve/install errors and bugs: loud, exit 1
        print(f"{PROG}: `conda {' '.join(argv)}` failed:", file=sys.stderr)
        traceback.print_exc()
        rc = 1
    log_event({"event": "exit", "argv": argv, "pid": os.getpid(), "rc": rc})
    return rc


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # py-rattler's installer can crash the interpreter at exit; skip the teardown.
    os._exit(code)
