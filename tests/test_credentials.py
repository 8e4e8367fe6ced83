"""Credentials: pre-shared key files, TLS directories, and real mutual-TLS handshakes."""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from livemig.cli.credential_cmds import add_commands
from livemig.migration.credentials import (
    KEY_SIZE,
    CredentialError,
    TlsFiles,
    client_context,
    load_key,
    load_tls_dir,
    make_tls_dir,
    server_context,
    write_key,
)
from livemig.migration.errors import MigrationError

HEX64 = "0123456789abcdef" * 4


def refused(action: Callable[[], object], path: Path, *words: str) -> str:
    """Run `action`, expect a CredentialError of one line naming `path` and `words`."""
    with pytest.raises(CredentialError) as info:
        action()
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def private_file(path: Path, data: str | bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    path.chmod(mode)
    return path


# ---------------------------------------------------------------- pre-shared key


def test_key_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "psk"
    old = os.umask(0)  # the file mode must not depend on the umask
    try:
        write_key(str(path))
    finally:
        os.umask(old)
    text = path.read_text()
    assert re.fullmatch(r"[0-9a-f]{64}\n", text)
    assert path.stat().st_mode & 0o777 == 0o600
    key = load_key(str(path))
    assert len(key) == KEY_SIZE and key == bytes.fromhex(text)
    write_key(str(tmp_path / "psk2"))
    assert load_key(str(tmp_path / "psk2")) != key


def test_write_key_refuses_existing_path(tmp_path: Path) -> None:
    path = private_file(tmp_path / "psk", HEX64)
    refused(lambda: write_key(str(path)), path, "already exists")
    assert path.read_text() == HEX64
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")  # a dangling symlink is not followed either
    refused(lambda: write_key(str(link)), link, "already exists")
    assert not (tmp_path / "elsewhere").exists()


def test_credential_error_is_a_migration_error() -> None:
    assert issubclass(CredentialError, MigrationError)


def test_load_key_accepts_surrounding_whitespace(tmp_path: Path) -> None:
    path = private_file(tmp_path / "psk", f"  \n{HEX64.upper()}\n\n")
    assert load_key(str(path)) == bytes.fromhex(HEX64)


def test_load_key_refuses_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope"
    refused(lambda: load_key(str(path)), path, "does not exist")


def test_load_key_refuses_directory(tmp_path: Path) -> None:
    path = tmp_path / "dir"
    path.mkdir(mode=0o700)
    refused(lambda: load_key(str(path)), path, "directory")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602, 0o660])
def test_load_key_refuses_file_open_to_others(tmp_path: Path, mode: int) -> None:
    path = private_file(tmp_path / "psk", HEX64, mode)
    refused(lambda: load_key(str(path)), path, f"{mode:04o}", f"chmod 600 {path}")


@pytest.mark.parametrize("content", [
    b"", b"\n", HEX64[:-1].encode(), (HEX64 + "0").encode(), b"g" * 64,
    (HEX64 + " 00").encode(), (HEX64[:32] + " " + HEX64[32:]).encode(), os.urandom(32),
    b"\xff" * 64, (HEX64 * 100).encode(),
], ids=["empty", "newline", "63-hex", "65-hex", "not-hex", "trailing-word", "inner-space",
        "binary", "non-ascii", "huge"])
def test_load_key_refuses_content_that_is_not_a_key(tmp_path: Path, content: bytes) -> None:
    path = private_file(tmp_path / "psk", content)
    refused(lambda: load_key(str(path)), path, "64 hex digits")


def test_load_key_refuses_all_zero_key(tmp_path: Path) -> None:
    path = private_file(tmp_path / "psk", "0" * 64 + "\n")
    refused(lambda: load_key(str(path)), path, "all-zero")


# ---------------------------------------------------------------- TLS directories


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TlsFiles]:
    """Endpoints `a` and `b` signed by one CA; `other` by another CA."""
    root = tmp_path_factory.mktemp("tls")
    make_tls_dir(str(root / "a"), ca_dir=str(root / "ca"), name="host-a")
    make_tls_dir(str(root / "b"), ca_dir=str(root / "ca"), name="10.0.0.2")
    make_tls_dir(str(root / "other"), name="intruder")
    return {n: load_tls_dir(str(root / n)) for n in ("a", "b", "other")}


def copy_dir(files: TlsFiles, dest: Path) -> Path:
    dest.mkdir()
    for f in (files.ca, files.cert, files.key):
        private_file(dest / f.name, f.read_bytes())
    return dest


def test_make_tls_dir_layout(tmp_path: Path, tls: dict[str, TlsFiles]) -> None:
    a, b, other = tls["a"], tls["b"], tls["other"]
    ca_dir = a.ca.parent.parent / "ca"
    assert a.ca.read_bytes() == b.ca.read_bytes() == (ca_dir / "ca.pem").read_bytes()
    assert a.ca.read_bytes() != other.ca.read_bytes()
    for key in (a.key, b.key, other.key, ca_dir / "ca-key.pem", other.key.parent / "ca-key.pem"):
        assert key.stat().st_mode & 0o777 == 0o600, key
    assert not (a.key.parent / "ca-key.pem").exists()  # the CA key stays in --ca-dir
    cert = x509.load_pem_x509_certificate(b.cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.2"),
                                                       ipaddress.ip_address("127.0.0.1")]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 3650 <= lifetime.days <= 3652
    names = x509.load_pem_x509_certificate(a.cert.read_bytes()).extensions \
        .get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["host-a", "localhost"]


def test_make_tls_dir_refuses_to_overwrite(tmp_path: Path, tls: dict[str, TlsFiles]) -> None:
    a = tls["a"]
    refused(lambda: make_tls_dir(str(a.key.parent), ca_dir=str(tmp_path / "ca")), a.cert.parent,
            "already exists")
    half = tmp_path / "half"
    half.mkdir()
    (half / "ca.pem").write_bytes(a.ca.read_bytes())
    refused(lambda: make_tls_dir(str(tmp_path / "c"), ca_dir=str(half)), half, "ca-key.pem")


def test_contexts_are_mutual_tls_1_3_trusting_only_the_ca(tls: dict[str, TlsFiles]) -> None:
    for ctx in (server_context(tls["a"]), client_context(tls["a"])):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert not ctx.check_hostname
        assert len(ctx.get_ca_certs()) == 1  # ca.pem only: no system store


def test_load_tls_dir_refuses_missing_dir(tmp_path: Path) -> None:
    path = tmp_path / "nope"
    refused(lambda: load_tls_dir(str(path)), path, "does not exist")
    private_file(path, "x")
    refused(lambda: load_tls_dir(str(path)), path, "not a directory")


@pytest.mark.parametrize("name", ["ca.pem", "cert.pem", "key.pem"])
def test_load_tls_dir_refuses_missing_file(tmp_path: Path, tls: dict[str, TlsFiles],
                                           name: str) -> None:
    d = copy_dir(tls["a"], tmp_path / "d")
    (d / name).unlink()
    refused(lambda: load_tls_dir(str(d)), d / name, "missing")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_load_tls_dir_refuses_key_open_to_others(tmp_path: Path, tls: dict[str, TlsFiles],
                                                 mode: int) -> None:
    d = copy_dir(tls["a"], tmp_path / "d")
    (d / "key.pem").chmod(mode)
    refused(lambda: load_tls_dir(str(d)), d / "key.pem", f"{mode:04o}", "chmod 600")


