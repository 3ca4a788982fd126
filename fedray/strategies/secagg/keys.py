"""Key agreement and the end-to-end channel between two clients of a round.

Each client makes two X25519 key pairs per round (Bell et al. follow Bonawitz et al.):
``c`` keys the channel its share envelopes travel on, ``s`` keys its pairwise masks.
Only the ``s`` private key is ever Shamir-shared (to remove a dropped client's masks),
so reconstructing it opens no channel. Everything a pair derives is bound to the round
and to both indices by HKDF-SHA256, so no seed or key is reused across rounds or pairs.
An envelope is ChaCha20-Poly1305 under the channel key, with the round and the sender and
receiver as associated data: a combiner relays bytes it cannot read, and a changed,
replayed or redirected envelope fails to open.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fedray.errors import SecAggError

KEY_BYTES = 32
NONCE_BYTES = 12
MASK_INFO = b"fedray/secagg/v1/mask"
CHANNEL_INFO = b"fedray/secagg/v1/channel"


@dataclass(frozen=True, slots=True)
class KeyPair:
    """Raw X25519 keys (32 bytes each), picklable and comparable."""

    private: bytes
    public: bytes

    @classmethod
    def generate(cls) -> KeyPair:
        key = X25519PrivateKey.generate()
        return cls(key.private_bytes_raw(), public_of(key.private_bytes_raw()))


def public_of(private: bytes) -> bytes:
    key = X25519PrivateKey.from_private_bytes(private)
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _shared(private: bytes, peer_public: bytes) -> bytes:
    try:
        return X25519PrivateKey.from_private_bytes(private).exchange(
            X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:  # a wrong length, or a low-order point (all-zero secret)
        raise SecAggError("bad_key", f"a peer's public key cannot be used ({exc}): that "
                          "client is left out of the round") from None


def _derive(private: bytes, peer_public: bytes, round_id: bytes, info: bytes, a: int,
            b: int) -> bytes:
    lo, hi = sorted((a, b))
    return HKDF(hashes.SHA256(), KEY_BYTES, salt=round_id,
                info=info + lo.to_bytes(4, "big") + hi.to_bytes(4, "big"),
                ).derive(_shared(private, peer_public))


def pair_seed(private: bytes, peer_public: bytes, round_id: bytes, a: int, b: int) -> bytes:
    """The mask seed clients ``a`` and ``b`` share this round (either side gets it)."""
    return _derive(private, peer_public, round_id, MASK_INFO, a, b)


def channel_key(private: bytes, peer_public: bytes, round_id: bytes, a: int, b: int) -> bytes:
    """The key of the channel between clients ``a`` and ``b`` this round."""
    return _derive(private, peer_public, round_id, CHANNEL_INFO, a, b)


def _aad(round_id: bytes, sender: int, receiver: int) -> bytes:
    return round_id + sender.to_bytes(4, "big") + receiver.to_bytes(4, "big")


def seal(key: bytes, round_id: bytes, sender: int, receiver: int, plaintext: bytes) -> bytes:
    """``nonce || ciphertext || tag`` of ``plaintext`` from ``sender`` to ``receiver``."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext,
                                                 _aad(round_id, sender, receiver))


def unseal(key: bytes, round_id: bytes, sender: int, receiver: int, sealed: bytes) -> bytes:
    """The plaintext of an envelope, or SecAggError("tampered") if it is not exactly what
    ``sender`` sealed for ``receiver`` this round."""
    try:
        return ChaCha20Poly1305(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:],
                                             _aad(round_id, sender, receiver))
    except (InvalidTag, ValueError):
        raise SecAggError("tampered", f"the envelope from client {sender} to {receiver} does "
                          "not open: it was altered, replayed or redirected in transit; "
                          "that share is ignored") from None
