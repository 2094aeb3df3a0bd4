"""The cluster store: a small etcd v3 client over etcd's JSON gRPC gateway.

etcd (3.4 and later) serves, next to its gRPC API, a JSON translation of it on the
same client URL: ``POST /v3/kv/range`` with ``{"key": "<base64>"}`` answers the
``RangeResponse`` as JSON. This module speaks that gateway with ``requests`` and
nothing else, so the agent needs neither grpcio nor generated protobuf code.

What the gateway's JSON looks like, and what :class:`Etcd` makes of it:

* keys and values are bytes, sent base64-encoded; here they are ``str`` (UTF-8, with
  ``surrogateescape`` so that bytes written by other clients still read back and
  write back unchanged);
* 64-bit integers (revisions, lease ids, member ids) come as decimal strings and
  fields at their zero value are left out (``"type"`` of a PUT event, ``"succeeded"``
  of a failed transaction, ``"TTL"`` of an expired lease): the parsers here read every
  field with its default;
* an error is an HTTP status >= 400 with ``{"error": ..., "code": <gRPC code>,
  "message": ...}``; it becomes :class:`EtcdError` with that message and ``code``;
* the streaming calls (``/v3/watch``, ``/v3/lease/keepalive``) answer one JSON object
  per line, ``{"result": {...}}`` or ``{"error": {...}}``. A keep-alive stream ends
  after its one answer since the request body ends after one request; a watch does
  not end by itself and is read only as far as needed, then closed.

Endpoints: a client is given every member's client URL. It talks to one at a time and
remembers the last one that answered. When an endpoint cannot be reached (connection
refused, connect timeout, TLS handshake refused) it moves on to the next; when none
answers, one :class:`EtcdError` names each endpoint with its reason. A read (and a
lease keep-alive or revoke, which are safe to repeat) also moves on when the member
does not answer in time, or answers "unavailable" (gRPC code 14: no leader, request
timed out). A write whose request may have reached a member before the connection
broke or the answer timed out is *not* sent again elsewhere -- a transaction applied
twice would report a lost compare-and-swap that was in fact won -- and fails with a
hint to read the state back. The client does not wait out a leader election: while a
cluster has no leader, its members cannot serve linearizable requests and the caller
sees an EtcdError; retrying is the caller's policy. Proxy variables from the
environment are ignored: the members are reached directly.

Leases: etcd raises a TTL below its minimum (1.5 election timeouts rounded up to whole
seconds: 2 s with the default 1 s election timeout). :meth:`Etcd.lease_grant` answers
the lease id only; :meth:`Etcd.lease_time_to_live` tells the TTL that was granted, and
:meth:`Etcd.lease_keepalive` answers it on each renewal.

One :class:`Etcd` object holds one HTTP session and is meant for one thread at a time.

>>> prefix_range_end("nodes/")
b'nodes0'
>>> absent("lock/a").to_json()["target"], value_is("k", "v").to_json()["value"]
('CREATE', 'dg==')
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import requests
import urllib3.exceptions

from ..errors import ImgbaseError, InputError

DEFAULT_TIMEOUT = 5.0  # seconds for a connection or for an answer, per endpoint
PAGE_SIZE = 1000  # keys per range request when reading a prefix

GRPC_NOT_FOUND = 5
GRPC_OUT_OF_RANGE = 11
GRPC_UNAVAILABLE = 14

UNREACHABLE_HINT = (
    "check that etcd runs on the members and that the endpoints are the members' "
    "client URLs (http(s)://HOST:2379)"
)
TLS_HINT = (
    "check the TLS files: the CA must be the one that signed the members' certificates, "
    "and a member started with --client-cert-auth needs a client certificate and key "
    "signed by its trusted CA"
)


class EtcdError(ImgbaseError):
    """etcd could not be reached, or refused a request (``code``: the gRPC status code)."""

    def __init__(self, message: str, hint: str | None = None, code: int | None = None) -> None:
        super().__init__(message, hint=hint)
        self.code = code


# --- encoding ------------------------------------------------------------------------


def _bytes(text: str | bytes) -> bytes:
    return text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")


def _b64(text: str | bytes) -> str:
    """Base64 of a key or value, as the gateway wants it.

    >>> _b64("foo")
    'Zm9v'
    """
    return base64.b64encode(_bytes(text)).decode("ascii")


def _unb64(data: str | None) -> str:
    """A key or value from the gateway as ``str``; absent means empty.

    >>> _unb64("Zm9v"), _unb64(None)
    ('foo', '')
    """
    return base64.b64decode(data or "").decode("utf-8", "surrogateescape")


def _int(value: object) -> int:
    """A 64-bit integer field: a decimal string in the JSON, left out when zero.

    >>> _int("42"), _int(None), _int(7)
    (42, 0, 7)
    """
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise EtcdError(f"etcd answered {value!r} where a number was expected")
    return int(value)


def prefix_range_end(prefix: str | bytes) -> bytes:
    """The ``range_end`` that makes a range cover every key starting with ``prefix``.

    The last byte that can be incremented is, and the rest dropped; with no such byte
    (empty prefix, or only 0xff bytes), ``b"\\x00"`` means "every key from here on".

    >>> prefix_range_end("a/")
    b'a0'
    >>> prefix_range_end(b"a\\xff")
    b'b'
    >>> prefix_range_end(b"\\xff\\xff"), prefix_range_end("")
    (b'\\x00', b'\\x00')
    """
    data = _bytes(prefix)
    for i in reversed(range(len(data))):
        if data[i] < 0xFF:
            return data[:i] + bytes([data[i] + 1])
    return b"\x00"


# --- results -------------------------------------------------------------------------


class Value(NamedTuple):
    """A key's value and the revision of its last change."""

    value: str
    mod_revision: int


