"""MNIST-format data: known datasets, checksummed downloads, IDX parsing, prepared array files.

Mirrors and MD5 checksums are torchvision's own (`torchvision.datasets.MNIST` and
`FashionMNIST`), read at download time, so this project keeps no second copy of them. They
are read from torchvision's source rather than imported: importing torchvision costs the
download step about 3 s (it imports torch and torch._dynamo) for two class attributes.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import os
import struct
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from .atomic import atomic_path
from .cli import run_and_exit

log = logging.getLogger(__name__)

# The four files of every MNIST-format dataset, in the names the format's authors used.
# Rules need them at parse time, which must stay free of torch imports.
FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
SPLITS = {"train": FILES[0:2], "test": FILES[2:4]}
DATASETS = ("mnist", "fashion_mnist")
IMAGE_SIZE = 28
# The workflow hands how-to-fetch settings (mirrors, timeout_s, retries) to the download
# step in the environment, as JSON, not as rule params: the files are fixed by their MD5s,
# so a new mirror must not redo the download and everything after it.
DOWNLOAD_ENV = "MNISTFLOW_DOWNLOAD"
NUM_CLASSES = 10


class DataError(Exception):
    """Bad data: the message names the file and what was expected."""


class DownloadError(DataError):
    pass


@dataclass(frozen=True)
class DatasetSource:
    name: str
    mirrors: tuple[str, ...]
    md5: Mapping[str, str]


# The files' sources and MD5s, as torchvision's MNIST and FashionMNIST classes list them
# (tests/test_data.py checks that they are equal). A table here, not an import: importing
# torchvision costs ~3 s, and the download needs neither torch nor torchvision.
KNOWN_SOURCES = {
    "mnist": DatasetSource(
        "mnist",
        ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    ),
    "fashion_mnist": DatasetSource(
        "fashion_mnist",
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    ),
}


def known_source(name: str) -> DatasetSource:
    """The mirrors and checksums of a dataset named in config."""
    if name not in KNOWN_SOURCES:
        raise DataError(f"dataset.name: unknown dataset {name!r}; expected one of {sorted(KNOWN_SOURCES)}")
    return KNOWN_SOURCES[name]


def resolve_source(name: str, mirrors: Sequence[str] | None = None, md5: Mapping[str, str] | None = None) -> DatasetSource:
    """The known source for `name`, with the mirror list and checksums optionally replaced from config."""
    known = known_source(name)
    checksums = dict(known.md5)
    for file, digest in (md5 or {}).items():
        if file not in checksums:
            raise DataError(f"dataset.md5: unknown file {file!r}; expected one of {list(FILES)}")
        checksums[file] = digest.lower()
    return DatasetSource(name, tuple(mirrors) if mirrors else known.mirrors, checksums)


def md5sum(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _join(mirror: str, name: str) -> str:
    return mirror if mirror.endswith(name) else mirror.rstrip("/") + "/" + name


def fetch(url: str, dest: Path, md5: str, timeout: float) -> None:
    """Stream `url` into `dest` atomically; raise DataError on a checksum mismatch."""
    digest = hashlib.md5(usedforsecurity=False)
    with atomic_path(dest) as tmp:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            expected = response.headers.get("Content-Length")
            received = 0
            while block := response.read(1 << 20):
                digest.update(block)
                out.write(block)
                received += len(block)
        if expected is not None and received != int(expected):
            # the transfer broke off: a network error, retried (a wrong checksum is not)
            raise urllib.error.ContentTooShortError(
                f"received {received} bytes, server announced {expected} (the transfer broke off)", None)
        got = digest.hexdigest()
        if got != md5:
            raise DataError(f"{url}: MD5 {got} does not match the expected {md5}")


def download(
    source: DatasetSource,
    dest_dir: str | Path,
    files: Iterable[str] = FILES,
    timeout: float = 15.0,
    retries: int = 1,
    backoff: float = 1.0,
    fetcher: Callable[[str, Path, str, float], None] = fetch,
) -> dict[str, str]:
    """Download each file from the first mirror that serves it with the right checksum.

    A network error is retried `retries` times per mirror; a wrong checksum is not (the
    mirror is wrong, not flaky). A mirror that cannot be reached at all is not tried again
    for later files. Files already present with the right checksum are kept. Returns
    {file: url or "cached"}.
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    unreachable: set[str] = set()
    used: dict[str, str] = {}
    for name in files:
        dest = dest_dir / name
        md5 = source.md5[name]
        for partial in dest_dir.glob(f".{name}.*.part"):  # left by a download that was killed
            log.info("%s: removing the partial file of an interrupted download", partial)
            partial.unlink(missing_ok=True)
        if dest.exists() and md5sum(dest) == md5:
            log.info("%s: present with the expected MD5, kept", dest)
            used[name] = "cached"
            continue
        reasons = []
        for mirror in source.mirrors:
            if mirror in unreachable:
                reasons.append(f"{mirror}: skipped, unreachable for an earlier file")
                continue
            url = _join(mirror, name)
            for attempt in range(retries + 1):
                try:
                    fetcher(url, dest, md5, timeout)
                except DataError as err:  # wrong content: do not retry this mirror
                    reasons.append(str(err))
                    log.warning("skipping mirror: %s", err)
                    break
                except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as err:
                    reason = f"{url}: {getattr(err, 'reason', None) or err} (attempt {attempt + 1}/{retries + 1})"
                    reasons.append(reason)
                    log.warning("%s", reason)
                    if attempt < retries:
                        time.sleep(backoff * (attempt + 1))
                    elif _is_unreachable(err):
                        unreachable.add(mirror)
                else:
                    log.info("%s: downloaded from %s, MD5 ok", name, url)
                    used[name] = url
                    break
            if name in used:
                break
        if name not in used:
            raise DownloadError(
                f"could not download {name} from any mirror:\n  "
                + "\n  ".join(reasons)
                + "\nNo mirror answered with the expected file. Without internet access, point "
                "`dataset.mirrors` at a local copy of the four IDX files, e.g. "
                "--config 'dataset={mirrors: [\"file:///path/to/mnist/\"]}' (see README, 'Offline data')."
            )
    return used


