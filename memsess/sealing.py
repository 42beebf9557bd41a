"""Sealed records (``secret_keys=``): every record a store writes is encrypted and
authenticated with AES-256-GCM, bound to its storage key, so that whoever can reach
memcached can neither read a session nor plant, move or alter one.

memcached has no access control: anyone who can reach it can read any item and write
any item. A sealed record (format 4, see memsess.records) holds a whole record — kind,
version, lifetime, serializer and payload — as AEAD ciphertext, the storage key and the
item flags as associated data: a record copied under another session's key does not
open, and neither does a version, tombstone or lifetime not written by a key holder.
Copies moved under the same key (read repair, hinted handoff) stay valid as they are.

Keys rotate: the first of ``secret_keys`` seals, every one of them opens (a record names
its key by a 4-byte id derived from it, never the key). The ``crypto`` extra
(``cryptography``) provides AES-GCM; nothing here is cryptography of our own.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from memsess.records import FLAGS, SEALED_PREFIX, Record, decode_record

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["MIN_KEY_LENGTH", "OVERHEAD", "Sealer", "generate_key"]

#: The shortest secret key accepted: bytes, or characters of a str.
MIN_KEY_LENGTH: Final = 32
# HKDF info labels: a secret key used for anything else never gives the same AEAD key,
# and the key id (which is stored in the clear) is a different derivation from it.
_KEY_INFO: Final = b"memsess v1 record sealing: AES-256-GCM key"
_ID_INFO: Final = b"memsess v1 record sealing: key id"
_ID_SIZE: Final = 4
# A random 96-bit nonce per record (GCM's native size). NIST SP 800-38D bounds random
# nonces to 2**32 encryptions per key: rotate keys well before that many writes.
_NONCE_SIZE: Final = 12
_TAG_SIZE: Final = 16
_ID_END: Final = len(SEALED_PREFIX) + _ID_SIZE
_NONCE_END: Final = _ID_END + _NONCE_SIZE
_FLAGS: Final = FLAGS.to_bytes(4, "big")
#: How much longer a sealed record is than the record it seals, in bytes.
OVERHEAD: Final = _NONCE_END + _TAG_SIZE


def generate_key() -> str:
    """A new secret key for ``secret_keys``: 256 bits from :mod:`secrets`, as 43 URL-safe
    characters (``python -c "import memsess; print(memsess.generate_key())"``)."""
    return secrets.token_urlsafe(32)


class Sealer:
    """Seals records with the first of ``secret_keys`` and opens records sealed with any
    of them. A key is a str of at least 32 characters or bytes of at least 32 bytes,
    random (:func:`generate_key`), not a password: it is not stretched.

    TypeError for ``secret_keys`` that is not a list of str/bytes (one key alone
    included), ValueError for an empty list or a short key, ImportError without the
    ``cryptography`` package. No message ever holds a key or a record's contents."""

    __slots__ = ("_invalid_tag", "_openers", "_sealing", "_sealing_header")

    def __init__(self, secret_keys: Sequence[str | bytes]) -> None:
        materials = _key_materials(secret_keys)
        try:
            from cryptography.exceptions import InvalidTag
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM
            from cryptography.hazmat.primitives.hashes import SHA256
            from cryptography.hazmat.primitives.kdf.hkdf import HKDF
        except ImportError as exc:
            raise ImportError(
                "secret_keys needs the cryptography package: pip install memsess[crypto]"
            ) from exc
        self._invalid_tag = InvalidTag
        self._openers: dict[bytes, list[AESGCM]] = {}
        sealing: tuple[bytes, AESGCM] | None = None
        for material in materials:
            key_id = HKDF(SHA256(), _ID_SIZE, salt=None, info=_ID_INFO).derive(material)
            aead = AESGCM(HKDF(SHA256(), 32, salt=None, info=_KEY_INFO).derive(material))
            # Two keys may share an id (4 bytes): opening then tries each of them.
            self._openers.setdefault(key_id, []).append(aead)
            if sealing is None:
                sealing = key_id, aead
        # _key_materials refused an empty list: the loop above ran, and the first key seals.
        assert sealing is not None  # noqa: S101 - invariant (see above), for the type checker
        self._sealing_header = SEALED_PREFIX + sealing[0]
        self._sealing = sealing[1]

    def seal(self, key: bytes, record: bytes) -> bytes:
        """``record`` (as :func:`memsess.records.encode_record` made it) sealed with
        the first key, to be stored under the memcached key ``key`` and nowhere else."""
        header = self._sealing_header
        nonce = os.urandom(_NONCE_SIZE)
        return header + nonce + self._sealing.encrypt(nonce, record, header + _FLAGS + key)

    def open(self, key: bytes, raw: bytes) -> bytes:
        """The record sealed in ``raw``, as stored under ``key``. ValueError when ``raw``
        is not a sealed record, or does not open with any key: forged, damaged, copied
        from another key, or sealed with a key no longer in ``secret_keys``."""
        if raw[:2] != SEALED_PREFIX:
            raise ValueError(
                "unsealed record, and secret_keys are set: not trusted (written without"
                " secret_keys, or forged)"
            )
        if len(raw) < OVERHEAD:
            raise ValueError(f"sealed record of {len(raw)} bytes is shorter than its header")
        candidates = self._openers.get(raw[len(SEALED_PREFIX) : _ID_END])
        if candidates is None:
            raise ValueError(
                "sealed record with a key that is not in secret_keys (rotated out, or forged)"
            )
        nonce, sealed = raw[_ID_END:_NONCE_END], raw[_NONCE_END:]
        associated = raw[:_ID_END] + _FLAGS + key
        for aead in candidates:
            try:
                return aead.decrypt(nonce, sealed, associated)
            except self._invalid_tag:
                continue
        raise ValueError(
            "sealed record fails authentication: forged, damaged, or moved from another key"
        )

    def open_record(
        self, raw: bytes, flags: int, key: bytes, *, now_us: int | None = None
    ) -> Record:
        """:func:`memsess.records.decode_record` for a store with ``secret_keys``: the
        record sealed in ``raw`` (an item stored under ``key`` with ``flags``); an
        unsealed record is refused. ValueError for anything that is not an intact record
        sealed for ``key``; the payload may still be compressed (see
        :func:`memsess.records.plain_payload`)."""
        if flags != FLAGS:
            raise ValueError(f"foreign item (flags {flags}, expected {FLAGS})")
        return decode_record(self.open(key, raw), flags, now_us=now_us)


def _key_materials(secret_keys: object) -> list[bytes]:
    """The bytes of each key, checked: a list (the first key seals: its order matters)."""
    if isinstance(secret_keys, (str, bytes)) or not isinstance(secret_keys, Sequence):
        raise TypeError(
            "secret_keys must be a list of keys (str or bytes), the first of which seals,"
            f" not {type(secret_keys).__name__}"
        )
    if not secret_keys:
        raise ValueError("secret_keys is empty: give at least one key, or None for no sealing")
    materials = []
    for position, secret in enumerate(secret_keys):
        if isinstance(secret, str):
            unit = "characters"
            material = secret.encode("utf-8")
        elif isinstance(secret, bytes):
            unit = "bytes"
            material = secret
        else:
            raise TypeError(
                f"secret_keys[{position}] must be str or bytes, not {type(secret).__name__}"
            )
        if len(secret) < MIN_KEY_LENGTH:
            raise ValueError(
                f"secret_keys[{position}] is {len(secret)} {unit}, shorter than"
                f" {MIN_KEY_LENGTH}: use memsess.generate_key()"
            )
        materials.append(material)
    return materials