class Entry(NamedTuple):
    """A key under a prefix; ``lease`` is 0 when the key has none."""

    key: str
    value: str
    mod_revision: int
    lease: int
    create_revision: int = 0


class Change(NamedTuple):
    """One event of a key's history; ``value`` is None for a delete."""

    revision: int
    key: str
    value: str | None


class LeaseTTL(NamedTuple):
    """A lease's remaining seconds and the TTL etcd granted (may exceed the one asked)."""

    ttl: int
    granted_ttl: int


class Status(NamedTuple):
    """One member's view, from ``/v3/maintenance/status``."""

    endpoint: str
    member_id: int
    leader: int  # the leader's member id (0: none known)
    version: str
    revision: int
    raft_term: int
    db_size: int

    @property
    def is_leader(self) -> bool:
        return self.leader != 0 and self.leader == self.member_id


class Member(NamedTuple):
    """A cluster member, from ``/v3/cluster/member/list``; ``name`` is "" until started."""

    id: int
    name: str
    peer_urls: list[str]
    client_urls: list[str]


def _entry(kv: dict[str, Any]) -> Entry:
    return Entry(
        _unb64(kv.get("key")),
        _unb64(kv.get("value")),
        _int(kv.get("mod_revision")),
        _int(kv.get("lease")),
        _int(kv.get("create_revision")),
    )


# --- transactions --------------------------------------------------------------------

Target = Literal["VERSION", "CREATE", "MOD", "VALUE", "LEASE"]
Result = Literal["EQUAL", "GREATER", "LESS", "NOT_EQUAL"]
_TARGET_FIELD = {
    "VERSION": "version",
    "CREATE": "create_revision",
    "MOD": "mod_revision",
    "VALUE": "value",
    "LEASE": "lease",
}


@dataclass(frozen=True)
class Compare:
    """One condition of a transaction: ``target`` of ``key`` ``result`` ``value``."""

    key: str
    target: Target
    result: Result
    value: int | str

    def to_json(self) -> dict[str, Any]:
        value = self.value
        operand = _b64(str(value)) if self.target == "VALUE" else str(_int(value))
        return {
            "key": _b64(self.key),
            "target": self.target,
            "result": self.result,
            _TARGET_FIELD[self.target]: operand,
        }


def absent(key: str) -> Compare:
    """The key does not exist (its create_revision is 0)."""
    return Compare(key, "CREATE", "EQUAL", 0)


def exists(key: str) -> Compare:
    """The key exists."""
    return Compare(key, "CREATE", "GREATER", 0)


def value_is(key: str, value: str) -> Compare:
    """The key exists with this value."""
    return Compare(key, "VALUE", "EQUAL", value)