def _is_unreachable(err: Exception) -> bool:
    # An HTTP error or a broken transfer means the host answered; anything else (DNS, refused,
    # timeout) means it did not.
    return not isinstance(err, (urllib.error.HTTPError, urllib.error.ContentTooShortError, http.client.HTTPException))


# ---- IDX format ---------------------------------------------------------------------------

_IDX_UBYTE = 0x08


def read_idx(path: str | Path) -> tuple[tuple[int, ...], bytes]:
    """Parse an IDX file (gzip or raw) of unsigned bytes; return (shape, data)."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"{path}: cannot decompress ({err}); the file is truncated or not gzip") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (magic number {raw[:4].hex() or 'missing'}, expected 0000 08 0N)")
    if raw[2] != _IDX_UBYTE:
        raise DataError(f"{path}: IDX element type 0x{raw[2]:02x}, expected 0x08 (unsigned byte)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: IDX header announces {ndim} dimensions but the file ends at {len(raw)} bytes")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    size = 1
    for dim in shape:
        size *= dim
    data = raw[header:]
    if len(data) != size:
        raise DataError(f"{path}: IDX shape {shape} needs {size} data bytes, found {len(data)}")
    return shape, data


def write_idx(path: str | Path, shape: Sequence[int], data: bytes) -> None:
    """Write an IDX file of unsigned bytes; gzip (deterministic: no name, mtime 0) when `path` ends in .gz."""
    path = Path(path)
    payload = bytes([0, 0, _IDX_UBYTE, len(shape)]) + struct.pack(f">{len(shape)}I", *shape) + bytes(data)
    with atomic_path(path) as tmp:
        if path.suffix == ".gz":
            with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
                gz.write(payload)
        else:
            tmp.write_bytes(payload)


def read_split(images_path: str | Path, labels_path: str | Path):
    """Images (N, 28, 28) uint8 and labels (N,) int64 as NumPy arrays, after checking they agree."""
    import numpy as np

    image_shape, image_bytes = read_idx(images_path)
    label_shape, label_bytes = read_idx(labels_path)
    if len(image_shape) != 3 or image_shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(f"{images_path}: image shape {image_shape}, expected (N, {IMAGE_SIZE}, {IMAGE_SIZE})")
    if len(label_shape) != 1:
        raise DataError(f"{labels_path}: label shape {label_shape}, expected (N,)")
    if label_shape[0] != image_shape[0]:
        raise DataError(
            f"{labels_path} has {label_shape[0]} labels but {images_path} has {image_shape[0]} images"
        )
    labels = np.frombuffer(label_bytes, dtype=np.uint8).astype(np.int64)
    if labels.size and int(labels.max()) >= NUM_CLASSES:
        raise DataError(f"{labels_path}: label {int(labels.max())} outside 0..{NUM_CLASSES - 1}")
    images = np.frombuffer(image_bytes, dtype=np.uint8).reshape(image_shape)
    return images, labels


def prepare(raw_dir: str | Path, train: str | Path, test: str | Path) -> dict[str, int]:
    """Turn the four IDX files into one array file per split (uint8 images, int64 labels).

    NumPy, not torch: the step then starts in 0.1 s instead of the 1.3 s of importing torch.
    """
    raw_dir, outputs = Path(raw_dir), {"train": train, "test": test}
    counts = {}
    for split, (images_name, labels_name) in SPLITS.items():
        images, labels = read_split(raw_dir / images_name, raw_dir / labels_name)
        write_arrays(outputs[split], images=images, labels=labels)
        counts[split] = len(labels)
    return counts


def write_arrays(path: str | Path, **arrays) -> None:
    """`numpy.savez` (uncompressed), atomically. Its zip entries carry a fixed date, so equal
    arrays make byte-identical files: a rerun of `prepare` keeps the MD5 checkpoints are tied to."""
    import numpy as np

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


# The MNIST training set's pixel mean and standard deviation (the PyTorch examples' constants).
MEAN, STD = 0.1307, 0.3081


def normalise(images):
    """uint8 images [N,28,28] -> float32 [N,1,28,28], standardised: what every network sees."""
    return ((images.float() / 255.0 - MEAN) / STD).unsqueeze(1).contiguous()


def load_split(path: str | Path):
    """(images uint8 [N,28,28], labels int64 [N]) as torch tensors, from a prepared split file."""
    import numpy as np
    import torch

    with np.load(path, allow_pickle=False) as arrays:
        return torch.from_numpy(arrays["images"]), torch.from_numpy(arrays["labels"])


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m mnistflow.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    dl = sub.add_parser("download", help="download the four IDX files, verified by MD5")
    dl.add_argument("--dataset", required=True, choices=DATASETS)
    fetch_defaults = {"mirrors": [], "timeout_s": 10.0, "retries": 1, **json.loads(os.environ.get(DOWNLOAD_ENV, "{}"))}
    dl.add_argument(
        "--mirrors",
        default=json.dumps(fetch_defaults["mirrors"]),
        help=f"JSON list of mirror URLs (default from ${DOWNLOAD_ENV}); empty: torchvision's",
    )
    dl.add_argument("--md5", default="{}", help="JSON {file: md5} replacing known checksums")
    dl.add_argument("--timeout", type=float, default=fetch_defaults["timeout_s"])
    dl.add_argument("--retries", type=int, default=fetch_defaults["retries"])
    dl.add_argument("--out", required=True, help="directory for the four files")
    pr = sub.add_parser("prepare", help="IDX files -> one array file (.npz) per split")
    pr.add_argument("--raw", required=True, help="the folder of the four IDX files (as download writes them)")
    pr.add_argument("--train", required=True)
    pr.add_argument("--test", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        if args.command == "download":
            source = resolve_source(args.dataset, json.loads(args.mirrors), json.loads(args.md5))
            used = download(source, args.out, timeout=args.timeout, retries=args.retries)
            log.info("sources: %s", json.dumps(used))
        else:
            log.info("prepared %s", prepare(args.raw, args.train, args.test))
    except DataError as err:
        log.error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    run_and_exit(main)
