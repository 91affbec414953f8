"""zarr / OME-Zarr stores and TIFF files by URL (``s3://``, ``gs://``, ``https://``, any fsspec
protocol). A TIFF is read through an fsspec file object (range requests): its pages or tiles
as for a local file, its IFDs parsed once per worker thread.

fsspec finds the filesystem for the URL's protocol (s3fs, gcsfs, its own HTTP one), and each
takes its credentials and endpoint from the store's standard configuration: for S3 botocore's
(``AWS_ACCESS_KEY_ID``/``AWS_PROFILE``, ``~/.aws/config`` and ``credentials``,
``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``), for Google Cloud gcsfs's. nucflow passes no
options of its own, so a worker reads the store exactly as the machine's configuration says.

Opening probes the store once (no pixel is read) and turns every way the URL can be wrong into
one line: an unknown protocol or a missing fsspec plugin, a missing bucket or key, refused
credentials, an endpoint that does not answer. Reads are retried on transient errors (a
dropped connection, a timeout, a 5xx) with exponential backoff; errors that a retry cannot mend
(missing key, refused credentials) end the read at once.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from nucflow.errors import FormatError, InputPathError, NucflowError
from nucflow.io.source import Image, Key, is_url, one_line

__all__ = ["READ_ATTEMPTS", "RetryingSource", "UrlFormat", "url_digest"]

#: Tries per region read before the error is reported (backoff 0.5, 1, 2, 4 s between them).
READ_ATTEMPTS = 5
_BACKOFF_S = 0.5
_METADATA = ("zarr.json", ".zgroup", ".zarray", ".zattrs")
_TIFF_SUFFIXES = (".tif", ".tiff")
# Plugins fsspec names in its ImportError, and the extra that installs each.
_EXTRA = {"s3": "nucflow[s3]", "s3a": "nucflow[s3]", "gs": "nucflow[gcs]", "gcs": "nucflow[gcs]"}


class UrlFormat:
    """A zarr v2/v3 array or group, an OME-Zarr image, or a TIFF file, at an fsspec URL."""

    description = "zarr, OME-Zarr or TIFF by URL (s3://, gs://, https://)"
    folder_marker = None

    def claims(self, path: str) -> bool:
        return is_url(path)

    def read(self, path: str, level: int) -> Image:
        # the local readers, given the URL once the store is known to hold it
        from nucflow.io.tiff_format import read_tiff_file
        from nucflow.io.zarr_format import read_zarr

        fs, root = _filesystem(path)
        found: str | None
        if root.lower().endswith(_TIFF_SUFFIXES):
            found = _probe_file(fs, root, path)
            image = read_tiff_file(path, level)
        else:
            found = _probe(fs, root, path)
            if found is None:
                raise InputPathError(
                    f"input {path} does not exist (no zarr metadata: {', '.join(_METADATA)}); "
                    "check the URL (nucflow reads zarr, OME-Zarr and TIFF files by URL)"
                )
            image = read_zarr(path, level)
        token = (*image.token, _etag(fs, found))
        return Image(
            RetryingSource(image.source, path),
            image.roles,
            image.scale,
            image.native_chunks,
            token,
            image.time_interval_s,
            image.scale_key,
        )


def _filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem of ``url`` and the path inside it; unknown protocols refused."""
    import fsspec

    protocol = url.split("://", 1)[0].lower()
    try:
        return fsspec.url_to_fs(url)
    except ImportError as e:
        extra = _EXTRA.get(protocol)
        hint = f"pip install '{extra}'" if extra else "install the fsspec plugin it names"
        raise FormatError(f"input {url}: {one_line(e)}; {hint}") from e
    except ValueError as e:
        raise FormatError(
            f"input {url}: fsspec knows no protocol {protocol!r} ({one_line(e)}); use s3://, "
            "gs://, https:// or a local path"
        ) from e


def _probe_file(fs: Any, root: str, url: str) -> str:
    """``root`` itself, checked to exist (a TIFF object); store errors said in one line."""
    try:
        if fs.exists(root):
            return root
    except Exception as e:
        raise _store_error(e, url) from e
    _probe(fs, root, url)  # a missing bucket is said as such
    raise InputPathError(f"input {url} does not exist; check the URL")


def _probe(fs: Any, root: str, url: str) -> str | None:
    """The first zarr metadata file under ``root``, or None; store errors said in one line."""
    try:
        for name in _METADATA:
            if fs.exists(f"{root.rstrip('/')}/{name}"):
                return f"{root.rstrip('/')}/{name}"
        bucket = root.split("/", 1)[0]
        if url.lower().startswith(("s3://", "s3a://", "gs://", "gcs://")) and not fs.exists(bucket):
            raise InputPathError(
                f"input {url}: bucket {bucket!r} does not exist or is not visible with these "
                f"credentials{_endpoint(fs)}; check the URL and the store's configuration"
            )
    except NucflowError:
        raise
    except Exception as e:
        raise _store_error(e, url) from e
    return None