def mod_revision_is(key: str, revision: int) -> Compare:
    """The key was last changed at this revision (0: the key is absent)."""
    return Compare(key, "MOD", "EQUAL", revision)


@dataclass(frozen=True)
class Put:
    """Set a key, optionally attached to a lease."""

    key: str
    value: str
    lease: int | None = None

    def to_json(self) -> dict[str, Any]:
        req: dict[str, Any] = {"key": _b64(self.key), "value": _b64(self.value)}
        if self.lease:
            req["lease"] = str(self.lease)
        return {"request_put": req}


@dataclass(frozen=True)
class Delete:
    """Delete a key, or every key under a prefix."""

    key: str
    prefix: bool = False

    def to_json(self) -> dict[str, Any]:
        req = {"key": _b64(self.key)}
        if self.prefix:
            req["range_end"] = _b64(prefix_range_end(self.key))
        return {"request_delete_range": req}


@dataclass(frozen=True)
class Range:
    """Read a key, or every key under a prefix (in key order)."""

    key: str
    prefix: bool = False

    def to_json(self) -> dict[str, Any]:
        req = {"key": _b64(self.key)}
        if self.prefix:
            req["range_end"] = _b64(prefix_range_end(self.key))
        return {"request_range": req}


Op = Put | Delete | Range


class OpResult(NamedTuple):
    """The answer to one operation of a transaction.

    ``entries`` for a range, ``deleted`` for a delete; ``revision`` is the store's
    revision after the transaction (for a put: the revision the put got).
    """

    kind: Literal["put", "delete", "range"]
    revision: int
    entries: list[Entry]
    deleted: int


class TxnResult(NamedTuple):
    """Whether the compares held (and so which branch ran), and that branch's answers."""

    succeeded: bool
    responses: list[OpResult]


def _op_result(resp: dict[str, Any], revision: int) -> OpResult:
    if "response_range" in resp:
        kvs = resp["response_range"].get("kvs", [])
        return OpResult("range", revision, [_entry(kv) for kv in kvs], 0)
    if "response_delete_range" in resp:
        deleted = _int(resp["response_delete_range"].get("deleted"))
        return OpResult("delete", revision, [], deleted)
    if "response_put" in resp:
        return OpResult("put", revision, [], 0)
    raise EtcdError(f"etcd answered a transaction operation this client does not know: {resp}")


# --- the client ----------------------------------------------------------------------


def _never_sent(exc: requests.RequestException) -> bool:
    """True when the request cannot have reached the server (no connection was made)."""
    if isinstance(exc, requests.exceptions.ConnectTimeout | requests.exceptions.SSLError):
        return True
    reason = exc.args[0] if exc.args else None
    if isinstance(reason, urllib3.exceptions.MaxRetryError):
        reason = reason.reason
    return isinstance(reason, urllib3.exceptions.NewConnectionError)


def _reason(exc: requests.RequestException, client_cert: bool = True) -> str:
    """The useful end of a requests/urllib3 error chain, on one line.

    >>> _reason(requests.ConnectionError("Max retries exceeded (Caused by X: Connection refused)"))
    'connection refused'

    A member that requires a client certificate ends the TLS session of a client without
    one with an alert, or -- as often, with TLS 1.3 -- by just closing it:

    >>> eof = "(Caused by SSLError(SSLEOFError(8, 'EOF occurred in violation of protocol')))"
    >>> _reason(requests.exceptions.SSLError(eof), client_cert=False).partition(" (")[0]
    'the member requires a client certificate and none was given'
    >>> _reason(requests.exceptions.SSLError(
    ...     "(Caused by SSLError(SSLError(1, '[SSL: SSLV3_ALERT_BAD_CERTIFICATE] sslv3 alert bad "
    ...     "certificate (_ssl.c:2580)')))"))
    'the member refused the client certificate (sslv3 alert bad certificate)'
    """
    text = " ".join(str(exc).split())
    if isinstance(exc, requests.exceptions.SSLError):
        ssl = re.search(r"\[SSL: ([A-Z0-9_]+)\] (.+?)(?: \(_ssl\.c:\d+\))?'", text)
        eof = re.search(r"(EOF occurred in violation of protocol|unexpected eof[^'(]*)", text,
                        re.IGNORECASE)
        name, detail = ssl.groups() if ssl else ("", eof.group(1).strip() if eof else text[-200:])
        if "CERTIFICATE_VERIFY_FAILED" in name:
            return f"the member's certificate is not trusted: {detail}"
        refused = "BAD_CERTIFICATE" in name or "CERTIFICATE_REQUIRED" in name
        if refused or eof:
            if not client_cert:
                return f"the member requires a client certificate and none was given ({detail})"
            if refused:
                return f"the member refused the client certificate ({detail})"
            return f"the member ended the TLS session ({detail})"
        return detail
    for marker, said in (("Connection refused", "connection refused"),
                         ("timed out", "timed out"),
                         ("Name or service not known", "unknown host name")):
        if marker in text:
            return said
    if "Caused by" in text:
        text = text.split("Caused by", 1)[1].strip(" ()")
    return text[:300]


