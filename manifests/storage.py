"""Object storage through fsspec: local paths, ``file://``, ``s3://``, ``gs://``, ``memory://``.

One place for URL joining and atomic writes, so that every writer (manifests, results, images, LoRA registry)
behaves the same on a laptop folder and on S3. S3-compatible endpoints (MinIO, moto) are configured the usual
way, through the environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), so the same command runs
unchanged against a laptop folder, a local S3 server or AWS.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


def filesystem(uri: str, **storage_options: Any) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for ``uri``."""
    fs, path = fsspec.core.url_to_fs(str(uri), **storage_options)
    return fs, path


def join(uri: str, *parts: str) -> str:
    """Join URL or path segments with '/' (never os.sep: keys on object stores use '/')."""
    out = str(uri).rstrip("/")
    for part in parts:
        out = f"{out}/{str(part).strip('/')}"
    return out


def parent(uri: str) -> str:
    """The folder holding ``uri``: an absolute path for local paths, ``scheme://bucket/dir`` for URLs."""
    uri = str(uri)
    if "://" not in uri:
        return os.path.dirname(os.path.abspath(uri))
    scheme, rest = uri.split("://", 1)
    rest = rest.rstrip("/")
    return f"{scheme}://{rest.rsplit('/', 1)[0]}" if "/" in rest else f"{scheme}://"


def is_relative(path: str) -> bool:
    """True for a relative local path (no ``scheme://``, not absolute)."""
    path = str(path)
    return bool(path) and "://" not in path and not os.path.isabs(path) and not path.startswith("~")


def resolve(base_folder: str, path: str) -> str:
    """``path`` resolved against ``base_folder`` when it is a relative local path; unchanged otherwise."""
    if not is_relative(path):
        return path
    if "://" not in str(base_folder):
        return os.path.normpath(os.path.join(os.path.abspath(base_folder), path))
    scheme, rest = str(base_folder).split("://", 1)
    joined = posixpath.normpath(posixpath.join(rest, path))
    return f"{scheme}://{joined if rest.startswith('/') else joined.lstrip('/')}"


def absolute(uri: str) -> str:
    """``uri`` as it means the same from any folder and any process: a local path made absolute (``~`` expanded),
    ``file://`` and other URLs unchanged. Resolve user paths with this before they cross into Ray."""
    uri = str(uri)
    if "://" in uri:
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def is_local(uri: str) -> bool:
    return isinstance(filesystem(uri)[0], LocalFileSystem)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write ``data`` so that readers never see a partial object.

    Local files: write a temporary sibling, then rename over the target. Object stores: a single PUT is atomic.
    """
    fs, path = filesystem(uri)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if isinstance(fs, LocalFileSystem):
        if parent:
            os.makedirs(parent, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:  # object stores have no folders: nothing to create (and a missing bucket is never created by a write)
        fs.pipe_file(path, data)


def remove_temporaries(folder: str) -> list[str]:
    """Delete what a killed writer left behind under the local folder ``folder`` (its ``*.tmp-*`` files, at any
    depth); returns their paths. Call it only where no live writer can be at work. Object stores: nothing (a PUT
    leaves no temporary)."""
    fs, path = filesystem(folder)
    if not isinstance(fs, LocalFileSystem) or not os.path.isdir(path):
        return []
    found = [os.path.join(d, f) for d, _, files in os.walk(path) for f in files if ".tmp-" in f]
    for p in found:
        try:
            os.remove(p)
        except FileNotFoundError:
            pass
    return found


def remove(uri: str) -> None:
    """Delete the file at ``uri``; nothing happens when there is none."""
    fs, path = filesystem(uri)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


BUCKET_STORES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")


def check_bucket(uri: str, create: bool = False) -> None:
    """For an object-store ``uri``: its bucket must exist (``FileNotFoundError`` naming it), unless ``create``, which
    creates it. A typo in a bucket name then fails at once instead of creating a new bucket. Other URIs: nothing."""
    if "://" not in str(uri):
        return
    scheme = str(uri).split("://", 1)[0].lower()
    if scheme not in BUCKET_STORES:
        return
    fs, path = filesystem(uri)
    bucket = path.strip("/").split("/", 1)[0]
    fs.invalidate_cache(bucket)
    try:  # not exists(): it answers False for an unreachable store too, which would blame a good bucket name
        fs.info(bucket)
        return
    except FileNotFoundError:
        pass
    if not create:
        raise FileNotFoundError(f"{uri}: bucket {bucket!r} does not exist; create it, or pass --create-bucket")
    fs.mkdir(bucket)


def href(uri: str, base: str) -> str:
    """``uri`` as a link from a page in folder ``base``: relative under ``base`` or between local paths, else the
    store URL unchanged."""
    root = str(base).rstrip("/")
    if uri.startswith(root + "/"):
        return uri[len(root) + 1:]
    if "://" not in uri and "://" not in root:
        return os.path.relpath(uri, root)
    return uri


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Full URIs of the files directly under ``uri`` ending in ``suffix`` (empty list if the folder is absent)."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return []
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    out = []
    for p in sorted(fs.ls(path, detail=False)):
        name = p.rsplit("/", 1)[-1]
        if name.endswith(suffix) and ".tmp-" not in name:
            out.append(p if protocol in ("file", "local") else f"{protocol}://{p}")
    return out

