"""The web config file (``--web.config.file``): TLS and basic auth for the HTTP API.

The format is the Prometheus exporter-toolkit's, so the ``tls_config`` and
``basic_auth`` a Prometheus scrape job already uses for exporters work
unchanged. A config that asks for something nswatch cannot do is refused at
start, never half-applied.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import os
import re
import ssl
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt
import yaml

from nswatch.config import ConfigError, Problem

_TOP_KEYS = {"tls_server_config", "http_server_config", "basic_auth_users", "rate_limit"}
_TLS_KEYS = {
    "cert",
    "key",
    "client_ca",
    "cert_file",
    "key_file",
    "client_ca_file",
    "client_auth_type",
    "client_allowed_sans",
    "min_version",
    "max_version",
    "cipher_suites",
    "prefer_server_cipher_suites",
    "curve_preferences",
}
_TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
# Go's tls.ClientAuthType names. Python's ssl verifies every certificate a
# client presents, so the two "accept without verifying" policies have no
# equivalent and are refused rather than silently made stricter or looser.
_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_UNVERIFIED_CLIENT_AUTH = {"RequestClientCert", "RequireAnyClientCert", "RequireClientCert"}
_HEADERS = {
    "Content-Security-Policy": None,
    "X-Frame-Options": {"deny", "sameorigin"},
    "X-Content-Type-Options": {"nosniff"},
    "X-XSS-Protection": None,
    "Strict-Transport-Security": None,
}
_BCRYPT_HASH = re.compile(r"\$2[abxy]?\$(\d\d)\$[./A-Za-z0-9]{53}")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class Pem:
    """A PEM given inline or as a file (read afresh for each new context: renewals apply)."""

    file: Path | None = None
    text: str | None = None

    def read(self) -> str:
        """The PEM text."""
        return self.file.read_text() if self.file is not None else self.text or ""

    def stamp(self) -> tuple[int, int] | None:
        """The file's (mtime, size): a change means a renewed certificate."""
        if self.file is None:
            return None
        st = self.file.stat()
        return st.st_mtime_ns, st.st_size