class Etcd:
    """A client for an etcd v3 cluster, given its members' client URLs.

    ``ca``: the CA file to verify the members' certificates with (default: the system's);
    ``cert`` and ``key``: a client certificate, for members that require one;
    ``timeout``: seconds to wait for a connection, then for an answer, per endpoint.
    A single URL string is taken as a list of one.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        ca: str | Path | None = None,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        user: str | None = None,
        password: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        if isinstance(endpoints, str):
            endpoints = [endpoints]
        if not endpoints:
            raise InputError("no etcd endpoint given", hint="give the members' client URLs")
        for url in endpoints:
            if not url.startswith(("http://", "https://")):
                raise InputError(
                    f"etcd endpoint {url!r} is not an http:// or https:// URL",
                    hint="give client URLs such as https://10.0.0.1:2379",
                )
        if (cert is None) != (key is None):
            raise InputError(
                "an etcd client certificate needs both its certificate and its key file",
                hint="give both cert= and key=, or neither",
            )
        for what, path in (("CA", ca), ("client certificate", cert), ("client key", key)):
            if path is not None and not Path(path).is_file():
                raise InputError(f"etcd {what} file {path} does not exist",
                                 hint="give the path of a PEM file")
        self._endpoints = [url.rstrip("/") for url in endpoints]
        self._current = 0
        self.timeout = timeout
        self._session = requests.Session()
        self._session.trust_env = False  # no proxies from the environment
        self._session.verify = str(ca) if ca is not None else True
        if cert is not None and key is not None:
            self._session.cert = (str(cert), str(key))
        if (user is None) != (password is None):
            raise InputError("an etcd user needs both its name and its password",
                             hint="give both user= and password=, or neither")
        self.user, self._password = user, password
        self._token: str | None = None

    # -- plumbing --

    @property
    def endpoints(self) -> list[str]:
        return list(self._endpoints)

    @property
    def endpoint(self) -> str:
        """The endpoint tried first: the last one that answered."""
        return self._endpoints[self._current]

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> Etcd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _post_once(
        self,
        path: str,
        body: dict[str, Any],
        *,
        idempotent: bool,
        stream: bool = False,
        only: str | None = None,
    ) -> tuple[str, requests.Response]:
        """POST to the first endpoint that answers; its URL and the (status 200) answer."""
        if only is not None:
            candidates = [only.rstrip("/")]
        else:
            n = len(self._endpoints)
            candidates = [self._endpoints[(self._current + k) % n] for k in range(n)]
        failures: list[str] = []
        tls_failed = False
        unavailable: EtcdError | None = None
        for endpoint in candidates:
            try:
                resp = self._session.post(
                    endpoint + path, json=body, timeout=self.timeout, stream=stream
                )
            except requests.RequestException as exc:
                if isinstance(exc, requests.exceptions.SSLError):
                    tls_failed = True
                    reason = _reason(exc, client_cert=self._session.cert is not None)
                    failures.append(f"{endpoint} (TLS: {reason})")
                    continue
                if not isinstance(exc, requests.ConnectionError | requests.Timeout):
                    raise EtcdError(f"etcd request to {endpoint}{path} failed: {exc}") from exc
                if not idempotent and not _never_sent(exc):
                    what = "did not answer in time" if isinstance(exc, requests.Timeout) else (
                        "dropped the connection")
                    raise EtcdError(
                        f"etcd at {endpoint} {what} during {path}: the change may or may not "
                        "have been applied",
                        hint="read the keys back before trying again",
                    ) from exc
                failures.append(f"{endpoint} ({_reason(exc)})")
                continue
            if resp.status_code != 200:
                error = self._error(endpoint, path, resp)
                if idempotent and error.code == GRPC_UNAVAILABLE and len(candidates) > 1:
                    unavailable = error
                    failures.append(f"{endpoint} ({error.message})")
                    continue
                raise error
            if only is None:
                self._current = self._endpoints.index(endpoint)
            return endpoint, resp
        if unavailable is not None:
            raise EtcdError(
                f"no etcd member could serve {path}: {'; '.join(failures)}",
                hint=unavailable.hint,
                code=GRPC_UNAVAILABLE,
            )
        raise EtcdError(
            f"no etcd endpoint answered: {'; '.join(failures)}",
            hint=TLS_HINT if tls_failed else UNREACHABLE_HINT,
        )

    def _error(self, endpoint: str, path: str, resp: requests.Response) -> EtcdError:
        """The gateway's error answer as an EtcdError (read, then the answer is closed)."""
        with resp:
            text = resp.text
        try:
            body = json.loads(text)
        except ValueError:
            body = None
        if isinstance(body, dict) and (body.get("message") or body.get("error")):
            message = str(body.get("message") or body.get("error"))
            code = body.get("code")
            return _grpc_error(message, code if isinstance(code, int) else None)
        return EtcdError(
            f"etcd at {endpoint} answered HTTP {resp.status_code} to {path}: "
            f"{' '.join(text.split())[:200] or 'no body'}",
            hint="the URL may not be an etcd v3 client URL (etcd >= 3.4 serves /v3/)",
        )

    def _authenticate(self) -> None:
        """A token for the user (etcd's simple tokens expire when unused: asked again)."""
        assert self.user is not None and self._password is not None
        self._session.headers.pop("Authorization", None)
        data = self._call("/v3/auth/authenticate",
                          {"name": self.user, "password": self._password}, idempotent=True,
                          auth=False)
        token = data.get("token")
        if not isinstance(token, str) or not token:
            raise EtcdError(f"etcd authenticated {self.user} without a token: {data}")
        self._token = token
        self._session.headers["Authorization"] = token

    def _post(self, path: str, body: dict[str, Any], *, idempotent: bool,
              stream: bool = False, only: str | None = None,
              auth: bool = True) -> tuple[str, requests.Response]:
        """:meth:`_post_once` as the configured user: authenticated first, and once more
        when etcd says the token is no longer valid."""
        if not auth or self.user is None:
            return self._post_once(path, body, idempotent=idempotent, stream=stream,
                                   only=only)
        if self._token is None:
            self._authenticate()
        try:
            return self._post_once(path, body, idempotent=idempotent, stream=stream, only=only)
        except EtcdError as exc:
            if "invalid auth token" not in exc.message and "user name is empty" not in exc.message:
                raise
        self._authenticate()
        return self._post_once(path, body, idempotent=idempotent, stream=stream, only=only)

    def _call(
        self, path: str, body: dict[str, Any], *, idempotent: bool, only: str | None = None,
        auth: bool = True,
    ) -> dict[str, Any]:
        endpoint, resp = self._post(path, body, idempotent=idempotent, only=only, auth=auth)
        with resp:
            try:
                data = resp.json()
            except ValueError as exc:
                raise EtcdError(f"etcd at {endpoint} answered {path} with no JSON") from exc
        if not isinstance(data, dict):
            raise EtcdError(f"etcd at {endpoint} answered {path} with {data!r}")
        return data

    @staticmethod
    def _stream_message(line: bytes, endpoint: str) -> dict[str, Any]:
        """One line of a streaming answer: its ``result``, or the error it carries."""
        try:
            msg = json.loads(line)
        except ValueError as exc:
            raise EtcdError(f"etcd at {endpoint} sent a line that is not JSON: {line!r}") from exc
        if isinstance(msg, dict) and isinstance(msg.get("error"), dict):
            err = msg["error"]
            code = err.get("grpc_code", err.get("code"))
            raise _grpc_error(str(err.get("message")), code if isinstance(code, int) else None)
        if not isinstance(msg, dict) or not isinstance(msg.get("result"), dict):
            raise EtcdError(f"etcd at {endpoint} sent an unexpected message: {msg!r}")
        result: dict[str, Any] = msg["result"]
        return result

    # -- keys --

    def put(self, key: str, value: str, lease: int | None = None) -> int:
        """Set a key (attached to ``lease`` if given); the revision of the change."""
        body = Put(key, value, lease).to_json()["request_put"]
        data = self._call("/v3/kv/put", body, idempotent=False)
        return _int(data.get("header", {}).get("revision"))

    def get(self, key: str, *, revision: int | None = None) -> Value | None:
        """A key's value and mod revision (at ``revision``, default now); None if absent."""
        body: dict[str, Any] = {"key": _b64(key)}
        if revision is not None:
            body["revision"] = str(revision)
        data = self._call("/v3/kv/range", body, idempotent=True)
        kvs = data.get("kvs") or []
        if not kvs:
            return None
        entry = _entry(kvs[0])
        return Value(entry.value, entry.mod_revision)

    def get_prefix(self, prefix: str, *, revision: int | None = None) -> list[Entry]:
        """Every key under ``prefix`` in key order, at ``revision`` (default: now).

        Read in pages of PAGE_SIZE keys, all at the revision of the first page, so the
        list is one consistent snapshot.
        """
        end = _b64(prefix_range_end(prefix))
        start = _b64(prefix)
        entries: list[Entry] = []
        while True:
            body: dict[str, Any] = {"key": start, "range_end": end, "limit": str(PAGE_SIZE)}
            if revision is not None:
                body["revision"] = str(revision)
            data = self._call("/v3/kv/range", body, idempotent=True)
            kvs = data.get("kvs") or []
            entries.extend(_entry(kv) for kv in kvs)
            if not data.get("more") or not kvs:
                return entries
            if revision is None:
                revision = _int(data.get("header", {}).get("revision"))
            start = _b64(base64.b64decode(kvs[-1]["key"]) + b"\x00")

    def delete(self, key: str) -> int:
        """Delete a key; how many keys were deleted (0 or 1)."""
        data = self._call("/v3/kv/deleterange", {"key": _b64(key)}, idempotent=False)
        return _int(data.get("deleted"))

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under ``prefix``; how many were deleted."""
        body = Delete(prefix, prefix=True).to_json()["request_delete_range"]
        data = self._call("/v3/kv/deleterange", body, idempotent=False)
        return _int(data.get("deleted"))

    def revision(self) -> int:
        """The store's current revision."""
        data = self._call("/v3/kv/range", {"key": _b64("\0"), "count_only": True},
                          idempotent=True)
        return _int(data.get("header", {}).get("revision"))

    # -- leases --

    def lease_grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds; its id.

        etcd raises a TTL below its minimum (1.5 election timeouts, rounded up: 2 s with
        the default 1 s election timeout) to that minimum: the TTL granted is the one
        :meth:`lease_time_to_live` and :meth:`lease_keepalive` answer.
        """
        if ttl < 1:
            raise ValueError(f"a lease needs a TTL of at least 1 s, not {ttl}")
        data = self._call("/v3/lease/grant", {"TTL": str(ttl)}, idempotent=False)
        lease = _int(data.get("ID"))
        if not lease:
            raise EtcdError(f"etcd granted no lease: {data.get('error') or data}")
        return lease

    def lease_keepalive(self, lease: int) -> int:
        """Renew a lease; its TTL from now, or 0 when it is gone (expired or revoked).

        A lease that is gone has taken its keys with it: grant a new one.
        """
        endpoint, resp = self._post("/v3/lease/keepalive", {"ID": str(lease)}, idempotent=True)
        with resp:
            lines = [line for line in resp.iter_lines() if line.strip()]
        if not lines:
            raise EtcdError(f"etcd at {endpoint} answered a lease keep-alive with nothing")
        result = self._stream_message(lines[0], endpoint)
        return _int(result.get("TTL"))

    def lease_revoke(self, lease: int) -> bool:
        """Revoke a lease, deleting its keys; False when it was already gone."""
        try:
            self._call("/v3/lease/revoke", {"ID": str(lease)}, idempotent=True)
        except EtcdError as exc:
            if exc.code == GRPC_NOT_FOUND:
                return False
            raise
        return True

    def lease_time_to_live(self, lease: int) -> LeaseTTL | None:
        """A lease's remaining and granted TTL; None when it is gone."""
        data = self._call("/v3/lease/timetolive", {"ID": str(lease)}, idempotent=True)
        ttl = _int(data.get("TTL"))
        if ttl < 0:
            return None
        return LeaseTTL(ttl, _int(data.get("grantedTTL")))

    # -- transactions --

    def txn(
        self,
        compare: Sequence[Compare],
        success: Sequence[Op],
        failure: Sequence[Op] = (),
    ) -> TxnResult:
        """If every compare holds, run ``success``, else ``failure``: atomically.

        Create-if-absent, the step of a lock or a semaphore slot, answering the holder
        when the slot is taken::

            ok, (answer,) = etcd.txn([absent("sem/1")], [Put("sem/1", "node-a", lease)],
                                     [Range("sem/1")])
            holder = None if ok else answer.entries[0].value
        """
        body = {
            "compare": [c.to_json() for c in compare],
            "success": [op.to_json() for op in success],
            "failure": [op.to_json() for op in failure],
        }
        data = self._call("/v3/kv/txn", body, idempotent=False)
        revision = _int(data.get("header", {}).get("revision"))
        responses = [_op_result(r, revision) for r in data.get("responses") or []]
        return TxnResult(bool(data.get("succeeded", False)), responses)

    # -- history --

    def changes(self, prefix: str, start_revision: int) -> list[Change]:
        """The puts and deletes under ``prefix`` from ``start_revision`` to now, in order.

        Read with a watch from ``start_revision``: the watch's "created" answer carries
        the current revision R, then the history arrives in revision order. The watch
        covers the whole key space, because every revision from 2 to R is the revision
        of at least one event somewhere (etcd counts a revision only for a change), so
        the stream surely reaches R; a watch on the prefix alone would wait forever when
        the prefix's last change is older. Events outside the prefix are dropped here.
        History older than the last compaction is gone: that is an EtcdError. A stream
        that stalls is ended by the read timeout, also with an EtcdError. Meant for
        small histories (tests, audits): every event of the range is transferred.
        """
        if start_revision < 1:
            raise ValueError(f"revisions start at 1, not {start_revision}")
        everything = _b64(b"\0")
        body = {"create_request": {"key": everything, "range_end": everything,
                                   "start_revision": str(start_revision)}}
        want = _bytes(prefix)
        endpoint, resp = self._post("/v3/watch", body, idempotent=True, stream=True)
        found: list[Change] = []
        with resp:
            try:
                lines = self._lines(resp)
                current: int | None = None
                for line in lines:
                    msg = self._stream_message(line, endpoint)
                    if msg.get("canceled"):
                        raise _history_gone(prefix, start_revision, msg)
                    if current is None:
                        if not msg.get("created"):
                            raise EtcdError(f"etcd at {endpoint} began a watch with {msg!r}")
                        current = _int(msg.get("header", {}).get("revision"))
                        if start_revision > current or current < 2:
                            return found
                        continue
                    last = 0
                    for event in msg.get("events") or []:
                        kv = event.get("kv", {})
                        last = _int(kv.get("mod_revision"))
                        if last > current:
                            break
                        key = base64.b64decode(kv.get("key", ""))
                        if key.startswith(want):
                            value = None if event.get("type") == "DELETE" else _unb64(
                                kv.get("value"))
                            found.append(Change(last, _unb64(kv.get("key")), value))
                    if last >= current:
                        return found
            except requests.RequestException as exc:
                raise EtcdError(
                    f"etcd at {endpoint} stopped sending the history of {prefix!r}: "
                    f"{_reason(exc)}",
                    hint="retry; a member under load may need a longer timeout",
                ) from exc
        raise EtcdError(f"etcd at {endpoint} ended the history of {prefix!r} early")

    @staticmethod
    def _lines(resp: requests.Response) -> Iterator[bytes]:
        # The stream is chunked: urllib3 hands each chunk over as it comes, so this
        # does not wait for 8 KiB to pile up.
        for line in resp.iter_lines(chunk_size=8192):
            if line.strip():
                yield line

    # -- users and roles (the admin's, see :mod:`imgbase.agent.fleet`) --

    def user_add(self, name: str, password: str) -> None:
        """Add a user (it already exists: its password is set)."""
        try:
            self._call("/v3/auth/user/add", {"name": name, "password": password},
                       idempotent=False)
        except EtcdError as exc:
            if "user name already exists" not in exc.message:
                raise
            self._call("/v3/auth/user/changepw", {"name": name, "password": password},
                       idempotent=True)

    def role_add(self, name: str) -> None:
        """Add a role (already there: nothing to do)."""
        try:
            self._call("/v3/auth/role/add", {"name": name}, idempotent=False)
        except EtcdError as exc:
            if "role name already exists" not in exc.message:
                raise

    def role_grant(self, role: str, key: str, *, prefix: bool = False,
                   write: bool = True) -> None:
        """Let ``role`` read (and ``write``) ``key``, or every key under it (``prefix``)."""
        perm: dict[str, Any] = {"permType": "READWRITE" if write else "READ",
                                "key": _b64(key)}
        if prefix:
            perm["range_end"] = _b64(prefix_range_end(key))
        self._call("/v3/auth/role/grant", {"name": role, "perm": perm}, idempotent=True)

    def user_grant(self, user: str, role: str) -> None:
        self._call("/v3/auth/user/grant", {"user": user, "role": role}, idempotent=True)

    def auth_enable(self) -> None:
        self._call("/v3/auth/enable", {}, idempotent=True)

    # -- cluster --

    def status(self, endpoint: str | None = None) -> Status:
        """A member's status: the given endpoint's, else the first one that answers."""
        path = "/v3/maintenance/status"
        data = self._call(path, {}, idempotent=True, only=endpoint)
        header = data.get("header", {})
        return Status(
            endpoint=endpoint.rstrip("/") if endpoint else self.endpoint,
            member_id=_int(header.get("member_id")),
            leader=_int(data.get("leader")),
            version=str(data.get("version", "")),
            revision=_int(header.get("revision")),
            raft_term=_int(data.get("raftTerm", header.get("raft_term"))),
            db_size=_int(data.get("dbSize")),
        )

    def member_list(self) -> list[Member]:
        """The cluster's members."""
        data = self._call("/v3/cluster/member/list", {}, idempotent=True)
        return [
            Member(
                id=_int(m.get("ID")),
                name=str(m.get("name", "")),
                peer_urls=list(m.get("peerURLs") or []),
                client_urls=list(m.get("clientURLs") or []),
            )
            for m in data.get("members") or []
        ]


