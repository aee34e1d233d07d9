"""Fetching a data set's official archive without TensorFlow: resumable, verified, with progress.

``fetch(url, dest, sha256, size)`` downloads into ``dest.part``, resuming an interrupted download
with an HTTP ``Range`` request (or restarting it cleanly when the server ignores the range), shows a
progress bar, checks the byte count and the SHA-256, and only then renames the file to ``dest``. A
file that fails the check is removed and the error names what was expected. An existing ``dest`` is
verified and reused.

The CIFAR archives are the binary versions TFDS itself downloads (same URLs and checksums as its
``url_checksums``); ``maxl_jax.data`` parses them with numpy.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import pathlib
import shutil
import sys
import urllib.error
import urllib.request
from typing import NamedTuple


class Archive(NamedTuple):
    url: str
    size: int
    sha256: str
    filename: str


#: The official binary archives (the ones TFDS registers for ``cifar10`` / ``cifar100``).
ARCHIVES = {
    "cifar10": Archive("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz", 170052171,
                       "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
                       "cifar-10-binary.tar.gz"),
    "cifar100": Archive("https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz", 168513733,
                        "58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec",
                        "cifar-100-binary.tar.gz"),
}

_FMNIST = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
#: The four official Fashion-MNIST archives (the ones TFDS registers for ``fashion_mnist``).
FASHION_MNIST_ARCHIVES = (
    Archive(_FMNIST + "train-images-idx3-ubyte.gz", 26421880,
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            "train-images-idx3-ubyte.gz"),
    Archive(_FMNIST + "train-labels-idx1-ubyte.gz", 29515,
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            "train-labels-idx1-ubyte.gz"),
    Archive(_FMNIST + "t10k-images-idx3-ubyte.gz", 4422102,
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            "t10k-images-idx3-ubyte.gz"),
    Archive(_FMNIST + "t10k-labels-idx1-ubyte.gz", 5148,
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
            "t10k-labels-idx1-ubyte.gz"),
)

CHUNK = 1 << 20

#: Environment variable: a folder URL holding the archives under their official names, used instead
#: of the official hosts (a local mirror, or an unreachable one in tests).
MIRROR_ENV = "MAXL_DATA_MIRROR"


def url_of(archive: Archive) -> str:
    """The archive's official URL, or its place on ``$MAXL_DATA_MIRROR`` when that is set."""
    mirror = os.environ.get(MIRROR_ENV)
    return f"{mirror.rstrip('/')}/{archive.filename}" if mirror else archive.url


class DownloadError(OSError):
    """A download that failed, or a file that does not match its checksum; the message says which."""


def sha256_of(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: pathlib.Path, sha256: str, size: int | None = None) -> None:
    """Raises ``DownloadError`` unless ``path`` has ``size`` bytes and the SHA-256 ``sha256``."""
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise DownloadError(f"{path} has {actual} bytes, expected {size} (a truncated or wrong "
                            f"download)")
    digest = sha256_of(path)
    if digest != sha256:
        raise DownloadError(f"{path} has SHA-256 {digest}, expected {sha256} (a corrupt or wrong "
                            f"download)")


def fetch(url: str, dest: str | os.PathLike, sha256: str, size: int | None = None, *,
          progress: bool = True, timeout: float = 60.0) -> pathlib.Path:
    """Downloads ``url`` to ``dest`` (resuming ``dest.part``), verified; returns ``dest``.

    Raises:
      DownloadError: the server could not be reached or refused, or the file fails its check (the
        partial file is then removed, so the next attempt starts clean).
    """
    dest = pathlib.Path(dest)
    if dest.exists():
        verify(dest, sha256, size)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:
        part.unlink()
        have = 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and size is not None and have == size:  # already complete
            response = None
        else:
            raise DownloadError(f"cannot download {url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise DownloadError(f"cannot download {url}: {getattr(e, 'reason', e)}") from None
    if response is not None:
        with response:
            resumed = have and response.status == 206
            mode = "ab" if resumed else "wb"
            start = have if resumed else 0
            length = response.headers.get("Content-Length")
            total = size or ((start + int(length)) if length else None)
            bar = _bar(total, start, dest.name, progress)
            received = 0
            try:
                with open(part, mode) as f:
                    for block in iter(lambda: response.read(CHUNK), b""):
                        f.write(block)
                        received += len(block)
                        if bar is not None:
                            bar.update(len(block))
                if length is not None and received < int(length):
                    raise OSError(f"the connection closed after {received} of {length} bytes")
            except (OSError, http.client.HTTPException) as e:
                raise DownloadError(f"the download of {url} was interrupted ({type(e).__name__}: "
                                    f"{e}); run again to resume it from {part}") from None
            finally:
                if bar is not None:
                    bar.close()
    try:
        verify(part, sha256, size)
    except DownloadError:
        part.unlink(missing_ok=True)
        raise
    shutil.move(str(part), str(dest))
    return dest


def _bar(total, initial, name, enabled):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
                desc=f"downloading {name}", file=sys.stderr, leave=False)
