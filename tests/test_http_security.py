"""TLS and basic auth from a web config file (Prometheus exporter-toolkit format).

Certificates are made per test with the openssl CLI; clients are curl and a
real Prometheus, so what passes here is what a scrape job with `tls_config`
and `basic_auth` sees.
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml
from structlog.testing import capture_logs

from nswatch import cli, webconfig
from nswatch.config import ConfigError
from nswatch.http import Api, HttpServer, Limits
from nswatch.model import Model
from nswatch.render_cache import json_bytes
from nswatch.state import state_json
from nswatch.webconfig import WebConfig, load_web_config
from tests.bench.bench_metrics import synthetic
from tests.test_http import _model, assert_served_twice

PASSWORD = "s3cret pass:word"  # a space and a colon: only the first ':' splits user from password


@dataclass
class Certs:
    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # self-signed: not from the CA
    stranger_key: Path


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True)


def _signed(d: Path, name: str, cn: str, ext: str) -> None:
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=d,
    )  # fmt: skip
    (d / f"{name}.ext").write_text(ext)
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-set_serial", str(int(time.time_ns() % 10**12)), "-days", "2",
        "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=d,
    )  # fmt: skip


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A CA, a server certificate for 127.0.0.1, a client certificate, and a stranger's."""
    if shutil.which("openssl") is None:
        raise AssertionError("the openssl CLI is needed (Debian package openssl)")
    d = tmp_path_factory.mktemp("certs")
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=nswatch test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d,
    )  # fmt: skip
    _signed(d, "server", "127.0.0.1", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _signed(
        d, "client", "prometheus", "subjectAltName=DNS:prometheus\nextendedKeyUsage=clientAuth\n"
    )
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "stranger.key", "-out", "stranger.pem", "-days", "2", "-subj", "/CN=stranger",
        "-addext", "subjectAltName=DNS:prometheus", cwd=d,
    )  # fmt: skip
    return Certs(
        d,
        d / "ca.pem",
        d / "server.pem",
        d / "server.key",
        d / "client.pem",
        d / "client.key",
        d / "stranger.pem",
        d / "stranger.key",
    )


def htpasswd_hash(password: str) -> str:
    """A bcrypt hash as `htpasswd -nB` writes it ($2y$), cheap cost for tests."""
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode().replace("$2b$", "$2y$", 1)


def write_web_config(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def _server(
    web: WebConfig,
    limits: Limits | None = None,
    metrics: bytes = b"nswatch_test_value 1\n",
    model: Model | None = None,
) -> HttpServer:
    api = Api(
        view=(model or _model()).copy,
        alive=lambda: True,
        ready=lambda: True,
        metrics=lambda accept: (metrics, "text/plain; version=0.0.4"),
    )
    srv = HttpServer(("127.0.0.1", 0), api, web, limits)
    srv.start()
    return srv


@pytest.fixture
def tls_auth_server(certs: Certs, tmp_path: Path) -> Iterator[HttpServer]:
    """TLS with the test CA's server certificate, and user alice."""
    path = write_web_config(
        tmp_path / "web.yml",
        {
            "tls_server_config": {"cert_file": "server.pem", "key_file": "server.key"},
            "basic_auth_users": {"alice": htpasswd_hash(PASSWORD)},
        },
    )
    # Relative paths are relative to the web config's directory.
    for f in (certs.server_cert, certs.server_key):
        shutil.copy(f, tmp_path / f.name)
    srv = _server(load_web_config(str(path)))
    try:
        yield srv
    finally:
        srv.stop()


def curl(url: str, *args: str | Path) -> tuple[int, str]:
    """(HTTP status or 0 when no response, body) of `curl url args`."""
    if shutil.which("curl") is None:
        raise AssertionError("curl is needed (Debian package curl)")
    r = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "-w", "\n%{http_code}", *map(str, args), url],
        capture_output=True,
        text=True,
    )
    body, _, code = r.stdout.rpartition("\n")
    return int(code or 0), body