def _grpc_error(message: str, code: int | None) -> EtcdError:
    """An error answer of etcd, with a hint where one helps.

    >>> _grpc_error("etcdserver: requested lease not found", 5).oneline()
    'etcd: requested lease not found (hint: the lease expired or was revoked; grant a new one)'
    """
    text = " ".join(message.split())
    if text.startswith("etcdserver: "):
        text = text.removeprefix("etcdserver: ")
    hint = None
    if "lease not found" in text:
        hint = "the lease expired or was revoked; grant a new one"
    elif "compacted" in text:
        hint = "ask for a revision after the last compaction"
    elif "future revision" in text:
        hint = "ask for a revision at most the store's current one"
    elif code == GRPC_UNAVAILABLE:
        hint = "the cluster may have lost its quorum or be electing a leader; retry shortly"
    return EtcdError(f"etcd: {text}", hint=hint, code=code)


def _history_gone(prefix: str, start: int, msg: dict[str, Any]) -> EtcdError:
    compacted = _int(msg.get("compact_revision"))
    if compacted:
        return EtcdError(
            f"the history of {prefix!r} from revision {start} is gone: etcd compacted it up "
            f"to revision {compacted}",
            hint=f"ask for the changes from revision {compacted} on",
            code=GRPC_OUT_OF_RANGE,
        )
    reason = msg.get("cancel_reason") or "no reason given"
    return EtcdError(f"etcd canceled the watch on the history of {prefix!r}: {reason}")
