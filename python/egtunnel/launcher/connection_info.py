"""The report to the gateway: the connection info as EG's version-1 payload, sent to its response address.

The payload is the JSON encrypted with AES-128-ECB under a fresh key, that key encrypted with the
gateway's RSA public key (PKCS#1 v1.5), all base64: what EG's ResponseManager decodes. pycryptodomex,
the library EG itself uses for it, is imported on first use so that the message for a host without
it names the package to install.
"""

from __future__ import annotations

import base64
import json
import socket
import time
from types import SimpleNamespace
from typing import Any, Optional

from .errors import LaunchError
from .logs import log

# The payload layout EG's ResponseManager decodes as "version 1".
PAYLOAD_VERSION = 1
RESPONSE_CONNECT_TIMEOUT = 30.0
RESPONSE_ATTEMPTS = 3


def _crypto() -> Any:
    try:
        from Cryptodome.Cipher import AES, PKCS1_v1_5
        from Cryptodome.PublicKey import RSA
        from Cryptodome.Random import get_random_bytes
        from Cryptodome.Util.Padding import pad
    except ImportError as exc:
        raise LaunchError(
            "pycryptodomex is required to encrypt the connection info for the gateway: "
            "pip install 'egtunnel[launcher]' (or pycryptodomex)"
        ) from exc
    return SimpleNamespace(AES=AES, PKCS1_v1_5=PKCS1_v1_5, RSA=RSA, get_random_bytes=get_random_bytes, pad=pad)


def load_public_key(text: str) -> Any:
    """The gateway's public key: its PEM body, i.e. base64 of the DER, as EG passes it."""
    crypto = _crypto()
    try:
        key = crypto.RSA.import_key(base64.b64decode(text.encode("ascii"), validate=True))
    except (ValueError, IndexError, TypeError, UnicodeEncodeError) as exc:
        raise LaunchError(f"invalid public key: expected the base64 of an RSA public key in DER form ({exc})") from exc
    if key.has_private():
        raise LaunchError("invalid public key: a private key was given")
    return key


def encrypt_connection_info(connection_info: dict[str, Any], public_key: str) -> bytes:
    """EG's version-1 payload for `connection_info`, ready to send to the response address."""
    crypto = _crypto()
    aes_key = crypto.get_random_bytes(16)
    plaintext = json.dumps(connection_info).encode("utf-8")
    encrypted_info = crypto.AES.new(aes_key, crypto.AES.MODE_ECB).encrypt(crypto.pad(plaintext, 16))
    encrypted_key = crypto.PKCS1_v1_5.new(load_public_key(public_key)).encrypt(aes_key)
    payload = {
        "version": PAYLOAD_VERSION,
        "key": base64.b64encode(encrypted_key).decode("ascii"),
        "conn_info": base64.b64encode(encrypted_info).decode("ascii"),
    }
    return base64.b64encode(json.dumps(payload).encode("utf-8"))


def send_to_gateway(address: tuple[str, int], payload: bytes) -> None:
    last_error: Optional[OSError] = None
    for attempt in range(RESPONSE_ATTEMPTS):
        if attempt:
            time.sleep(attempt)
        try:
            with socket.create_connection(address, timeout=RESPONSE_CONNECT_TIMEOUT) as conn:
                conn.sendall(payload)
                # The gateway reads until end of stream before it decodes.
                conn.shutdown(socket.SHUT_WR)
            return
        except OSError as exc:
            last_error = exc
            log.warning("sending the connection info to %s:%s failed (%s)", *address, exc)
    raise LaunchError(
        f"could not send the connection info to the gateway at {address[0]}:{address[1]} "
        f"after {RESPONSE_ATTEMPTS} attempts: {last_error}"
    )
