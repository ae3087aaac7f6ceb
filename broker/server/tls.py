"""TLS on the listening socket: the server's SSLContext, loaded from `tls_cert_file` and
`tls_key_file`, and loaded again in place (SIGHUP) so that new handshakes get the new
certificate while open connections go on with the one they negotiated.

Every failure is a ConfigError that names the setting and the file, at startup and on reload.
"""

from __future__ import annotations

import hashlib
import re
import ssl
from typing import NamedTuple

from ..config import Config
from ..errors import ConfigError

_CERT_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n(.+?)-----END CERTIFICATE-----", re.DOTALL)
_KEY_BLOCK = re.compile(rb"-----BEGIN ((?:RSA |EC |DSA |ENCRYPTED )?PRIVATE KEY)-----")


class Certificate(NamedTuple):
    """What a context was loaded with: the files, and the SHA-256 fingerprint of the server's
    own certificate (the first of the chain), as `openssl x509 -fingerprint -sha256` shows it
    and as a client sees it (`getpeercert(binary_form=True)`)."""

    cert_file: str
    key_file: str
    sha256: str


def new_context() -> ssl.SSLContext:
    """A server context without a certificate: TLS 1.2 or 1.3, forward secrecy and AEAD ciphers
    only (TLS 1.3's suites; for TLS 1.2, ECDHE with AES-GCM or ChaCha20-Poly1305: no CBC suites),
    the client choosing among them, no compression, no renegotiation, ALPN http/1.1 (a
    WebSocket upgrade is an HTTP/1.1 request)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL")
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.set_alpn_protocols(["http/1.1"])
    return context


def server_context(config: Config) -> tuple[ssl.SSLContext, Certificate]:
    """The context to listen with, loaded from the settings; raises ConfigError."""
    context = new_context()
    return context, _load(context, config)


def reload(context: ssl.SSLContext, config: Config) -> Certificate:
    """Load the certificate chain and key into `context` again, from the same settings; raises
    ConfigError and then leaves `context` as it was.

    The files are first loaded into a scratch context: OpenSSL puts a new certificate in place
    before it reads the key, and drops the old key when it does not match, so a key that fails
    to load would leave the live context with the new certificate and no key at all. Only
    files that load cleanly are loaded into the live one. (Replace the files with a rename and
    signal afterwards: files rewritten between the two loads are not guarded against.)"""
    _load(new_context(), config)
    return _load(context, config)


def _load(context: ssl.SSLContext, config: Config) -> Certificate:
    cert_file = config.tls_cert_file
    key_file = config.tls_key_file or cert_file
    key_setting = "tls_key_file" if config.tls_key_file else "tls_cert_file"
    cert_pem = _read("tls_cert_file", cert_file)
    blocks = _CERT_BLOCK.findall(cert_pem)
    if not blocks:
        raise ConfigError(f"tls_cert_file: {cert_file} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    key_pem = cert_pem if key_file == cert_file else _read(key_setting, key_file)
    key = _KEY_BLOCK.search(key_pem)
    if key is None:
        if config.tls_key_file:
            raise ConfigError(f"tls_key_file: {key_file} holds no PEM private key (-----BEGIN PRIVATE KEY-----)")
        raise ConfigError(f"tls_cert_file: {cert_file} holds no private key; add it to the file or set tls_key_file")
    if key.group(1) == b"ENCRYPTED PRIVATE KEY" or b"Proc-Type: 4,ENCRYPTED" in key_pem:
        raise _encrypted(key_setting, key_file)

    def no_password() -> bytes:
        raise _encrypted(key_setting, key_file)

    try:
        context.load_cert_chain(cert_file, key_file, password=no_password)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"{key_setting}: the private key in {key_file} does not belong to the certificate in {cert_file}") from None
        raise ConfigError(
            f"tls_cert_file: cannot use the certificate chain in {cert_file} with the key in {key_file}: {_why(exc)}"
        ) from None
    except OSError as exc:  # replaced or removed since it was read
        raise ConfigError(f"tls_cert_file: cannot read {cert_file} or {key_file}: {exc.strerror or exc}") from None
    der = ssl.PEM_cert_to_DER_cert(blocks[0].join((b"-----BEGIN CERTIFICATE-----\n", b"-----END CERTIFICATE-----\n")).decode("ascii"))
    return Certificate(cert_file, key_file, hashlib.sha256(der).hexdigest())


def _read(setting: str, path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path}: {exc.strerror or exc}") from None


def _encrypted(setting: str, path: str) -> ConfigError:
    return ConfigError(
        f"{setting}: the private key in {path} is encrypted and the broker takes no passphrase; "
        "store it unencrypted, readable by the broker's user only"
    )


def _why(exc: ssl.SSLError) -> str:
    """OpenSSL's reason without the `(_ssl.c:NNNN)` suffix."""
    text = re.sub(r"\s*\(_ssl\.c:\d+\)$", "", exc.strerror or str(exc))
    return "not a valid PEM certificate chain and private key" if text.endswith("PEM lib") else text
