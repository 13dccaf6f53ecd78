"""Build a tiny, local, offline conda channel for tests that use the conda test double.

The channel holds hand-assembled ``noarch: generic`` packages (plain ``.tar.bz2``
archives with ``info/index.json``, ``info/paths.json``, ``info/files`` and the
payload), so no conda-build / rattler-build and no network is needed.  The
channel is indexed with ``rattler.index.index_fs`` (py-rattler), which writes
``noarch/repodata.json``; an empty ``linux-64/repodata.json`` is written too so
that channel lookups for the native platform succeed.

Packages (all ``noarch: generic``, build string ``0``, python-free):

* ``tinylib`` 1.0 and 2.0: data only, ``share/tinylib/VERSION`` holds the version.
* ``tinytool`` 1.0, 2.0 and 3.0: ``bin/tinytool`` is a ``/bin/sh`` script;
  ``tinytool --version`` prints ``tinytool <version>``, ``tinytool --prefix``
  prints the prefix it is installed in (derived from its own location).
  Every ``tinytool`` depends on ``tinylib`` (1.0/2.0 need ``tinylib 1.0.*``,
  3.0 needs ``tinylib >=2``), so solves pull in a second package.

Archives are byte-for-byte reproducible (fixed mtimes, uid/gid, ordering,
bzip2 level), so their md5/sha256 are stable across builds, but nothing relies
on that: :func:`explicit_pin_lines` reads the hashes from the indexed
``repodata.json``.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

#: Fixed archive mtime (2024-01-01T00:00:00Z) for reproducible packages.
_MTIME = 1704067200
#: Build timestamp in ms, as conda's ``index.json`` carries it.
_TIMESTAMP_MS = _MTIME * 1000

TINYTOOL_SCRIPT = """#!/bin/sh
# tinytool {version}: test package from tests/conda/channel.py
case "$1" in
  --version) echo "tinytool {version}" ;;
  --prefix) cd "$(dirname "$0")/.." && pwd -P ;;
  *) echo "usage: tinytool --version | --prefix" >&2; exit 2 ;;
