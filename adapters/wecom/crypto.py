"""WeCom callback cryptography without I/O: ``msg_signature`` and the AES-256-CBC envelope.

WeCom signs every callback with SHA-1 over the sorted concatenation of the callback Token, the
timestamp, the nonce and the ciphertext, and encrypts the payload with a key derived from the
43-character EncodingAESKey: key = base64(EncodingAESKey + "="), IV = key[:16], PKCS#7 padding to
32-byte blocks, plaintext = 16 random bytes + 4-byte big-endian length + message + receive id
(the CorpID for a self-built app).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import struct

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

BLOCK = 32
AES_KEY_CHARS = 43


class CryptoError(ValueError):
    """A callback could not be verified or decrypted; the message names no secret."""


def decode_aes_key(encoding_aes_key: str) -> bytes:
    """The 32-byte AES key of an EncodingAESKey.

    Raises:
        CryptoError: not 43 characters of base64 that decode to 32 bytes (the key is not echoed).
    """
    if len(encoding_aes_key) != AES_KEY_CHARS:
        raise CryptoError(f"EncodingAESKey must be {AES_KEY_CHARS} characters")
    try:
        key = base64.b64decode(encoding_aes_key + "=", validate=True)
    except (binascii.Error, ValueError):
        raise CryptoError("EncodingAESKey is not base64") from None
    if len(key) != 32:
        raise CryptoError("EncodingAESKey does not decode to 32 bytes")
    return key


def msg_signature(token: str, timestamp: str, nonce: str, encrypted: str) -> str:
    """WeCom's ``msg_signature``: hex SHA-1 of the four strings sorted and concatenated."""
    parts = sorted([token, timestamp, nonce, encrypted])
    return hashlib.sha1("".join(parts).encode("utf-8", "surrogatepass")).hexdigest()


class WeComCrypto:
    """Verifies, decrypts and (for fakes and tests) encrypts one app's callbacks."""

    __slots__ = ("_key", "_receive_id", "_token")

    def __init__(self, token: str, encoding_aes_key: str, receive_id: str) -> None:
        self._token = token
        self._key = decode_aes_key(encoding_aes_key)
        self._receive_id = receive_id.encode()

    def __repr__(self) -> str:
        return "WeComCrypto(secrets='***')"

    def verify(self, signature: str, timestamp: str, nonce: str, encrypted: str) -> None:
        """Check ``msg_signature`` in constant time.

        Raises:
            CryptoError: the signature does not match.
        """
        expected = msg_signature(self._token, timestamp, nonce, encrypted)
        got = signature.strip().lower().encode("utf-8", "surrogatepass")
        if not hmac.compare_digest(expected.encode(), got):
            raise CryptoError("msg_signature does not match")

    def decrypt(self, encrypted: str) -> bytes:
        """The message inside ``encrypted`` (base64), after checking padding, length and corp id.

        Raises:
            CryptoError: bad base64, bad length, bad padding, bad length field or foreign corp id.
        """
        try:
            raw = base64.b64decode(encrypted, validate=True)
        except (binascii.Error, ValueError):
            raise CryptoError("ciphertext is not base64") from None
        if not raw or len(raw) % 16:
            raise CryptoError("ciphertext has a bad length")
        decryptor = Cipher(algorithms.AES(self._key), modes.CBC(self._key[:16])).decryptor()
        plain = decryptor.update(raw) + decryptor.finalize()
        pad = plain[-1]
        if not 1 <= pad <= BLOCK or pad > len(plain) or plain[-pad:] != bytes([pad]) * pad:
            raise CryptoError("ciphertext has bad padding (wrong EncodingAESKey?)")
        content = plain[16:-pad]
        if len(content) < 4:
            raise CryptoError("plaintext is too short")
        (length,) = struct.unpack(">I", content[:4])
        if length > len(content) - 4:
            raise CryptoError("plaintext length field is out of range")
        message = content[4 : 4 + length]
        if not hmac.compare_digest(content[4 + length :], self._receive_id):
            raise CryptoError("receive id does not match the corp id")
        return message

    def encrypt(self, message: bytes, random16: bytes | None = None) -> str:
        """Encrypt ``message`` for this corp (base64), as WeCom does; for fakes and tests."""
        prefix = random16 if random16 is not None else os.urandom(16)
        if len(prefix) != 16:
            raise ValueError("random16 must be 16 bytes")
        body = prefix + struct.pack(">I", len(message)) + message + self._receive_id
        pad = BLOCK - len(body) % BLOCK
        body += bytes([pad]) * pad
        encryptor = Cipher(algorithms.AES(self._key), modes.CBC(self._key[:16])).encryptor()
        return base64.b64encode(encryptor.update(body) + encryptor.finalize()).decode()

    def sign(self, timestamp: str, nonce: str, encrypted: str) -> str:
        """The ``msg_signature`` for ``encrypted`` with this app's Token."""
        return msg_signature(self._token, timestamp, nonce, encrypted)
