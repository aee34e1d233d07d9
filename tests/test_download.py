"""Fetching and reading the official CIFAR archives without TensorFlow, against a small archive of
the same format served from 127.0.0.1: verified, resumed, restarted, refused when corrupt or cut
short, and a clear message when there is no network."""

import hashlib
import http.server
import io
import tarfile
import threading

import numpy as np
import pytest

from maxl_jax import data as D
from maxl_jax import download as dl

SAMPLE = D.shared_data_dir()


def cifar100_archive(images: np.ndarray, coarse: np.ndarray, fine: np.ndarray,
                     test_n: int = 4) -> bytes:
    """A ``cifar-100-binary.tar.gz`` of the official layout: records of (coarse, fine, 1024 red,
    1024 green, 1024 blue bytes) in ``cifar-100-binary/train.bin`` and ``test.bin``."""
    planes = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # R plane, G plane, B plane
    records = np.concatenate([coarse[:, None], fine[:, None], planes], 1).astype(np.uint8)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, part in (("train.bin", records[test_n:]), ("test.bin", records[:test_n])):
            data = part.tobytes()
            info = tarfile.TarInfo(f"cifar-100-binary/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def random_cifar(n=12, seed=0):
    rng = np.random.default_rng(seed)
    fine = rng.integers(0, 100, n)
    coarse = np.asarray(D.CIFAR100_FINE_TO_COARSE)[fine]
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), coarse, fine


class Server:
    """An HTTP server on 127.0.0.1 serving ``files`` (path -> bytes). ``honour_range``: answer a
    ``Range`` request with 206 and the rest of the file; ``cut``: send only the first ``cut`` bytes
    while announcing the full length, then close."""

    def __init__(self, files, honour_range=True, cut=None):
        self.files, self.honour_range, self.cut, self.requests = files, honour_range, cut, []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                owner.requests.append((self.path, self.headers.get("Range")))
                data = owner.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start, status = 0, 200
                rng = self.headers.get("Range")
                if rng and owner.honour_range:
                    start, status = int(rng.split("=")[1].split("-")[0]), 206
                body = data[start:]
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body if owner.cut is None else body[: owner.cut])

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def serve_cifar100(monkeypatch, archive: bytes, **server_kw):
    server = Server({"/cifar-100-binary.tar.gz": archive}, **server_kw)
    monkeypatch.setitem(dl.ARCHIVES, "cifar100", dl.Archive(
        server.url("/cifar-100-binary.tar.gz"), len(archive), hashlib.sha256(archive).hexdigest(),
        "cifar-100-binary.tar.gz"))
    return server


def test_first_use_fetches_verifies_parses_and_then_reads_the_cached_archive(tmp_path,
                                                                              monkeypatch):
    images, coarse, fine = random_cifar()
    archive = cifar100_archive(images, coarse, fine)
    with serve_cifar100(monkeypatch, archive) as server:
        ds = D.load_dataset("cifar100", data_dir=str(tmp_path), download=True)
        again = D.load_dataset("cifar100", data_dir=str(tmp_path), download=True)
    assert len(server.requests) == 1  # the second load read the cached, verified archive
    assert (tmp_path / "downloads" / "cifar-100-binary.tar.gz").read_bytes() == archive
    np.testing.assert_array_equal(ds.test.images, images[:4])
    np.testing.assert_array_equal(ds.train.images, images[4:])
    np.testing.assert_array_equal(ds.train.primary, coarse[4:])
    assert ds.psi_human == (5,) * 20 and ds.image_shape == (32, 32, 3)
    np.testing.assert_array_equal(again.train.images, ds.train.images)


def test_an_interrupted_download_resumes_with_a_range_request(tmp_path, monkeypatch):
    archive = cifar100_archive(*random_cifar())
    part = tmp_path / "downloads" / "cifar-100-binary.tar.gz.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(archive[:1000])
    with serve_cifar100(monkeypatch, archive) as server:
        D.load_dataset("cifar100", data_dir=str(tmp_path), download=True)
    assert server.requests[0][1] == "bytes=1000-"
    assert (tmp_path / "downloads" / "cifar-100-binary.tar.gz").read_bytes() == archive
    assert not part.exists()


