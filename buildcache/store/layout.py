"""
The layout of a cache directory on disk: where object bodies, temporary
files, the lock, the index and the secret live, and the few file
operations every part of the store shares.

Layout of a cache directory::

    index.sqlite        metadata (WAL mode), one row per stored object
    objects/ab/<name>   object bodies, <name> is the sha256 of the cache key
                        and a random part (see :func:`object_name`)
    tmp/                bodies being written, and a few empty files kept
                        ready for the next ones; emptied when the writing
                        store opens
    lock                held (flock) by the one writing store of the directory
    secret              random bytes (mode 0600), made once: the key of the
                        HMACs that name private entries and variants in keys
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil

INDEX_NAME = "index.sqlite"
LOCK_NAME = "lock"
SECRET_NAME = "secret"
OBJECTS = "objects"
TEMP = "tmp"


def object_name(key: str) -> str:
    """
    A new file name for a version of ``key``'s body: the key's digest
    (for the fan-out directory and for people looking) and a random part,
    so a new version never overwrites the file of the row still in force.
    """
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
    return f"{digest}.{secrets.token_hex(6)}"


def file_path(directory: str, name: str) -> str:
    """
    Where the body named ``name`` (an index row's ``file``) lives.
    """
    return os.path.join(directory, OBJECTS, name[:2], name)


def safe_file_path(directory: str, name: str) -> str | None:
    """
    :func:`file_path`, or None for a name that would lead out of
    ``objects/`` (never one the store wrote; an index edited by hand may
    hold one).
    """
    if not name or name.startswith(".") or "/" in name or "\\" in name:
        return None
    return file_path(directory, name)


def temp_directory(directory: str) -> str:
    return os.path.join(directory, TEMP)


def create_temp(path: str) -> int:
    """
    Create the temporary file ``path`` (it must not exist); its descriptor.
    """
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)


def make_directories(directory: str) -> None:
    """
    Create ``objects/`` with its 256 fan-out directories, and ``tmp/``,
    once, so that publishing a body never waits for a ``mkdir``.
    """
    objects = os.path.join(directory, OBJECTS)
    for sub in (objects, temp_directory(directory)):
        os.makedirs(sub, exist_ok=True)
    present = set(os.listdir(objects))
    for prefix in range(256):
        name = f"{prefix:02x}"
        if name not in present:
            os.mkdir(os.path.join(objects, name))


def place_object(directory: str, key: str, temp_path: str) -> str:
    """
    Rename a durable body from ``tmp/`` to a new name for ``key`` under
    ``objects/``; the name.  On failure the body is removed.
    """
    name = object_name(key)
    final = file_path(directory, name)
    try:
        try:
            os.rename(temp_path, final)
        except FileNotFoundError:
            # Its fan-out directory was removed since start-up.
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.rename(temp_path, final)
    except OSError:
        unlink_quietly(temp_path)
        raise
    return name


def unlink_quietly(path: str) -> None:
    """
    Remove the file ``path`` if it is there.
    """
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def remove_foreign(item: os.DirEntry[str]) -> None:
    """
    Remove something in ``objects/`` that no row names (an interrupted
    publish, or debris); a stray directory goes too, being ours by place.
    """
    if item.is_dir(follow_symlinks=False):
        shutil.rmtree(item.path, ignore_errors=True)
    else:
        unlink_quietly(item.path)
