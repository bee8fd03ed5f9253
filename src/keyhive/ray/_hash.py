"""The stable shard hash: which shard host serves a key.

The hash is taken over the canonical storage-key encoding of ``(manager, partition, key)``
(``keyhive._keys.storage_key``), with blake2b: the same in every process and every Python
run, unlike the salted builtin ``hash()``.
"""

from __future__ import annotations

import hashlib
from typing import Any

from .._keys import check_key, storage_key

__all__ = ["shard_of"]


def shard_of(manager: str, partition: Any, key: Any, shards: int) -> int:
    """The index (``0 <= i < shards``) of the shard that serves ``key``.

    Raises:
        TypeError, ValueError: the key (or partition) is not a valid keyhive key.
    """
    check_key(key)
    if partition is not None:
        check_key(partition, "partition")
    digest = hashlib.blake2b(storage_key(manager, partition, key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards
