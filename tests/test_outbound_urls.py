"""Outbound URLs (deployments/outbound.py): addresses and ports refused unless configured, at
every redirect, and the connection made to the address that was checked.

Files come from a real HTTP server on 127.0.0.1 (tests/file_server.py). Host names other than
`localhost` are resolved by a resolver the test passes in, so a "public" name can lead to the
test server, and a redirect to a name that resolves to a private address."""

from __future__ import annotations

import ipaddress
import ssl
import subprocess

import httpx
import pytest

from cluster.train.config import TrainJob
from cluster.train.data import check_dataset
from deployments import outbound
from deployments.errors import InvalidRequest, RemoteFetchFailed
from deployments.loras.remote import RemoteLoraCache, check_url
from deployments.outbound import UrlRules, refused_address
from tests.file_server import FileServer
from tests.test_remote_loras import FILE_BYTES, remote_config
from tests.train_jobs import write_dataset

NO_ALLOWANCE = {"allowed_networks": [], "allowed_ports": [80, 443]}
FIELD = "loras.0.url"


@pytest.fixture
def server(tmp_path):
    folder = tmp_path / "served"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"a" * FILE_BYTES)
    with FileServer(folder) as running:
        yield running


class FakeDns:
    """A resolver from a fixed table, counting each lookup."""

    def __init__(self, table: dict[str, str]):
        self.table = table
        self.lookups: list[str] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        if host not in self.table:
            raise OSError(f"unknown host {host}")
        return [self.table[host]]


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1/a.safetensors", "127.0.0.1 is a loopback address"),
        ("http://10.1.2.3/a.safetensors", "10.1.2.3 is a private address"),
        ("http://169.254.169.254/latest/meta-data/x", "169.254.169.254 is a link-local address"),
        ("http://[::1]/a.safetensors", "::1 is a loopback address"),
        ("http://[::ffff:127.0.0.1]/a.safetensors", "::ffff:127.0.0.1 is a loopback address"),
        ("http://[::ffff:a9fe:a9fe]/a.safetensors", "::ffff:a9fe:a9fe is a link-local address"),
        ("http://[64:ff9b::a00:1]/a.safetensors", "64:ff9b::a00:1 is a private address"),
        ("http://[2002:a00:1::]/a.safetensors", "2002:a00:1:: is a private address"),
        ("http://[fe80::1]/a.safetensors", "fe80::1 is a link-local address"),
        ("http://[fd00::1]/a.safetensors", "fd00::1 is a private address"),
        ("http://0.0.0.0/a.safetensors", "0.0.0.0 is an unspecified address"),
        ("http://224.0.0.1/a.safetensors", "224.0.0.1 is a multicast address"),
        ("http://100.64.0.1/a.safetensors", "100.64.0.1 is not a public address"),
        ("http://240.0.0.1/a.safetensors", "240.0.0.1 is a reserved address"),
        (
            "http://93.184.216.34:8080/a.safetensors",
            "port 8080 is not allowed (allowed_ports: 80, 443)",
        ),
    ],
)
def test_addresses_and_ports_refused_by_default(url, reason):
    with pytest.raises(InvalidRequest) as raised:
        outbound.check_url(url, UrlRules(), FIELD)  # any host name, the default rules
    assert raised.value.message.startswith(f"{FIELD}: {reason}"), raised.value.message
    if "port" not in reason:
        assert raised.value.message.endswith("(allow_private_addresses, allowed_networks)")


def test_the_ingress_check_of_a_lora_url_refuses_them_too(tmp_path):
    config = remote_config(tmp_path, allowed_hosts=["169.254.169.254"], **NO_ALLOWANCE)
    with pytest.raises(InvalidRequest, match=rf"^{FIELD}: 169.254.169.254 is a link-local"):
        check_url("http://169.254.169.254/latest/meta-data/x", config, FIELD)


def test_public_addresses_default_ports_and_allowances(tmp_path):
    public = remote_config(tmp_path, allowed_hosts=["93.184.216.34", "10.1.2.3"], **NO_ALLOWANCE)
    assert check_url("http://93.184.216.34:80/a.safetensors", public, FIELD)
    narrow = remote_config(
        tmp_path, allowed_hosts=["10.1.2.3", "10.9.9.9"], allowed_networks=["10.1.2.0/24"]
    )
    assert check_url("http://10.1.2.3:8000/a.safetensors", narrow, FIELD)
    with pytest.raises(InvalidRequest, match="10.9.9.9 is a private address"):
        check_url("http://10.9.9.9/a.safetensors", narrow, FIELD)
    wide = UrlRules(allow_private_addresses=True)
    assert refused_address(ipaddress.ip_address("10.9.9.9"), wide) is None
    assert refused_address(ipaddress.ip_address("224.0.0.1"), wide) == "a multicast address"


def test_a_name_that_resolves_to_loopback_is_refused_before_any_request(tmp_path, server):
    port = server.base_url.rsplit(":", 1)[1]
    cache = RemoteLoraCache(
        remote_config(tmp_path, allowed_hosts=["localhost"], allowed_networks=[])
    )
    with pytest.raises(InvalidRequest) as raised:
        cache.fetch(f"http://localhost:{port}/a.bin")  # the system's resolver: /etc/hosts
    message = raised.value.message
    assert message.startswith("url http://localhost:"), message
    assert "host 'localhost' resolves to" in message and "a loopback address" in message
    assert server.gets_of("a.bin") == 0


