"""TLS contexts and the self-signed certificate for demos and first starts."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from gateway.errors import StartupError
from gateway.filemodes import check_private_file


def server_context(cert: Path, key: Path, label: str = "public") -> ssl.SSLContext:
    """A TLS 1.2+ server context. Raises StartupError naming the config key and file at fault (also for a key
    that is not the gateway's own or that group or others may access)."""
    missing = []  # both files at once, so an operator missing both fixes both in one go
    for key_name, path in ((f"{label}.tls_cert", cert), (f"{label}.tls_key", key)):
        if not path.is_file():
            missing.append(f"{key_name}: file not found: {str(path)!r}")
        elif not os.access(path, os.R_OK):
            missing.append(f"{key_name}: file not readable: {str(path)!r}")
    if missing:
        raise StartupError("; ".join(missing), problems=missing)
    check_private_file(key, f"{label}.tls_key", "TLS key")  # the certificate is public; the key is not
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # TLS 1.2 with forward secrecy and AEAD only (no CBC, no RSA key exchange); TLS 1.3 suites are all AEAD.
    ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as exc:
        raise StartupError(f"cannot load TLS certificate {str(cert)!r} with key {str(key)!r}: {exc}") from None
    return ctx


def write_self_signed(cert: Path, key: Path, names: list[str], *, rsa_key: bool = False) -> None:
    """Write a self-signed ECDSA certificate for `names` (DNS names or IPs). Key file mode 0600.
    `rsa_key`: RSA 2048 instead (xrdp reads no EC keys)."""
    pkey: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048) if rsa_key else ec.generate_private_key(ec.SECP256R1())
    )
    now = dt.datetime.now(dt.UTC)
    alt: list[x509.GeneralName] = []
    for n in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            alt.append(x509.DNSName(n))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else "bastion")])
    crt = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(pkey.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(pkey, hashes.SHA256())
    )
    key.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pkey.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    cert.write_bytes(crt.public_bytes(serialization.Encoding.PEM))