def _endpoint(fs: Any) -> str:
    endpoint = getattr(fs, "client_kwargs", {}).get("endpoint_url") or _aws_endpoint()
    return f" at {endpoint}" if endpoint else ""


def _aws_endpoint() -> str | None:
    import os

    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _store_error(e: BaseException, url: str) -> NucflowError:
    """What a store error means for the user, as a NucflowError naming the URL and the fix."""
    text = f"{type(e).__name__}: {one_line(e)}"
    if isinstance(e, PermissionError) or re.search(
        r"AccessDenied|InvalidAccessKeyId|SignatureDoesNotMatch|Forbidden|403|"
        r"NoCredentials|Unable to locate credentials|ExpiredToken",
        text,
    ):
        return InputPathError(
            f"input {url}: access refused ({text}); check the credentials (for S3: "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, ~/.aws/credentials)"
        )
    if isinstance(e, FileNotFoundError):
        return InputPathError(f"input {url} does not exist ({text}); check the URL")
    return InputPathError(
        f"input {url}: the store cannot be reached ({text}); check the URL, the network and "
        "the endpoint (for S3: AWS_ENDPOINT_URL)"
    )


def _etag(fs: Any, key: str) -> str:
    """The store's version of one metadata object (ETag, else its modification time and size)."""
    try:
        info = fs.info(key)
    except Exception as e:
        raise _store_error(e, key) from e
    fields = ("ETag", "etag", "LastModified", "last_modified", "mtime", "size")
    return "|".join(str(info[k]) for k in fields if k in info)


def url_digest(url: str) -> str:
    """A digest of the store's root metadata (its bytes and versions), or of a TIFF object's
    version: changes with the input.

    Parameters
    ----------
    url : str
        An fsspec URL of a zarr store or a TIFF file.

    Returns
    -------
    str
        Hex SHA-256.
    """
    fs, root = _filesystem(url)
    digest = hashlib.sha256(url.encode())
    if root.lower().endswith(_TIFF_SUFFIXES):  # one object: its version
        digest.update(_etag(fs, root).encode())
        return digest.hexdigest()
    for name in _METADATA:
        key = f"{root.rstrip('/')}/{name}"
        try:
            digest.update(name.encode() + b"\0" + fs.cat_file(key) + _etag(fs, key).encode())
        except FileNotFoundError:
            continue
        except Exception as e:
            raise _store_error(e, url) from e
    return digest.hexdigest()


# Errors no retry mends: the key is gone, access is refused, nucflow's own verdicts.
_PERMANENT = (FileNotFoundError, PermissionError, NucflowError, MemoryError)


@dataclass(frozen=True)
class RetryingSource:
    """A remote source whose region reads are retried on transient store errors.

    ``source`` pickles with its store (fsspec filesystems pickle their options, not their
    connections), so workers open their own connections.
    """

    source: Any
    url: str
    attempts: int = READ_ATTEMPTS

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.source.shape)

    @property
    def dtype(self) -> np.dtype[Any]:
        return np.dtype(self.source.dtype)

    @property
    def chunk_grid(self) -> tuple[int, ...]:
        return tuple(self.source.chunk_grid)

    def stored_chunks(self) -> np.ndarray:
        """The chunks the store lists (one LIST request per 1000 keys on S3)."""
        return np.asarray(self._retry(self.source.stored_chunks))

    def __getitem__(self, key: Key) -> np.ndarray:
        return np.asarray(self._retry(lambda: self.source[key]))

    def _retry(self, read: Any) -> Any:
        for attempt in range(self.attempts):
            try:
                return read()
            except _PERMANENT:
                raise
            except Exception as e:
                if not _transient(e):
                    raise  # a codec's complaint: Selection reports the region as damaged
                error = _store_error(e, self.url)
                if "access refused" in str(error):
                    raise error from e
                if attempt == self.attempts - 1:
                    raise InputPathError(
                        f"cannot read {self.url} after {self.attempts} attempts "
                        f"({type(e).__name__}: {one_line(e)}); check the network and the "
                        "store's endpoint"
                    ) from e
                time.sleep(_BACKOFF_S * 2**attempt)
        raise AssertionError("unreachable")  # the loop returns or raises


# The libraries under fsspec's filesystems: their errors are about the transfer, not the bytes.
_TRANSFER_MODULES = ("aiohttp", "botocore", "aiobotocore", "fsspec", "s3fs", "gcsfs", "google")


def _transient(e: BaseException) -> bool:
    """A transfer error (connection, timeout, 5xx) that a later attempt may not meet."""
    if isinstance(e, OSError | TimeoutError):
        return True
    return type(e).__module__.split(".")[0] in _TRANSFER_MODULES