esac
"""

#: (name, version, depends, {relative path: (content, mode)})
PACKAGE_SPECS: list[tuple[str, str, list[str], dict[str, tuple[str, int]]]] = [
    ("tinylib", v, [], {"share/tinylib/VERSION": (f"{v}\n", 0o644)})
    for v in ("1.0", "2.0")
] + [
    (
        "tinytool",
        v,
        [dep],
        {"bin/tinytool": (TINYTOOL_SCRIPT.format(version=v), 0o755)},
    )
    for v, dep in (
        ("1.0", "tinylib 1.0.*"),
        ("2.0", "tinylib 1.0.*"),
        ("3.0", "tinylib >=2"),
    )
]


@dataclass(frozen=True)
class PackageFile:
    name: str
    version: str
    path: Path
    url: str
    md5: str
    sha256: str


@dataclass
class LocalChannel:
    """A built and indexed local channel."""

    path: Path
    packages: list[PackageFile] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.path.resolve().as_uri()

    def package(self, name: str, version: str) -> PackageFile:
        for pkg in self.packages:
            if pkg.name == name and pkg.version == version:
                return pkg
        raise KeyError(f"{name}-{version} is not in {self.path}")

    def repodata(self, subdir: str = "noarch") -> dict:
        return json.loads((self.path / subdir / "repodata.json").read_text())


def _add_file(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = _MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def build_package(
    subdir: Path,
    name: str,
    version: str,
    depends: list[str],
    files: dict[str, tuple[str, int]],
) -> Path:
    """Write ``<subdir>/<name>-<version>-0.tar.bz2`` (a ``noarch: generic`` package)."""
    payload = {
        rel: (content.encode(), mode) for rel, (content, mode) in sorted(files.items())
    }
    index = {
        "name": name,
        "version": version,
        "build": "0",
        "build_number": 0,
        "depends": depends,
        "license": "MIT",
        "noarch": "generic",
        "subdir": "noarch",
        "timestamp": _TIMESTAMP_MS,
        "arch": None,
        "platform": None,
    }
    paths = {
        "paths": [
            {
                "_path": rel,
                "path_type": "hardlink",
                "sha256": hashlib.sha256(data).hexdigest(),
                "size_in_bytes": len(data),
            }
            for rel, (data, _mode) in payload.items()
        ],
        "paths_version": 1,
    }
    about = {
        "summary": f"{name} {version}: tiny offline test package",
        "license": "MIT",
    }

    target = subdir / f"{name}-{version}-0.tar.bz2"
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w:bz2", compresslevel=9, format=tarfile.PAX_FORMAT
    ) as tar:
        _add_file(
            tar, "info/index.json", json.dumps(index, indent=2, sort_keys=True).encode()
        )
        _add_file(
            tar, "info/paths.json", json.dumps(paths, indent=2, sort_keys=True).encode()
        )
        _add_file(tar, "info/files", "".join(f"{rel}\n" for rel in payload).encode())
        _add_file(
            tar, "info/about.json", json.dumps(about, indent=2, sort_keys=True).encode()
        )
        for rel, (data, mode) in payload.items():
            _add_file(tar, rel, data, mode)
    target.write_bytes(buf.getvalue())
    return target


def build_channel(dest: Path) -> LocalChannel:
    """Build and index the test channel in ``dest`` (created; must not hold another channel)."""
    from rattler.index import index_fs

    dest = Path(dest)
    noarch = dest / "noarch"
    linux64 = dest / "linux-64"
    noarch.mkdir(parents=True, exist_ok=True)
    linux64.mkdir(parents=True, exist_ok=True)
    for name, version, depends, files in PACKAGE_SPECS:
        build_package(noarch, name, version, depends, files)

    asyncio.run(index_fs(dest, write_zst=False, write_shards=False, force=True))
    # index_fs only writes subdirs that hold packages; conda clients expect the
    # native subdir to exist as well.
    if not (linux64 / "repodata.json").exists():
        empty = {
            "info": {"subdir": "linux-64"},
            "packages": {},
            "packages.conda": {},
            "removed": [],
            "repodata_version": 1,
        }
        (linux64 / "repodata.json").write_text(json.dumps(empty, indent=2))

    channel = LocalChannel(path=dest)
    records = channel.repodata("noarch")
    for fn, rec in sorted(
        {**records.get("packages", {}), **records.get("packages.conda", {})}.items()
    ):
        channel.packages.append(
            PackageFile(
                name=rec["name"],
                version=rec["version"],
                path=noarch / fn,
                url=(noarch / fn).resolve().as_uri(),
                md5=rec["md5"],
                sha256=rec["sha256"],
            )
        )
    expected = {(n, v) for n, v, _d, _f in PACKAGE_SPECS}
    got = {(p.name, p.version) for p in channel.packages}
    if got != expected:
        raise RuntimeError(
            f"index of {dest} lists {sorted(got)}, expected {sorted(expected)}"
        )
    return channel


def explicit_pin_lines(
    channel: LocalChannel, packages: list[tuple[str, str]], platform: str = "linux-64"
) -> str:
    """An ``@EXPLICIT`` pin file (as ``conda list --explicit --md5`` writes it) for ``packages``.

    ``packages`` is a list of ``(name, version)`` in install order; URLs and
    md5 sums come from the channel's actual files/repodata.
    """
    lines = [
        "# This file may be used to create an environment using:",
        "# $ conda create --name <env> --file <this file>",
        f"# platform: {platform}",
        "@EXPLICIT",
    ]
    for name, version in packages:
        pkg = channel.package(name, version)
        lines.append(f"{pkg.url}#{pkg.md5}")
    return "\n".join(lines) + "\n"