def test_curl_tls_and_basic_auth(tls_auth_server: HttpServer, certs: Certs) -> None:
    """Over TLS: 401 without credentials or with a wrong password or user, 200 with the right ones."""
    host, port = tls_auth_server.address
    url = f"https://{host}:{port}/metrics"
    ca = ("--cacert", certs.ca)
    status, body = curl(url, *ca)
    assert status == 401 and json.loads(body) == {"error": "unauthorized"}
    assert curl(url, *ca, "-u", "alice:wrong")[0] == 401
    assert curl(url, *ca, "-u", f"bob:{PASSWORD}")[0] == 401
    status, body = curl(url, *ca, "-u", f"alice:{PASSWORD}")
    assert status == 200 and body == "nswatch_test_value 1\n"
    # Every path is behind the password, the 404s too.
    assert curl(f"https://{host}:{port}/nope", *ca)[0] == 401
    assert curl(f"https://{host}:{port}/healthz", *ca, "-u", f"alice:{PASSWORD}")[0] == 200
    # Plain HTTP to the TLS port gets nothing, and the server serves on.
    assert curl(f"http://{host}:{port}/healthz")[0] in (0, 400)
    assert curl(url, *ca, "-u", f"alice:{PASSWORD}")[0] == 200


def _assert_served_twice_over_tls(
    certs: Certs, tmp_path: Path, path: str, body: bytes, **server: Any
) -> None:
    """``GET path`` twice on one TLS connection to a fresh server, each time ``body`` whole."""
    tls = {"cert_file": str(certs.server_cert), "key_file": str(certs.server_key)}
    web = load_web_config(str(write_web_config(tmp_path / "web.yml", {"tls_server_config": tls})))
    srv = _server(web, **server)
    try:
        host, port = srv.address
        ctx = ssl.create_default_context(cafile=str(certs.ca))
        conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=10)
        assert_served_twice(conn, path, body)
        # The sender's child sends plain bytes: under TLS it is never started.
        assert srv.sender.starts == 0
    finally:
        srv.stop()


def test_a_big_body_arrives_whole_over_tls(certs: Certs, tmp_path: Path) -> None:
    """Under TLS a big body goes through the TLS transport (never straight to the socket,
    as plain HTTP's do), and arrives whole, twice on one connection."""
    body = bytes(range(256)) * (12 << 12)  # 3 MiB
    _assert_served_twice_over_tls(certs, tmp_path, "/metrics", body, metrics=body)


def test_a_big_state_arrives_whole_over_tls(certs: Certs, tmp_path: Path) -> None:
    """Under TLS the state document, kept as its namespaces' JSON and never joined, goes
    through the TLS transport a piece at a time and arrives byte for byte as the plain
    render, twice on one connection."""
    model = synthetic(400)
    body = json_bytes(state_json(model))
    assert len(body) > 1 << 20  # more than one piece
    _assert_served_twice_over_tls(certs, tmp_path, "/api/v1/state", body, model=model)