def test_the_connection_goes_to_the_checked_address_after_one_lookup(tmp_path, server):
    port = server.base_url.rsplit(":", 1)[1]
    # "files.example" exists nowhere but in this table: the fetch can only work by connecting
    # to the address the check saw, and a second lookup (DNS rebinding) would be counted.
    dns = FakeDns({"files.example": "127.0.0.1"})
    cache = RemoteLoraCache(remote_config(tmp_path, allowed_hosts=["files.example"]), dns)
    assert cache.fetch(f"http://files.example:{port}/a.bin") == b"a" * FILE_BYTES
    assert dns.lookups == ["files.example"]
    assert server.gets_of("a.bin") == 1


def test_every_redirect_is_checked_again(tmp_path, server):
    port = int(server.base_url.rsplit(":", 1)[1])
    dns = FakeDns({"cdn.example": "127.0.0.1", "internal.example": "10.0.0.7", "v6.example": "::1"})
    hosts = ["cdn.example", "internal.example", "v6.example", "169.254.169.254"]
    config = remote_config(tmp_path, allowed_hosts=hosts, allowed_ports=[80, 443, port])
    cache = RemoteLoraCache(config, dns)
    start = f"http://cdn.example:{port}/redirect?to="
    refused = {
        f"http://internal.example:{port}/a.bin": "host 'internal.example' resolves to "
        "10.0.0.7, a private address",
        f"http://v6.example:{port}/a.bin": "host 'v6.example' resolves to ::1, a loopback address",
        "http://169.254.169.254/latest/meta-data/": "169.254.169.254 is a link-local address",
        "http://cdn.example:9/a.bin": "port 9 is not allowed (allowed_ports: 80, 443, ",
        f"ftp://cdn.example:{port}/a.bin": "scheme 'ftp' is not allowed (allowed: http)",
        f"http://other.example:{port}/a.bin": "host 'other.example' is not allowed",
    }
    for target, reason in refused.items():
        with pytest.raises(InvalidRequest) as raised:
            cache.fetch(start + target)
        # The URL is named without its query (which may hold a signature).
        expected = f"url http://cdn.example:{port}/redirect: refused redirect: {reason}"
        assert raised.value.message.startswith(expected), raised.value.message
    assert server.gets_of("a.bin") == 0
    assert cache.fetch(start + f"http://cdn.example:{port}/a.bin") == b"a" * FILE_BYTES


def test_training_image_urls_obey_the_jobs_rules(tmp_path):
    data = write_dataset(tmp_path / "data", count=1)
    with FileServer(data) as server:
        job = {
            "base_model": "flux",
            "image_urls": [{"url": server.url("img0.png")}],
            "output_name": "outbound-test",
        }
        with pytest.raises(InvalidRequest) as raised:
            check_dataset(TrainJob.model_validate(job))  # default rules: public, 80 and 443
        assert raised.value.message.startswith("image_urls.0.url: port "), raised.value.message
        rules = {"allowed_networks": ["127.0.0.1/32"], "allowed_ports": "any"}
        allowed = TrainJob.model_validate({**job, "url_rules": rules})
        assert check_dataset(allowed).images == 1
        redirected = server.url("redirect?to=http://10.0.0.1/img0.png")
        bounced = {**job, "url_rules": rules, "image_urls": [{"url": redirected}]}
        with pytest.raises(
            InvalidRequest,
            match=r"^image_urls.0.url: refused redirect: "
            r"10.0.0.1 is a private address",
        ):
            check_dataset(TrainJob.model_validate(bounced))
        assert server.gets_of("redirect") == 1


@pytest.fixture
def tls_server(tmp_path):
    """The test files over https, with a self-signed certificate for `files.example` that
    SSL_CERT_FILE makes the only one trusted."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=files.example",
            "-addext",
            "subjectAltName=DNS:files.example",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    folder = tmp_path / "served"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"a" * FILE_BYTES)
    with FileServer(folder, tls=context) as running:
        yield running, cert


def test_https_checks_the_certificate_of_the_name_at_the_checked_address(
    tmp_path, tls_server, monkeypatch
):
    server, cert = tls_server
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    port = server.base_url.rsplit(":", 1)[1]
    dns = FakeDns({"files.example": "127.0.0.1", "other.example": "127.0.0.1"})
    hosts = ["files.example", "other.example", "127.0.0.1"]
    config = remote_config(tmp_path, allowed_hosts=hosts, allowed_schemes=["https"])
    cache = RemoteLoraCache(config, dns)
    # Connected to 127.0.0.1, the TLS server name and certificate check are files.example's.
    assert cache.fetch(f"https://files.example:{port}/a.bin") == b"a" * FILE_BYTES
    for url in (f"https://other.example:{port}/a.bin", f"https://127.0.0.1:{port}/a.bin"):
        with pytest.raises(RemoteFetchFailed, match="CERTIFICATE_VERIFY_FAILED"):
            cache.fetch(url)  # the certificate does not name this host
    assert server.gets_of("a.bin") == 1


def test_a_webhook_style_post_is_checked_and_sent_without_redirects(server):
    rules = UrlRules(allowed_networks=["127.0.0.1/32"], allowed_ports="any")
    # The file server has no POST handler: 501 shows the method arrived as sent.
    post = {"method": "POST", "content": b"{}", "max_redirects": 0}
    with outbound.open_http(server.url("hook"), rules, "webhook_url", 5, **post) as response:
        assert response.status_code == 501
    with pytest.raises(httpx.TooManyRedirects, match="webhook_url: more than 0 redirects"):
        with outbound.open_http(
            server.url("redirect?to=/a.bin"), rules, "webhook_url", 5, max_redirects=0
        ):
            pass
    with pytest.raises(InvalidRequest, match="^webhook_url: 10.0.0.1 is a private address"):
        with outbound.open_http("http://10.0.0.1/hook", rules, "webhook_url", 5, **post):
            pass
    assert server.gets_of("a.bin") == 0