@pytest.mark.parametrize("name,words", [
    ("ca.pem", ("CA certificate", "cannot load")),
    ("cert.pem", ("not a PEM certificate",)),
    ("key.pem", ("not an unencrypted PEM private key",)),
])
def test_load_tls_dir_refuses_unparsable_pem(tmp_path: Path, tls: dict[str, TlsFiles],
                                             name: str, words: tuple[str, ...]) -> None:
    d = copy_dir(tls["a"], tmp_path / "d")
    private_file(d / name, "-----BEGIN CERTIFICATE-----\nnot base64 at all\n")
    refused(lambda: load_tls_dir(str(d)), d / name, *words)


def test_load_tls_dir_refuses_key_of_another_cert(tmp_path: Path,
                                                  tls: dict[str, TlsFiles]) -> None:
    d = copy_dir(tls["a"], tmp_path / "d")
    private_file(d / "key.pem", tls["b"].key.read_bytes())
    refused(lambda: load_tls_dir(str(d)), d / "key.pem", "does not match", str(d / "cert.pem"))


def test_load_tls_dir_refuses_encrypted_key_without_prompting(
        tmp_path: Path, tls: dict[str, TlsFiles]) -> None:
    d = copy_dir(tls["a"], tmp_path / "d")
    key = serialization.load_pem_private_key(tls["a"].key.read_bytes(), password=None)
    private_file(d / "key.pem", key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    refused(lambda: load_tls_dir(str(d)), d / "key.pem", "encrypted")


# ---------------------------------------------------------------- handshakes

Outcome = bytes | BaseException


def loopback() -> tuple[socket.socket, socket.socket]:
    srv = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(srv.getsockname())
    server, _ = srv.accept()
    srv.close()
    for s in (client, server):
        s.settimeout(10)  # a broken handshake must fail the test, not hang it
    return server, client


def exchange(server_ctx: ssl.SSLContext,
             client_ctx: ssl.SSLContext | None) -> tuple[Outcome, Outcome]:
    """Run a TLS server and a client (TLS, or plaintext when `client_ctx` is None) over
    loopback; each side sends one message and reads the other's. Returns what each side
    received, or the exception it met."""
    server_sock, client_sock = loopback()
    out: dict[str, Outcome] = {}

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(server_sock, server_side=True) as s:
                s.sendall(b"from server")
                out["server"] = s.recv(64)
        except (ssl.SSLError, OSError) as e:
            out["server"] = e

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with (client_ctx.wrap_socket(client_sock) if client_ctx else client_sock) as c:
            # the client reads first: with TLS 1.3 a refusal of its certificate arrives then
            out["client"] = c.recv(64)
            c.sendall(b"from client")
    except (ssl.SSLError, OSError) as e:
        out["client"] = e
    thread.join(15)
    assert not thread.is_alive()
    return out["server"], out["client"]


def assert_refused(outcome: Outcome, *reasons: str) -> None:
    assert isinstance(outcome, ssl.SSLError), outcome
    assert any(r in str(outcome) for r in reasons), outcome


@pytest.mark.parametrize("server,client", [("a", "b"), ("b", "a"), ("a", "a")])
def test_endpoints_of_one_ca_complete_a_handshake(tls: dict[str, TlsFiles], server: str,
                                                  client: str) -> None:
    got_server, got_client = exchange(server_context(tls[server]), client_context(tls[client]))
    assert got_server == b"from client"
    assert got_client == b"from server"


def test_peer_certificates_are_seen_on_both_sides(tls: dict[str, TlsFiles]) -> None:
    server_sock, client_sock = loopback()
    peers: dict[str, object] = {}

    def serve() -> None:
        with server_context(tls["a"]).wrap_socket(server_sock, server_side=True) as s:
            peers["server"] = s.getpeercert()
            s.sendall(b"x")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with client_context(tls["b"]).wrap_socket(client_sock) as c:
        assert c.recv(1) == b"x"
        peers["client"] = c.getpeercert()
        assert c.version() == "TLSv1.3"
    thread.join(15)
    assert "host-a" in str(peers["client"]) and "10.0.0.2" in str(peers["server"])


def test_other_ca_is_refused_by_both_sides(tls: dict[str, TlsFiles]) -> None:
    got_server, got_client = exchange(server_context(tls["a"]), client_context(tls["other"]))
    assert_refused(got_server, "unknown ca", "certificate verify failed")
    assert_refused(got_client, "certificate verify failed")


def test_server_refuses_client_of_other_ca(tls: dict[str, TlsFiles]) -> None:
    # the client trusts the server's CA, so only the server can refuse
    intruder = TlsFiles(tls["a"].ca, tls["other"].cert, tls["other"].key)
    got_server, got_client = exchange(server_context(tls["a"]), client_context(intruder))
    assert_refused(got_server, "certificate verify failed")
    assert_refused(got_client, "unknown ca")


def test_client_refuses_server_of_other_ca(tls: dict[str, TlsFiles]) -> None:
    # the server trusts the client's CA, so only the client can refuse
    impostor = TlsFiles(tls["a"].ca, tls["other"].cert, tls["other"].key)
    got_server, got_client = exchange(server_context(impostor), client_context(tls["b"]))
    assert_refused(got_client, "certificate verify failed")
    assert_refused(got_server, "unknown ca")


def test_server_refuses_client_without_certificate(tls: dict[str, TlsFiles]) -> None:
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.check_hostname = False
    anonymous.load_verify_locations(cafile=str(tls["a"].ca))
    got_server, got_client = exchange(server_context(tls["a"]), anonymous)
    assert_refused(got_server, "peer did not return a certificate")
    assert isinstance(got_client, ssl.SSLError | OSError) or got_client == b"", got_client


def test_plaintext_client_gets_nothing_from_tls_server(tls: dict[str, TlsFiles]) -> None:
    server_sock, client_sock = loopback()
    out: dict[str, Outcome] = {}

    def serve() -> None:
        try:
            with server_context(tls["a"]).wrap_socket(server_sock, server_side=True) as s:
                out["server"] = s.recv(64)
        except (ssl.SSLError, OSError) as e:
            out["server"] = e

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with client_sock:
        client_sock.sendall(b"LIVEMIG hello, no TLS here\r\n" * 4)
        thread.join(15)
        try:
            reply = client_sock.recv(4096)
        except OSError:
            reply = b""
    assert isinstance(out["server"], ssl.SSLError), out["server"]
    assert b"LIVEMIG" not in reply and b"hello" not in reply


# ---------------------------------------------------------------- commands


@pytest.fixture
def cli() -> click.Group:
    group = click.Group("livemig")
    add_commands(group)
    return group


def test_keygen_command(tmp_path: Path, cli: click.Group) -> None:
    path = tmp_path / "psk"
    res = CliRunner().invoke(cli, ["keygen", str(path)])
    assert res.exit_code == 0, res.output
    assert str(path) in res.output
    assert len(load_key(str(path))) == KEY_SIZE
    res = CliRunner().invoke(cli, ["keygen", str(path)])
    assert res.exit_code == 1 and "already exists" in res.output


def test_tls_gen_command(tmp_path: Path, cli: click.Group) -> None:
    runner = CliRunner()
    ca = tmp_path / "ca"
    for host in ("src", "dst"):
        res = runner.invoke(cli, ["tls-gen", str(tmp_path / host), "--ca-dir", str(ca),
                                  "--name", host])
        assert res.exit_code == 0, res.output
        assert ("made a new" if host == "src" else "used the") in res.output
    got_server, got_client = exchange(server_context(load_tls_dir(str(tmp_path / "dst"))),
                                      client_context(load_tls_dir(str(tmp_path / "src"))))
    assert (got_server, got_client) == (b"from client", b"from server")
    res = runner.invoke(cli, ["tls-gen", str(tmp_path / "demo")])
    assert res.exit_code == 0 and "demo only" in res.output
    load_tls_dir(str(tmp_path / "demo"))