def test_401_names_the_scheme(tls_auth_server: HttpServer, certs: Certs) -> None:
    """A 401 says `WWW-Authenticate: Basic` so browsers and curl --anyauth know what to send."""
    host, port = tls_auth_server.address
    r = subprocess.run(
        ["curl", "-sS", "-D", "-", "-o", "/dev/null", "--cacert", str(certs.ca),
         f"https://{host}:{port}/healthz"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert 'www-authenticate: basic realm="nswatch"' in r.stdout.lower()


def test_successful_password_checks_are_cached(
    tls_auth_server: HttpServer, certs: Certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scraper repeating its right password costs one bcrypt check, not one per request."""
    calls = []
    real = bcrypt.checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        calls.append(password)
        return real(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counting)  # webconfig calls bcrypt.checkpw
    host, port = tls_auth_server.address
    for _ in range(10):
        assert curl(f"https://{host}:{port}/healthz", "--cacert", certs.ca,
                    "-u", f"alice:{PASSWORD}")[0] == 200  # fmt: skip
    assert len(calls) == 1
    # Wrong passwords are never remembered as right.
    for _ in range(3):
        assert curl(f"https://{host}:{port}/healthz", "--cacert", certs.ca,
                    "-u", "alice:wrong")[0] == 401  # fmt: skip
    assert len(calls) == 4


def test_client_certificates(certs: Certs, tmp_path: Path) -> None:
    """RequireAndVerifyClientCert: no certificate or a stranger's is refused, the CA's client gets in."""
    path = write_web_config(
        tmp_path / "web.yml",
        {
            "tls_server_config": {
                "cert_file": str(certs.server_cert),
                "key_file": str(certs.server_key),
                "client_ca_file": str(certs.ca),
                "client_auth_type": "RequireAndVerifyClientCert",
                "client_allowed_sans": ["prometheus"],
            }
        },
    )
    web = load_web_config(str(path))
    assert web.authenticates
    srv = _server(web)
    try:
        host, port = srv.address
        url = f"https://{host}:{port}/healthz"
        ca = ("--cacert", certs.ca)
        assert curl(url, *ca)[0] == 0
        assert curl(url, *ca, "--cert", certs.stranger_cert, "--key", certs.stranger_key)[0] == 0
        status, body = curl(url, *ca, "--cert", certs.client_cert, "--key", certs.client_key)
        assert status == 200 and json.loads(body) == {"status": "ok"}
    finally:
        srv.stop()


def test_client_allowed_sans_refuses_other_names(certs: Certs, tmp_path: Path) -> None:
    """A verified client certificate without an allowed SAN is refused."""
    path = write_web_config(
        tmp_path / "web.yml",
        {
            "tls_server_config": {
                "cert_file": str(certs.server_cert),
                "key_file": str(certs.server_key),
                "client_ca_file": str(certs.ca),
                "client_auth_type": "RequireAndVerifyClientCert",
                "client_allowed_sans": ["grafana", "198.18.0.1"],
            }
        },
    )
    srv = _server(load_web_config(str(path)))
    try:
        host, port = srv.address
        status, _ = curl(
            f"https://{host}:{port}/healthz",
            "--cacert", certs.ca, "--cert", certs.client_cert, "--key", certs.client_key,
        )  # fmt: skip
        assert status == 0
    finally:
        srv.stop()


def test_renewed_certificate_is_served_without_restart(certs: Certs, tmp_path: Path) -> None:
    """Replacing cert_file/key_file on disk takes effect for the next connection."""
    shutil.copy(certs.stranger_cert, tmp_path / "tls.pem")
    shutil.copy(certs.stranger_key, tmp_path / "tls.key")
    path = write_web_config(
        tmp_path / "web.yml", {"tls_server_config": {"cert_file": "tls.pem", "key_file": "tls.key"}}
    )
    srv = _server(load_web_config(str(path)))
    try:
        host, port = srv.address
        url = f"https://{host}:{port}/healthz"
        assert curl(url, "--cacert", certs.ca)[0] == 0  # the stranger's cert is not the CA's
        shutil.copy(certs.server_key, tmp_path / "tls.key")
        shutil.copy(certs.server_cert, tmp_path / "tls.pem")
        assert curl(url, "--cacert", certs.ca)[0] == 200
    finally:
        srv.stop()


def test_a_new_web_config_takes_over_without_restart(certs: Certs, tmp_path: Path) -> None:
    """use_web swaps users and TLS for the next requests and connections: alice is refused
    once only bob is listed, plain HTTP stops once TLS is on, and a certificate that will
    not load changes nothing."""
    for f in (certs.server_cert, certs.server_key):
        shutil.copy(f, tmp_path / f.name)
    alice = {"basic_auth_users": {"alice": htpasswd_hash(PASSWORD)}}
    srv = _server(load_web_config(str(write_web_config(tmp_path / "a.yml", alice))))
    try:
        host, port = srv.address
        plain, tls = f"http://{host}:{port}/healthz", f"https://{host}:{port}/healthz"
        assert curl(plain, "-u", f"alice:{PASSWORD}")[0] == 200
        bob = {
            "tls_server_config": {"cert_file": "server.pem", "key_file": "server.key"},
            "basic_auth_users": {"bob": htpasswd_hash(PASSWORD)},
        }
        srv.use_web(load_web_config(str(write_web_config(tmp_path / "b.yml", bob))))
        assert curl(plain, "-u", f"bob:{PASSWORD}")[0] in (0, 400)  # TLS expected now
        assert curl(tls, "--cacert", certs.ca, "-u", f"alice:{PASSWORD}")[0] == 401
        assert curl(tls, "--cacert", certs.ca, "-u", f"bob:{PASSWORD}")[0] == 200
        # A certificate that breaks between the file's check and its use.
        shutil.copy(certs.server_cert, tmp_path / "s2.pem")
        shutil.copy(certs.server_key, tmp_path / "s2.key")
        other = {"tls_server_config": {"cert_file": "s2.pem", "key_file": "s2.key"}}
        web = load_web_config(str(write_web_config(tmp_path / "c.yml", other)))
        (tmp_path / "s2.pem").write_text("not a certificate\n")
        with pytest.raises(OSError):
            srv.use_web(web)
        assert curl(tls, "--cacert", certs.ca, "-u", f"bob:{PASSWORD}")[0] == 200
        srv.use_web(WebConfig())
        assert curl(plain)[0] == 200
    finally:
        srv.stop()


def test_rate_limit_and_headers(tmp_path: Path) -> None:
    """rate_limit answers 429 past the burst; http_server_config headers are on every response."""
    path = write_web_config(
        tmp_path / "web.yml",
        {
            "rate_limit": {"interval": "1m", "burst": 2},
            "http_server_config": {"headers": {"X-Content-Type-Options": "nosniff"}},
        },
    )
    srv = _server(load_web_config(str(path)))
    try:
        host, port = srv.address
        codes = []
        for _ in range(3):
            try:
                with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=5) as r:
                    codes.append(r.status)
                    assert r.headers["X-Content-Type-Options"] == "nosniff"
            except urllib.error.HTTPError as e:
                codes.append(e.code)
        assert codes == [200, 200, 429]
    finally:
        srv.stop()


@pytest.mark.parametrize(
    ("doc", "problem"),
    [
        ({"tls_server_config": {"cert_file": "server.pem"}}, "missing one of key or key_file"),
        ({"tls_server_config": {"cert_file": "nope.pem", "key_file": "server.key"}},
         "tls_server_config.cert_file: cannot read"),
        ({"tls_server_config": {"cert_file": "server.pem", "key_file": "client.key"}},
         "not usable"),
        ({"tls_server_config": {"cert_file": "server.pem", "key_file": "server.key",
                                "client_ca_file": "ca.pem"}},
         "client CA needs a client_auth_type"),
        ({"tls_server_config": {"cert_file": "server.pem", "key_file": "server.key",
                                "client_auth_type": "RequireAndVerifyClientCert"}},
         "needs client_ca_file"),
        ({"tls_server_config": {"cert_file": "server.pem", "key_file": "server.key",
                                "client_ca_file": "ca.pem", "client_auth_type": "RequireAnyClientCert"}},
         "not supported"),
        ({"tls_server_config": {"cert_file": "server.pem", "key_file": "server.key",
                                "client_auth_type": "Maybe"}},
         "unknown policy 'Maybe'"),
        ({"tls_server_config": {"cert_file": "server.pem", "key_file": "server.key",
                                "min_version": "TLS14"}},
         "unknown version 'TLS14'"),
        ({"tls_server_config": {"cert_file": "server.pem", "key_file": "server.key",
                                "cipher_suites": ["TLS_AES_128_GCM_SHA256"]}},
         "cipher_suites: not supported"),
        ({"tls_server_config": {"cert_file": "server.pem", "key_file": "server.key",
                                "certfile": "x"}},
         "tls_server_config.certfile: unknown key"),
        ({"basic_auth_users": {"alice": "hunter2"}}, "basic_auth_users.alice: must be a bcrypt hash"),
        ({"basic_auth_user": {"alice": "x"}}, "basic_auth_user: unknown key"),
        ({"rate_limit": {"interval": "soon", "burst": 1}}, "rate_limit.interval"),
        ({"http_server_config": {"headers": {"X-Frame-Options": "allow"}}}, "must be one of"),
    ],
)  # fmt: skip
def test_bad_web_configs_are_refused(
    certs: Certs, tmp_path: Path, doc: dict[str, Any], problem: str
) -> None:
    """A web config nswatch cannot honour fully is refused, saying where and why."""
    for f in (certs.server_cert, certs.server_key, certs.client_key, certs.ca):
        shutil.copy(f, tmp_path / f.name)
    path = write_web_config(tmp_path / "web.yml", doc)
    with pytest.raises(ConfigError) as e:
        load_web_config(str(path))
    assert problem in str(e.value)
    assert str(path) in str(e.value)


def test_run_refuses_a_bad_web_config_at_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`nswatch run --web.config.file` with a bad file exits 2 with the problem, before watching anything."""
    config = tmp_path / "nswatch.yaml"
    config.write_text("{}\n")
    web = write_web_config(tmp_path / "web.yml", {"basic_auth_users": {"alice": "plain"}})
    code = cli.main(["run", "--config", str(config), "--web.config.file", str(web)])
    assert code == 2
    assert "basic_auth_users.alice: must be a bcrypt hash" in capsys.readouterr().err


def test_empty_web_config_means_plain_http(tmp_path: Path) -> None:
    """An empty web config (as the exporter-toolkit allows) serves plain HTTP without auth."""
    path = tmp_path / "web.yml"
    path.write_text("")
    web = load_web_config(str(path))
    assert web.tls is None and not web.users and not web.authenticates


def test_warns_when_open_off_loopback(tmp_path: Path) -> None:
    """Listening off loopback without authentication logs a warning; on loopback it does not."""
    users = WebConfig(users={"alice": htpasswd_hash("x").encode()})
    cases = [
        ("127.0.0.1", WebConfig(), []),
        ("::1", WebConfig(), []),
        ("0.0.0.0", WebConfig(), ["http_open_to_network"]),
        ("198.18.0.1", WebConfig(), ["http_open_to_network"]),
        ("198.18.0.1", users, ["http_basic_auth_without_tls"]),
    ]
    for host, web, events in cases:
        with capture_logs() as logs:
            HttpServer.warn_if_exposed(host, 9442, web)
        assert [e["event"] for e in logs] == events, host
        assert all(e["log_level"] == "warning" for e in logs)


def test_basic_auth_header_parsing() -> None:
    """Only a well-formed `Basic base64(user:password)` is credentials; the first ':' splits."""
    import base64

    def basic(s: bytes) -> str:
        return "Basic " + base64.b64encode(s).decode()

    parse = webconfig.BasicAuth.parse
    assert parse(basic(b"alice:a:b c")) == ("alice", "a:b c")
    assert parse("basic " + base64.b64encode(b"u:p").decode()) == ("u", "p")
    assert parse(basic(b"no-colon")) is None
    assert parse("Bearer abc") is None
    assert parse("Basic !!!") is None
    assert parse(None) is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_prometheus_scrapes_over_tls_with_basic_auth(
    tls_auth_server: HttpServer, certs: Certs, tmp_path: Path
) -> None:
    """A real Prometheus with scheme https, tls_config.ca_file and basic_auth scrapes it (up == 1); a wrong password is up == 0."""
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        raise AssertionError("prometheus is needed (Debian package prometheus)")
    host, port = tls_auth_server.address
    (tmp_path / "password").write_text(PASSWORD)

    def job(name: str, auth: dict[str, str]) -> dict[str, Any]:
        return {
            "job_name": name,
            "scheme": "https",
            "tls_config": {"ca_file": str(certs.ca)},
            "basic_auth": auth,
            "static_configs": [{"targets": [f"{host}:{port}"]}],
        }

    prom_config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [
            job("good", {"username": "alice", "password_file": str(tmp_path / "password")}),
            job("bad", {"username": "alice", "password": "wrong"}),
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(prom_config))
    prom_port = _free_port()
    with open(tmp_path / "prometheus.log", "wb") as prom_log:
        proc = subprocess.Popen(
            [
                prometheus,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
                "--log.level=warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=prom_log,
            stderr=subprocess.STDOUT,
        )
    try:

        def up() -> dict[str, str]:
            q = urllib.parse.urlencode({"query": "up"})
            url = f"http://127.0.0.1:{prom_port}/api/v1/query?{q}"
            with urllib.request.urlopen(url, timeout=5) as r:
                data = json.loads(r.read())
            return {s["metric"]["job"]: s["value"][1] for s in data["data"]["result"]}

        seen: dict[str, str] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError((tmp_path / "prometheus.log").read_text())
            try:
                seen = up()
            except OSError:
                seen = {}
            if seen == {"good": "1", "bad": "0"}:
                break
            time.sleep(0.5)
        assert seen == {"good": "1", "bad": "0"}, (tmp_path / "prometheus.log").read_text()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
