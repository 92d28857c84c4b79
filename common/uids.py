"""UIDs that depend only on what they name, so that rebuilding an object gives the same object.

Used for every UID the project makes (outputs and phantoms): a random UID generator would make a
re-delivered output or a re-generated phantom a different object.
"""

from __future__ import annotations

import hashlib
import json

_NAMESPACE = "hrct-triage/output-uid/v1"  # bump only if the derivation itself changes
_MAX_UID_LENGTH = 64  # DICOM PS3.5 9.1


def derive_uid(*parts: str) -> str:
    """Return a ``2.25.<decimal UUID>`` UID that depends on ``parts`` and nothing else.

    The parts are JSON-encoded as a list, so ``("a", "bc")`` and ``("ab", "c")`` differ. The
    first 128 bits of their SHA-256 become an RFC 9562 version-8 (name-based, custom hash) UUID,
    which PS3.5 B.2 allows under the ``2.25`` root; the result has at most 44 characters.
    """
    if not parts:
        raise ValueError("parts: at least one part is needed")
    for i, part in enumerate(parts):
        if not isinstance(part, str):
            raise ValueError(f"parts[{i}]: expected str, got {type(part).__name__}")
    payload = json.dumps([_NAMESPACE, *parts], ensure_ascii=True).encode("ascii")
    value = int.from_bytes(hashlib.sha256(payload).digest()[:16], "big")
    value = (value & ~(0xF << 76)) | (0x8 << 76)  # version 8
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 9562 variant
    uid = f"2.25.{value}"
    assert len(uid) <= _MAX_UID_LENGTH
    return uid
