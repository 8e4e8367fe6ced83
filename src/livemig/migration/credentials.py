"""Credentials of authenticated migration endpoints: a pre-shared key, or mutual TLS.

Python's ssl module has no TLS-PSK, so a pre-shared key is not given to TLS: the engine uses it
for an HMAC challenge-response in its hello. This module only makes and checks the key file.
Mutual TLS uses a directory holding `ca.pem` (the CA that signs every peer), `cert.pem` (this
endpoint's certificate) and `key.pem` (its private key); `server_context` and `client_context`
turn it into `ssl.SSLContext`s. `make_tls_dir` makes such directories for demos and tests.

Every refusal is a `CredentialError` whose message is one line that names the file and says
what is wrong with it, meant for the user as is.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from livemig.migration.errors import MigrationError

KEY_SIZE = 32  # bytes of a pre-shared key: 256 bits, the HMAC-SHA256 key size
_KEY_HEX = 2 * KEY_SIZE
_KEY_FILE_LIMIT = 4096  # a key file is 65 bytes; anything this large is not one

CA_FILE, CERT_FILE, KEY_FILE, CA_KEY_FILE = "ca.pem", "cert.pem", "key.pem", "ca-key.pem"
_BEFORE = datetime.timedelta(days=1)  # tolerates clocks a little behind the one that signed
_LIFETIME = datetime.timedelta(days=3650)


class CredentialError(MigrationError):
    """A key file or TLS directory cannot be used; the message names the file and the problem."""


# ---------------------------------------------------------------- pre-shared key


def write_key(path: str) -> None:
    """Write a new random pre-shared key to `path`: 64 lowercase hex digits and a newline,
    mode 0600. Never overwrites: an existing path is refused."""
    text = (os.urandom(KEY_SIZE).hex() + "\n").encode()
    _write_new(Path(path), text, 0o600, "key file")


def load_key(path: str) -> bytes:
    """Read the pre-shared key in `path`, refusing any file that would make it weak: missing,
    not a regular file, open to group or others, not exactly 64 hex digits, or all zero."""
    raw = _read_private(Path(path), "key file", _KEY_FILE_LIMIT + 1)
    text = raw.decode("ascii", errors="replace").strip()
    if len(raw) > _KEY_FILE_LIMIT or len(text) != _KEY_HEX or not _is_hex(text):
        raise CredentialError(f"key file {path} does not hold a key: expected {_KEY_HEX} hex "
                              f"digits (make one with `livemig keygen {path}`)")
    key = bytes.fromhex(text)
    if not any(key):
        raise CredentialError(f"key file {path} holds an all-zero key: make a random one with "
                              f"`livemig keygen`")
    return key


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in text)


# ---------------------------------------------------------------- files


def _write_new(path: Path, data: bytes, mode: int, what: str) -> None:
    """Create `path` with `data`; O_EXCL so that an existing file (or a symlink planted in its
    place) is never overwritten or followed."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except FileExistsError:
        raise CredentialError(f"{what} {path} already exists: remove it or choose another "
                              f"path") from None
    except OSError as e:
        raise CredentialError(f"{what} {path}: cannot create it ({_os_reason(e)})") from e
    try:
        os.fchmod(fd, mode)  # the umask may have taken bits away; it must not decide
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except OSError as e:
        raise CredentialError(f"{what} {path}: cannot write it ({_os_reason(e)})") from e


