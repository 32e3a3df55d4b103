"""Feishu callback cryptography: AES-256-CBC body decryption and request signature checks."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes


class DecryptError(ValueError):
    """The ``encrypt`` field is not valid ciphertext for our key."""


class AESCipher:
    """Decrypts (and, for tests and fakes, encrypts) Feishu's ``encrypt`` bodies.

    Key = SHA-256 of the Encrypt Key; the first 16 bytes of the decoded data are the IV;
    PKCS7 padding.
    """

    __slots__ = ("_key",)

    def __init__(self, encrypt_key: str) -> None:
        self._key = hashlib.sha256(encrypt_key.encode()).digest()

    def __repr__(self) -> str:
        return "AESCipher(key='***')"

    def decrypt(self, data: str) -> bytes:
        """Decrypt base64 ``data`` into the plain JSON bytes.

        Raises:
            DecryptError: bad base64, bad length, or bad padding.
        """
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise DecryptError("encrypt is not base64") from None
        if len(raw) < 32 or len(raw) % 16:
            raise DecryptError("encrypt has a bad length")
        decryptor = Cipher(algorithms.AES(self._key), modes.CBC(raw[:16])).decryptor()
        padded = decryptor.update(raw[16:]) + decryptor.finalize()
        unpadder = padding.PKCS7(128).unpadder()
        try:
            return unpadder.update(padded) + unpadder.finalize()
        except ValueError:
            raise DecryptError("encrypt has bad padding (wrong key?)") from None

    def encrypt(self, plain: bytes, iv: bytes) -> str:
        """Encrypt ``plain`` with a given 16-byte IV (for fakes and tests)."""
        padder = padding.PKCS7(128).padder()
        padded = padder.update(plain) + padder.finalize()
        encryptor = Cipher(algorithms.AES(self._key), modes.CBC(iv)).encryptor()
        return base64.b64encode(iv + encryptor.update(padded) + encryptor.finalize()).decode()


def signature(timestamp: str, nonce: str, encrypt_key: str, body: bytes) -> str:
    """Feishu's ``X-Lark-Signature``: hex SHA-256 of timestamp + nonce + encrypt key + raw body."""
    h = hashlib.sha256()
    h.update((timestamp + nonce + encrypt_key).encode())
    h.update(body)
    return h.hexdigest()


def verify_signature(
    timestamp: str, nonce: str, encrypt_key: str, body: bytes, received: str
) -> bool:
    """Whether ``received`` is the right signature, compared in constant time."""
    expected = signature(timestamp, nonce, encrypt_key, body)
    return hmac.compare_digest(expected.encode(), received.strip().lower().encode())


def same_secret(a: str, b: str) -> bool:
    """Constant-time comparison of two secrets (verification tokens)."""
    # surrogatepass: a hostile token with a lone surrogate compares unequal instead of raising.
    return hmac.compare_digest(
        a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass")
    )