def test_a_server_ignoring_the_range_restarts_the_download_cleanly(tmp_path, monkeypatch):
    archive = cifar100_archive(*random_cifar())
    part = tmp_path / "downloads" / "cifar-100-binary.tar.gz.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"stale bytes of an older attempt")
    with serve_cifar100(monkeypatch, archive, honour_range=False):
        D.load_dataset("cifar100", data_dir=str(tmp_path), download=True)
    assert (tmp_path / "downloads" / "cifar-100-binary.tar.gz").read_bytes() == archive


def test_a_corrupt_download_is_refused_and_removed(tmp_path, monkeypatch):
    archive = cifar100_archive(*random_cifar())
    server = serve_cifar100(monkeypatch, archive)
    server.files["/cifar-100-binary.tar.gz"] = archive[:-1] + bytes([archive[-1] ^ 1])
    with server, pytest.raises(D.DatasetNotFoundError, match="SHA-256 .* expected"):
        D.load_dataset("cifar100", data_dir=str(tmp_path), download=True)
    assert not list((tmp_path / "downloads").glob("cifar-100-binary.tar.gz*"))


def test_a_download_cut_short_is_kept_for_resuming_and_then_completes(tmp_path, monkeypatch):
    archive = cifar100_archive(*random_cifar())
    with serve_cifar100(monkeypatch, archive, cut=2000), \
            pytest.raises(D.DatasetNotFoundError, match="interrupted.*run again to resume"):
        D.load_dataset("cifar100", data_dir=str(tmp_path), download=True)
    part = tmp_path / "downloads" / "cifar-100-binary.tar.gz.part"
    assert part.stat().st_size == 2000
    with serve_cifar100(monkeypatch, archive) as server:
        D.load_dataset("cifar100", data_dir=str(tmp_path), download=True)
    assert server.requests[0][1] == "bytes=2000-"


def test_a_corrupt_cached_archive_is_named(tmp_path, monkeypatch):
    archive = cifar100_archive(*random_cifar())
    with serve_cifar100(monkeypatch, archive):
        D.load_dataset("cifar100", data_dir=str(tmp_path), download=True)
        cached = tmp_path / "downloads" / "cifar-100-binary.tar.gz"
        cached.write_bytes(archive[: len(archive) // 2])
        with pytest.raises(D.DatasetCorruptError, match=f"{cached}.*Delete it to download it"):
            D.load_dataset("cifar100", data_dir=str(tmp_path), download=True)


def test_no_network_gives_one_message_naming_the_dataset_the_folder_and_the_ways(tmp_path,
                                                                                monkeypatch):
    monkeypatch.setitem(dl.ARCHIVES, "cifar100", dl.Archive(
        "http://127.0.0.1:9/cifar-100-binary.tar.gz", 10, "0" * 64, "cifar-100-binary.tar.gz"))
    with pytest.raises(D.DatasetNotFoundError) as e:
        D.load_dataset("cifar100", data_dir=str(tmp_path), download=True)
    msg = str(e.value)
    assert "'cifar100' not found in" in msg and str(tmp_path) in msg
    assert "cifar-100-binary.tar.gz" in msg and f"{tmp_path}/downloads" in msg
    assert "tfds build cifar100" in msg and "cannot download" in msg


@pytest.mark.skipif(SAMPLE is None or not (SAMPLE / "cifar100_test_sample").is_dir(),
                    reason="the CIFAR-100 test sample is not in the shared data folder "
                           "(MAXL_SHARED_DATA)")
def test_the_parser_reads_real_cifar100_pixels_and_labels_in_the_official_layout(tmp_path):
    from PIL import Image
    files = sorted((SAMPLE / "cifar100_test_sample").glob("*.png"))
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    fine = np.array([int(f.stem.split("_")[-1]) for f in files])
    coarse = np.asarray(D.CIFAR100_FINE_TO_COARSE)[fine]
    path = tmp_path / "cifar-100-binary.tar.gz"
    path.write_bytes(cifar100_archive(images, coarse, fine, test_n=len(files)))
    parsed = D.read_cifar_binary(path, "cifar100")["test"]
    np.testing.assert_array_equal(parsed["image"], images)
    np.testing.assert_array_equal(parsed["label"], fine)