def _read_private(path: Path, what: str, limit: int) -> bytes:
    """Read at most `limit` bytes of a secret file, refusing it unless it is a regular file
    that only its owner can read or write. The checks use the opened file, not the path, so
    that the file read is the file checked."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CredentialError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise CredentialError(f"{what} {path}: cannot open it ({_os_reason(e)})") from e
    try:
        _check_private(path, os.fstat(fd), what)
        return os.read(fd, limit)
    except OSError as e:
        raise CredentialError(f"{what} {path}: cannot read it ({_os_reason(e)})") from e
    finally:
        os.close(fd)


def _check_private(path: Path, st: os.stat_result, what: str) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise CredentialError(f"{what} {path} is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise CredentialError(f"{what} {path} is not a regular file")
    # a secret that others can read is no longer a secret; one they can write is theirs
    if st.st_mode & 0o077:
        raise CredentialError(f"{what} {path} is open to group or others "
                              f"(mode {stat.S_IMODE(st.st_mode):04o}): chmod 600 {path}")


def _os_reason(e: OSError) -> str:
    return e.strerror or str(e)


# ---------------------------------------------------------------- mutual TLS


@dataclass(frozen=True)
class TlsFiles:
    """The three files of a mutual-TLS endpoint, as found by `load_tls_dir`."""

    ca: Path  # the CA certificate(s) that sign every accepted peer
    cert: Path  # this endpoint's certificate (optionally followed by intermediates)
    key: Path  # this endpoint's private key, unencrypted, mode 0600


def load_tls_dir(path: str) -> TlsFiles:
    """Find and check the TLS files of an endpoint in directory `path`: every file present,
    `key.pem` private to its owner, and all of them loadable into both contexts."""
    d = Path(path)
    if not d.exists():
        raise CredentialError(f"TLS directory {d} does not exist "
                              f"(make one with `livemig tls-gen {d}`)")
    if not d.is_dir():
        raise CredentialError(f"TLS directory {d} is not a directory")
    files = TlsFiles(d / CA_FILE, d / CERT_FILE, d / KEY_FILE)
    for f, what in ((files.ca, "CA certificate"), (files.cert, "certificate"),
                    (files.key, "private key")):
        if not f.exists():
            raise CredentialError(f"{what} {f} is missing from TLS directory {d}")
        if not f.is_file():
            raise CredentialError(f"{what} {f} is not a regular file")
    _read_private(files.key, "private key", 0)
    # building the contexts is the check that every PEM parses and that key matches cert
    server_context(files)
    client_context(files)
    return files


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """A TLS 1.3 server context that presents `files.cert` and accepts only clients whose
    certificate is signed by `files.ca`; a client with no certificate is refused."""
    return _context(ssl.PROTOCOL_TLS_SERVER, files)


def client_context(files: TlsFiles) -> ssl.SSLContext:
    """A TLS 1.3 client context that presents `files.cert` and accepts only servers whose
    certificate is signed by `files.ca`.

    Host names are not checked, by design: the CA in `ca.pem` exists only to sign migration
    endpoints, so being signed by it is the identity, as with QEMU's tls-creds with
    verify-peer. Hosts are often reached by an address that no certificate names (a
    migration network, a namespace, a NAT), and a name check would add nothing that the
    private CA does not already decide.

    With TLS 1.3 the server checks the client's certificate after the client has finished
    its handshake: a refused client learns it on its first read, from an SSLError (alert
    "unknown ca"), so a client must read the server's first record before trusting it.
    """
    return _context(ssl.PROTOCOL_TLS_CLIENT, files)


def _context(protocol: int, files: TlsFiles) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if protocol == ssl.PROTOCOL_TLS_CLIENT:
        ctx.check_hostname = False  # see client_context: the private CA is the identity
    ctx.verify_mode = ssl.CERT_REQUIRED
    # only ca.pem is trusted: no load_default_certs, so no public CA can vouch for a peer
    try:
        ctx.load_verify_locations(cafile=str(files.ca))
    except (ssl.SSLError, OSError) as e:
        raise CredentialError(f"CA certificate {files.ca}: cannot load it "
                              f"({_ssl_reason(e)})") from e
    try:
        ctx.load_cert_chain(str(files.cert), str(files.key), password=_no_password(files.key))
    except CredentialError:
        raise
    except (ssl.SSLError, OSError) as e:
        raise _chain_error(files, e) from e
    return ctx


def _no_password(key: Path) -> Callable[[], bytes]:
    """A password callback that refuses: without one, OpenSSL would prompt on the terminal
    for the password of an encrypted key, which a migration must never wait for."""
    def refuse() -> bytes:
        raise CredentialError(f"private key {key} is encrypted: livemig needs it unencrypted, "
                              f"with mode 0600")
    return refuse


def _chain_error(files: TlsFiles, e: ssl.SSLError | OSError) -> CredentialError:
    """Say which of cert.pem and key.pem is wrong: OpenSSL only says 'PEM lib'."""
    try:
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    except (ValueError, OSError):
        return CredentialError(f"certificate {files.cert} is not a PEM certificate")
    try:
        key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
    except (ValueError, TypeError, OSError):
        return CredentialError(f"private key {files.key} is not an unencrypted PEM private key")
    if _public_der(key.public_key()) != _public_der(cert.public_key()):
        return CredentialError(f"private key {files.key} does not match certificate "
                               f"{files.cert}")
    return CredentialError(f"certificate {files.cert} with key {files.key}: cannot load them "
                           f"({_ssl_reason(e)})")


def _public_der(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def _ssl_reason(e: ssl.SSLError | OSError) -> str:
    if isinstance(e, ssl.SSLError) and e.reason:
        return e.reason.replace("_", " ").lower()
    return _os_reason(e)


# ---------------------------------------------------------------- making TLS directories


def make_tls_dir(path: str, ca_dir: str | None = None, name: str = "livemig") -> None:
    """Make a mutual-TLS endpoint directory `path` (for demos and tests): a CA is made in
    `ca_dir` (or in `path`) unless one is there, and `path` gets ca.pem (a copy of the CA
    certificate), cert.pem and key.pem signed by that CA, for `name`, localhost and
    127.0.0.1. Endpoints made with the same `ca_dir` accept each other.

    The CA's private key (ca-key.pem) stays in the CA directory: when it is `path` itself,
    every holder of the directory can sign new peers, which is fine for a demo only.
    """
    out = Path(path)
    ca_root = Path(ca_dir) if ca_dir is not None else out
    for f in (out / CERT_FILE, out / KEY_FILE):
        if f.exists():
            raise CredentialError(f"{f} already exists: remove it or choose another directory")
    for d in (ca_root, out):
        _make_dir(d)
    ca_cert, ca_key = _load_or_make_ca(ca_root)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    copy = out / CA_FILE
    if copy.exists() and copy.read_bytes() != ca_pem:
        raise CredentialError(f"{copy} holds another CA than {ca_root / CA_FILE}: remove it "
                              f"or choose another directory")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _endpoint_cert(key, name, ca_cert, ca_key)
    _write_new(out / KEY_FILE, _private_pem(key), 0o600, "private key")
    _write_new(out / CERT_FILE, cert.public_bytes(serialization.Encoding.PEM), 0o644,
               "certificate")
    if not copy.exists():
        _write_new(copy, ca_pem, 0o644, "CA certificate")


def _make_dir(d: Path) -> None:
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)  # it will hold private keys
    except OSError as e:
        raise CredentialError(f"directory {d}: cannot create it ({_os_reason(e)})") from e
    if not d.is_dir():
        raise CredentialError(f"{d} is not a directory")


_SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _load_or_make_ca(root: Path) -> tuple[x509.Certificate, _SigningKey]:
    cert_path, key_path = root / CA_FILE, root / CA_KEY_FILE
    if cert_path.exists() != key_path.exists():
        have, lack = (cert_path, key_path) if cert_path.exists() else (key_path, cert_path)
        raise CredentialError(f"CA directory {root} has {have.name} but not {lack.name}: "
                              f"a CA needs both")
    if cert_path.exists():
        return _load_ca(cert_path, key_path)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _ca_cert(key)
    _write_new(key_path, _private_pem(key), 0o600, "CA private key")
    _write_new(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644,
               "CA certificate")
    return cert, key


def _load_ca(cert_path: Path, key_path: Path) -> tuple[x509.Certificate, _SigningKey]:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except ValueError:
        raise CredentialError(f"CA certificate {cert_path} is not a PEM certificate") from None
    raw = _read_private(key_path, "CA private key", 1 << 20)
    try:
        key = serialization.load_pem_private_key(raw, password=None)
    except (ValueError, TypeError):
        raise CredentialError(f"CA private key {key_path} is not an unencrypted PEM private "
                              f"key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CredentialError(f"CA private key {key_path} is neither EC nor RSA")
    if _public_der(key.public_key()) != _public_der(cert.public_key()):
        raise CredentialError(f"CA private key {key_path} does not match CA certificate "
                              f"{cert_path}")
    return cert, key


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return builder.not_valid_before(now - _BEFORE).not_valid_after(now + _LIFETIME)


def _ca_cert(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "livemig CA")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
    )
    return _validity(builder).sign(key, hashes.SHA256())


def _endpoint_cert(key: ec.EllipticCurvePrivateKey, name: str, ca_cert: x509.Certificate,
                   ca_key: _SigningKey) -> x509.Certificate:
    # every endpoint is a server (destination) and a client (source), hence both usages
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False,
            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False)
        .add_extension(x509.SubjectAlternativeName(_alt_names(name)), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_key.public_key()), critical=False)
    )
    return _validity(builder).sign(ca_key, hashes.SHA256())


def _alt_names(name: str) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for n in (name, "localhost", "127.0.0.1"):
        try:
            entry: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(n))
        except ValueError:
            entry = x509.DNSName(n)
        if entry not in names:
            names.append(entry)
    return names