@dataclass(frozen=True)
class TlsSettings:
    """``tls_server_config``: where the certificate comes from and whom to let in."""

    cert: Pem
    key: Pem
    client_ca: Pem | None
    verify_mode: ssl.VerifyMode
    min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2
    max_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3
    prefer_server_ciphers: bool = True
    allowed_sans: tuple[str, ...] | None = None

    def stamp(self) -> tuple[tuple[int, int] | None, ...]:
        """Changes when a certificate, key or CA file changes."""
        pems = (self.cert, self.key, self.client_ca or Pem())
        return tuple(p.stamp() for p in pems)

    def context(self) -> ssl.SSLContext:
        """A server-side SSL context (raises OSError or ssl.SSLError when unusable)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = self.min_version
        ctx.maximum_version = self.max_version
        if self.prefer_server_ciphers:
            ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
        if self.cert.file is not None and self.key.file is not None:
            ctx.load_cert_chain(self.cert.file, self.key.file)
        else:
            # load_cert_chain only reads files: inline PEMs go through a
            # private directory (0700) that is removed right after.
            with tempfile.TemporaryDirectory(prefix="nswatch-tls-") as tmp:
                cert, key = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
                cert.write_text(self.cert.read())
                key.write_text(self.key.read())
                ctx.load_cert_chain(cert, key)
        if self.client_ca is not None:
            ctx.load_verify_locations(cadata=self.client_ca.read())
        ctx.verify_mode = self.verify_mode
        return ctx

    def peer_allowed(self, peercert: Mapping[str, Any] | None) -> bool:
        """Whether a verified client certificate carries one of ``client_allowed_sans``."""
        if self.allowed_sans is None:
            return True
        if not peercert:
            return False
        wanted = {_normal_san(s) for s in self.allowed_sans}
        for _kind, value in peercert.get("subjectAltName", ()):
            if _normal_san(str(value)) in wanted:
                return True
        return False


def _normal_san(value: str) -> str:
    # Python prints IPv6 SANs expanded and upper-case; the config has them
    # the way people write them.
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        return value.strip()


@dataclass(frozen=True)
class RateLimit:
    """``rate_limit``: a token bucket over every request."""

    interval: float  # seconds per token
    burst: int


@dataclass(frozen=True)
class WebConfig:
    """A loaded, validated web config."""

    source: str | None = None
    tls: TlsSettings | None = None
    users: Mapping[str, bytes] = field(default_factory=dict)  # user -> bcrypt hash
    headers: tuple[tuple[str, str], ...] = ()
    rate_limit: RateLimit | None = None

    @property
    def authenticates(self) -> bool:
        """Whether a client must prove who it is (basic auth or a verified client cert)."""
        return bool(self.users) or (
            self.tls is not None and self.tls.verify_mode == ssl.CERT_REQUIRED
        )


class _Problems:
    def __init__(self, file: str) -> None:
        self.file = file
        self.found: list[Problem] = []

    def add(self, path: str, message: str) -> None:
        self.found.append(Problem(self.file, None, path, message))


def load_web_config(path: str) -> WebConfig:
    """Read and check a web config file; raise ConfigError listing every problem."""
    problems = _Problems(path)
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError([Problem(path, None, "", f"cannot read: {e.strerror or e}")]) from None
    except yaml.YAMLError as e:
        raise ConfigError([Problem(path, None, "", f"not valid YAML: {e}")]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([Problem(path, None, "", "must be a mapping")])
    for key in raw:
        if key not in _TOP_KEYS:
            problems.add(str(key), f"unknown key (expected one of {', '.join(sorted(_TOP_KEYS))})")
    base = Path(path).resolve().parent
    tls = _tls(_section(raw, "tls_server_config", problems), base, problems)
    users = _users(_section(raw, "basic_auth_users", problems), problems)
    headers = _headers(_section(raw, "http_server_config", problems), problems)
    rate = _rate_limit(_section(raw, "rate_limit", problems), problems)
    if problems.found:
        raise ConfigError(problems.found)
    return WebConfig(path, tls, users, headers, rate)


def _section(raw: dict[Any, Any], key: str, problems: _Problems) -> dict[Any, Any]:
    value = raw.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.add(key, "must be a mapping")
        return {}
    return value


def _str(sec: dict[Any, Any], key: str, where: str, problems: _Problems) -> str | None:
    value = sec.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        problems.add(f"{where}.{key}", "must be a string")
        return None
    return value


def _tls(sec: dict[Any, Any], base: Path, problems: _Problems) -> TlsSettings | None:
    where = "tls_server_config"
    for key in sec:
        if key not in _TLS_KEYS:
            problems.add(f"{where}.{key}", "unknown key")
    if not any(sec.get(k) for k in sec if k in _TLS_KEYS):
        return None
    for key in ("cipher_suites", "curve_preferences"):
        if sec.get(key):
            problems.add(
                f"{where}.{key}",
                "not supported by nswatch (OpenSSL's defaults apply); remove it",
            )

    def pem(inline: str, file_key: str) -> Pem | None:
        text = _str(sec, inline, where, problems)
        name = _str(sec, file_key, where, problems)
        if text is not None and name is not None:
            problems.add(f"{where}.{file_key}", f"give either {inline} or {file_key}, not both")
            return None
        if name is None:
            return None if text is None else Pem(text=text)
        file = base / name  # relative to the web config's directory, as in Prometheus
        try:
            file.read_text()
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            problems.add(f"{where}.{file_key}", f"cannot read {str(file)!r}: {reason}")
            return None
        return Pem(file=file)

    cert = pem("cert", "cert_file")
    key = pem("key", "key_file")
    client_ca = pem("client_ca", "client_ca_file")
    if cert is None and not ({"cert", "cert_file"} & set(sec)):
        problems.add(where, "missing one of cert or cert_file")
    if key is None and not ({"key", "key_file"} & set(sec)):
        problems.add(where, "missing one of key or key_file")

    auth = _str(sec, "client_auth_type", where, problems) or "NoClientCert"
    verify = _CLIENT_AUTH.get(auth)
    if auth in _UNVERIFIED_CLIENT_AUTH:
        problems.add(
            f"{where}.client_auth_type",
            f"{auth} (accepting a client certificate without verifying it) is not supported; "
            "use RequireAndVerifyClientCert",
        )
    elif verify is None:
        problems.add(
            f"{where}.client_auth_type",
            f"unknown policy {auth!r} (expected one of {', '.join(_CLIENT_AUTH)})",
        )
    has_ca = "client_ca" in sec or "client_ca_file" in sec
    if has_ca and verify == ssl.CERT_NONE:
        problems.add(
            f"{where}.client_ca_file",
            "a client CA needs a client_auth_type that verifies (RequireAndVerifyClientCert)",
        )
    if verify in (ssl.CERT_OPTIONAL, ssl.CERT_REQUIRED) and not has_ca:
        problems.add(f"{where}.client_auth_type", f"{auth} needs client_ca_file (or client_ca)")

    sans = sec.get("client_allowed_sans")
    allowed: tuple[str, ...] | None = None
    if sans is not None:
        if not isinstance(sans, list) or not all(isinstance(s, str) for s in sans):
            problems.add(f"{where}.client_allowed_sans", "must be a list of strings")
        else:
            allowed = tuple(sans)
            if verify != ssl.CERT_REQUIRED:
                problems.add(
                    f"{where}.client_allowed_sans",
                    "needs client_auth_type RequireAndVerifyClientCert",
                )

    versions = []
    for vkey, default in (("min_version", "TLS12"), ("max_version", "TLS13")):
        name = _str(sec, vkey, where, problems) or default
        version = _TLS_VERSIONS.get(name)
        if version is None:
            problems.add(
                f"{where}.{vkey}", f"unknown version {name!r} (expected {', '.join(_TLS_VERSIONS)})"
            )
            version = _TLS_VERSIONS[default]
        versions.append(version)
    if versions[0] > versions[1]:
        problems.add(f"{where}.min_version", "is above max_version")
    prefer = sec.get("prefer_server_cipher_suites", True)
    if not isinstance(prefer, bool):
        problems.add(f"{where}.prefer_server_cipher_suites", "must be true or false")
        prefer = True

    if cert is None or key is None or verify is None or problems.found:
        return None
    settings = TlsSettings(cert, key, client_ca, verify, versions[0], versions[1], prefer, allowed)
    try:
        settings.context()
    except (OSError, ssl.SSLError) as e:
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e)
        problems.add(where, f"certificate, key or client CA not usable: {reason}")
        return None
    return settings


def _users(sec: dict[Any, Any], problems: _Problems) -> dict[str, bytes]:
    users: dict[str, bytes] = {}
    for user, hashed in sec.items():
        where = f"basic_auth_users.{user}"
        if not isinstance(user, str) or ":" in user or not user:
            problems.add(where, "a user name must be a non-empty string without ':'")
            continue
        m = _BCRYPT_HASH.fullmatch(hashed) if isinstance(hashed, str) else None
        if m is None or not 4 <= int(m.group(1)) <= 31:
            problems.add(where, 'must be a bcrypt hash (e.g. from `htpasswd -nBC 10 ""`)')
            continue
        users[user] = hashed.encode()
    return users


def _headers(sec: dict[Any, Any], problems: _Problems) -> tuple[tuple[str, str], ...]:
    where = "http_server_config"
    for key in sec:
        if key not in ("http2", "headers"):
            problems.add(f"{where}.{key}", "unknown key")
    if not isinstance(sec.get("http2", True), bool):
        problems.add(f"{where}.http2", "must be true or false")
    headers = sec.get("headers") or {}
    if not isinstance(headers, dict):
        problems.add(f"{where}.headers", "must be a mapping")
        return ()
    out: list[tuple[str, str]] = []
    for name, value in headers.items():
        if name not in _HEADERS:
            problems.add(f"{where}.headers.{name}", f"not one of {', '.join(_HEADERS)}")
            continue
        if value is None or value == "":
            continue
        allowed = _HEADERS[name]
        if not isinstance(value, str) or "\r" in value or "\n" in value:
            problems.add(f"{where}.headers.{name}", "must be a one-line string")
        elif allowed is not None and value.lower() not in allowed:
            problems.add(f"{where}.headers.{name}", f"must be one of {', '.join(sorted(allowed))}")
        else:
            out.append((name, value))
    return tuple(out)


def _rate_limit(sec: dict[Any, Any], problems: _Problems) -> RateLimit | None:
    if not sec:
        return None
    for key in sec:
        if key not in ("interval", "burst"):
            problems.add(f"rate_limit.{key}", "unknown key")
    interval = parse_duration(sec.get("interval", 0))
    if interval is None:
        problems.add("rate_limit.interval", "must be a duration like 1s or 250ms")
        return None
    burst = sec.get("burst", 0)
    if not isinstance(burst, int) or isinstance(burst, bool) or burst < 0:
        problems.add("rate_limit.burst", "must be a non-negative integer")
        return None
    if interval == 0:
        return None
    if burst == 0:
        problems.add("rate_limit.burst", "must be at least 1 when interval is set")
        return None
    return RateLimit(interval, burst)


def parse_duration(value: object) -> float | None:
    """A Go duration (``1m30s``, ``250ms``; a bare 0) in seconds, or None if it is not one."""
    if isinstance(value, int) and not isinstance(value, bool) and value == 0:
        return 0.0
    if not isinstance(value, str) or not value:
        return None
    if value == "0":
        return 0.0
    pos, total = 0, 0.0
    for m in _DURATION_PART.finditer(value):
        if m.start() != pos:
            return None
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    return total if pos == len(value) else None


class BasicAuth:
    """Checks ``Authorization: Basic`` against the bcrypt hashes, remembering successes.

    bcrypt is slow on purpose (about 50 ms at cost 10); a scraper sends the
    same credentials every time, so a success is remembered under a SHA-256
    of the credentials and the hash (never the password itself), and a
    scrape storm costs one bcrypt per distinct good credential.
    """

    CACHE_SIZE = 1024

    def __init__(self, users: Mapping[str, bytes]) -> None:
        self._users = dict(users)
        self._good: set[bytes] = set()
        self._lock = threading.Lock()
        # An unknown user still costs one bcrypt, so timing does not tell
        # which user names exist.
        self._decoy = bcrypt.hashpw(os.urandom(16), bcrypt.gensalt(10))

    @staticmethod
    def parse(header: str | None) -> tuple[str, str] | None:
        """(user, password) out of an Authorization header, or None."""
        if header is None:
            return None
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        user, sep, password = decoded.partition(":")
        return (user, password) if sep else None

    def _key(self, user: str, password: str, hashed: bytes) -> bytes:
        h = hashlib.sha256()
        for part in (user.encode(), password.encode(), hashed):
            h.update(len(part).to_bytes(4, "big"))
            h.update(part)
        return h.digest()

    def cached(self, header: str | None) -> bool | None:
        """True if these credentials passed before; False if malformed; None if bcrypt must say."""
        creds = self.parse(header)
        if creds is None:
            return False
        hashed = self._users.get(creds[0])
        if hashed is None:
            return None
        with self._lock:
            return True if self._key(creds[0], creds[1], hashed) in self._good else None

    def check(self, header: str | None) -> bool:
        """Whether the header carries a user's right password (slow unless remembered)."""
        creds = self.parse(header)
        if creds is None:
            return False
        user, password = creds
        hashed = self._users.get(user)
        if hashed is None:
            bcrypt.checkpw(password.encode(), self._decoy)
            return False
        key = self._key(user, password, hashed)
        with self._lock:
            if key in self._good:
                return True
        if not bcrypt.checkpw(password.encode(), hashed):
            return False
        with self._lock:
            if len(self._good) >= self.CACHE_SIZE:
                self._good.clear()
            self._good.add(key)
        return True
