"""WeCom crypto core: documented algorithm, round trips, and hostile ciphertexts."""

from __future__ import annotations

import base64
import struct

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given
from hypothesis import strategies as st

from adapters.wecom.crypto import CryptoError, WeComCrypto, decode_aes_key, msg_signature
from tests.adapters.wecom.fake_wecom import (
    AES_KEY,
    CORP_ID,
    TOKEN,
    doc_encrypt,
    doc_signature,
)

CRYPTO = WeComCrypto(TOKEN, AES_KEY, CORP_ID)
KEY = base64.b64decode(AES_KEY + "=")


def raw_encrypt(plain_blocks: bytes) -> str:
    """AES-CBC with WeCom's key and IV over bytes that are already a multiple of 16."""
    enc = Cipher(algorithms.AES(KEY), modes.CBC(KEY[:16])).encryptor()
    return base64.b64encode(enc.update(plain_blocks) + enc.finalize()).decode()


def test_signature_is_sha1_of_the_sorted_concatenation() -> None:
    # sorted("tok", "1409659813", "nonce", "cipher") -> "1409659813" "cipher" "nonce" "tok"
    import hashlib

    expected = hashlib.sha1(b"1409659813ciphernoncetok").hexdigest()
    assert msg_signature("tok", "1409659813", "nonce", "cipher") == expected
    assert doc_signature("tok", "1409659813", "nonce", "cipher") == expected


def test_the_url_check_vector_published_with_wechatpy() -> None:
    """An echostr signed and encrypted by WeCom, from wechatpy's WeCom crypto tests."""
    crypto = WeComCrypto(
        "123456", "kWxPEV2UEDyxWpmPdKC3F4dgPDmOvfKX1HGnEUDS1aR", "wx49f0ab532d5d035a"
    )
    echostr = (
        "4ByGGj+sVCYcvGeQYhaKIk1o0pQRNbRjxybjTGblXrBaXlTXeOo1+bXFXDQQb1o6co6Yh9Bv41n7hOchLF6p+Q=="
    )
    crypto.verify("dd6b9c95b495b3f7e2901bfbc76c664930ffdb96", "1411443780", "437374425", echostr)
    assert crypto.decrypt(echostr) == b"5927782489442352469"
    with pytest.raises(CryptoError):  # one digit of the nonce changed
        crypto.verify(
            "dd6b9c95b495b3f7e2901bfbc76c664930ffdb96", "1411443780", "437374424", echostr
        )


def test_decrypts_what_the_documented_algorithm_encrypts() -> None:
    message = "<xml><MsgType><![CDATA[text]]></MsgType><Content>你好</Content></xml>".encode()
    assert CRYPTO.decrypt(doc_encrypt(message)) == message


def test_verify_accepts_the_right_signature_and_refuses_others() -> None:
    enc = doc_encrypt(b"x")
    CRYPTO.verify(doc_signature(TOKEN, "1", "n", enc), "1", "n", enc)
    CRYPTO.verify(doc_signature(TOKEN, "1", "n", enc).upper(), "1", "n", enc)
    with pytest.raises(CryptoError, match="does not match"):
        CRYPTO.verify(doc_signature("other-token", "1", "n", enc), "1", "n", enc)
    with pytest.raises(CryptoError):
        CRYPTO.verify("\udcff" * 40, "1", "n", enc)  # a lone surrogate is just a mismatch


@given(st.binary(max_size=3000), st.binary(min_size=16, max_size=16))
def test_round_trip(message: bytes, prefix: bytes) -> None:
    assert CRYPTO.decrypt(CRYPTO.encrypt(message, prefix)) == message


@given(st.text(max_size=400))
def test_garbage_ciphertext_raises_a_clear_error(text: str) -> None:
    with pytest.raises(CryptoError) as info:
        CRYPTO.decrypt(text)  # to decrypt, a random text would have to carry our corp id
    assert str(info.value)


@given(st.binary(min_size=1, max_size=40).map(lambda b: b * (1 + 64 // len(b))))
def test_random_blocks_never_crash(data: bytes) -> None:
    blocks = data[: len(data) - len(data) % 16] or bytes(16)
    with pytest.raises(CryptoError):
        CRYPTO.decrypt(raw_encrypt(blocks))


@given(st.integers(min_value=1, max_value=200))
def test_truncated_ciphertext_raises(cut: int) -> None:
    good = base64.b64decode(CRYPTO.encrypt(b"<xml>" + b"a" * 100 + b"</xml>"))
    short = good[: max(0, len(good) - cut)]
    with pytest.raises(CryptoError):
        CRYPTO.decrypt(base64.b64encode(short).decode())


@pytest.mark.parametrize("pad", [0, 33, 200])
def test_bad_padding_raises(pad: int) -> None:
    body = bytes(16) + struct.pack(">I", 1) + b"x" + CORP_ID.encode()
    body += bytes([pad]) * (32 - len(body) % 32)
    body = body[:-1] + bytes([pad])
    with pytest.raises(CryptoError, match="padding"):
        CRYPTO.decrypt(raw_encrypt(body))


def test_inconsistent_padding_bytes_raise() -> None:
    body = bytes(16) + struct.pack(">I", 1) + b"x" + CORP_ID.encode()
    pad = 32 - len(body) % 32
    body += bytes([pad - 1]) * (pad - 1) + bytes([pad])
    with pytest.raises(CryptoError, match="padding"):
        CRYPTO.decrypt(raw_encrypt(body))


def test_length_field_beyond_the_plaintext_raises() -> None:
    body = bytes(16) + struct.pack(">I", 10_000) + b"x" + CORP_ID.encode()
    pad = 32 - len(body) % 32
    with pytest.raises(CryptoError, match="length"):
        CRYPTO.decrypt(raw_encrypt(body + bytes([pad]) * pad))


def test_another_corp_id_is_refused() -> None:
    foreign = doc_encrypt(b"<xml/>", receive_id="ww_someone_else")
    with pytest.raises(CryptoError, match="receive id"):
        CRYPTO.decrypt(foreign)


def test_another_key_is_refused() -> None:
    other = "Z" * 42 + "A"
    with pytest.raises(CryptoError):
        CRYPTO.decrypt(doc_encrypt(b"<xml/>", aes_key=other))


@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("short", "43 characters"),
        ("a" * 44, "43 characters"),
        ("!" * 43, "not base64"),
    ],
)
def test_aes_key_validation_names_no_key(key: str, why: str) -> None:
    with pytest.raises(CryptoError, match=why) as info:
        decode_aes_key(key)
    assert key not in str(info.value)


def test_valid_aes_key_gives_32_bytes_and_repr_hides_secrets() -> None:
    assert len(decode_aes_key(AES_KEY)) == 32
    assert TOKEN not in repr(CRYPTO) and AES_KEY not in repr(CRYPTO)
