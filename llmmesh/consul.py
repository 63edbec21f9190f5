"""Where Consul is and how to talk to it: the settings routers and workers share.

Precedence, highest first, for every setting: the ``--consul-*`` flag, its ``LLMMESH_CONSUL_*``
variable, then the variable Consul's own tools read, then the default:

============================  ====================================  ===========================
setting                       Consul's variable                     default
============================  ====================================  ===========================
``consul_addr``               ``CONSUL_HTTP_ADDR`` (``host:port``   ``127.0.0.1:8500``
                              or ``scheme://host:port``)
``consul_scheme``             ``CONSUL_HTTP_SSL=true`` -> https;    ``http``
                              else the scheme in the address
``consul_ca_file``            ``CONSUL_CACERT``                     system CAs
``consul_tls_verify``         ``CONSUL_HTTP_SSL_VERIFY``            true
``consul_token``              ``CONSUL_HTTP_TOKEN``, then the file  none
                              named by ``CONSUL_HTTP_TOKEN_FILE``
``consul_datacenter``         (none)                                the agent's
============================  ====================================  ===========================

The token is sent as ``X-Consul-Token`` and never logged or shown in a ``repr``. py-consul lets
``CONSUL_HTTP_TOKEN`` override the token it is given, so :func:`open_client` sets the resolved
token after construction: the precedence above is the one that holds.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from llmmesh import errors

if TYPE_CHECKING:
    import consul.aio

DEFAULT_ADDR = "127.0.0.1:8500"
DEFAULT_SERVICE = "llm-worker"


@dataclass(frozen=True, kw_only=True)
class ConsulSettings:
    """Consul connection settings; router and worker configs inherit them."""

    consul_addr: str = field(
        default="",
        metadata={"help": "Consul agent host:port or scheme://host:port (else CONSUL_HTTP_ADDR, "
                  "else 127.0.0.1:8500)"},
    )  # fmt: skip
    consul_scheme: str = field(
        default="", metadata={"help": "http or https (else CONSUL_HTTP_SSL / the address's)"}
    )
    consul_ca_file: str = field(
        default="",
        metadata={"help": "CA bundle to verify Consul's TLS certificate (CONSUL_CACERT)"},
    )
    consul_tls_verify: bool | None = field(
        default=None,
        metadata={
            "help": "verify Consul's TLS certificate (else CONSUL_HTTP_SSL_VERIFY, else true)"
        },
    )
    consul_token: str = field(
        default="",
        repr=False,
        metadata={"help": "ACL token (else CONSUL_HTTP_TOKEN / CONSUL_HTTP_TOKEN_FILE); prefer "
                  "the environment to a flag, which other users can see"},
    )  # fmt: skip
    consul_datacenter: str = field(
        default="", metadata={"help": "Consul datacenter (default: the agent's)"}
    )
    consul_service: str = field(
        default=DEFAULT_SERVICE, metadata={"help": "Consul service name of the workers"}
    )


@dataclass(frozen=True, kw_only=True)
class ConsulTarget:
    """A resolved Consul endpoint: what a client is built from."""

    host: str
    port: int
    scheme: str
    #: True, False, or the path of a CA bundle.
    verify: bool | str
    token: str = field(repr=False)
    datacenter: str
    service: str

    @property
    def url(self) -> str:
        """Base URL of the agent (no credentials in it)."""
        return f"{self.scheme}://{self.host}:{self.port}"


def resolve(settings: ConsulSettings, environ: Mapping[str, str] | None = None) -> ConsulTarget:
    """Apply the precedence in the module docstring; raises ValueError naming a bad setting."""
    env = os.environ if environ is None else environ
    addr = settings.consul_addr or env.get("CONSUL_HTTP_ADDR", "") or DEFAULT_ADDR
    addr_scheme = ""
    if "://" in addr:
        addr_scheme, addr = addr.split("://", 1)
    host, sep, port_text = addr.rstrip("/").rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"consul_addr: {addr!r} is not host:port or scheme://host:port")
    scheme = settings.consul_scheme
    if not scheme and env.get("CONSUL_HTTP_SSL"):
        scheme = "https" if env["CONSUL_HTTP_SSL"].strip().lower() in ("1", "true") else "http"
    scheme = scheme or addr_scheme or "http"
    if scheme not in ("http", "https"):
        raise ValueError(f"consul_scheme: {scheme!r} is not http or https")
    verify_flag = settings.consul_tls_verify
    if verify_flag is None and env.get("CONSUL_HTTP_SSL_VERIFY"):
        verify_flag = env["CONSUL_HTTP_SSL_VERIFY"].strip().lower() not in ("0", "false", "no")
    ca_file = settings.consul_ca_file or env.get("CONSUL_CACERT", "")
    verify: bool | str = False if verify_flag is False else (ca_file or True)
    token = settings.consul_token or env.get("CONSUL_HTTP_TOKEN", "")
    if not token and env.get("CONSUL_HTTP_TOKEN_FILE"):
        try:
            token = Path(env["CONSUL_HTTP_TOKEN_FILE"]).read_text().strip()
        except OSError as exc:
            raise ValueError(f"CONSUL_HTTP_TOKEN_FILE: cannot read it ({exc.strerror})") from None
    return ConsulTarget(
        host=host.strip("[]"),
        port=int(port_text),
        scheme=scheme,
        verify=verify,
        token=token,
        datacenter=settings.consul_datacenter,
        service=settings.consul_service,
    )


def open_client(target: ConsulTarget, *, timeout_s: float | None = None) -> consul.aio.Consul:
    """A py-consul asyncio client for ``target`` (close it with ``await client.close()``).

    ``timeout_s`` bounds every HTTP request of the client; a client used for blocking queries
    needs it above the query's ``wait`` (or None, bounding each call itself).
    """
    import consul.aio

    kwargs: dict[str, Any] = {
        "host": target.host,
        "port": target.port,
        "scheme": target.scheme,
        "verify": target.verify,
        "token": target.token or None,
        "dc": target.datacenter or None,
        "connections_timeout": timeout_s,
    }
    with warnings.catch_warnings():
        # py-consul 1.8.0 passes verify_ssl / ssl_context, which aiohttp deprecates.
        warnings.filterwarnings(
            "ignore", r"(ssl_context|verify_ssl) is deprecated", DeprecationWarning
        )
        client = consul.aio.Consul(**kwargs)
    # py-consul lets CONSUL_HTTP_TOKEN override the token argument; ours is already resolved.
    client.token = target.token or None
    return client


ConsulErrorKind = Literal[
    "unreachable",
    "timeout",
    "permission_denied",
    "not_found",
    "bad_request",
    "server_error",
    "bad_response",
]


class ConsulError(errors.Unavailable):
    """A Consul agent call failed. :attr:`kind` says how (for logs and metrics), :attr:`op` what
    was being done, :attr:`status` the HTTP status when the agent answered (else None)."""

    def __init__(
        self, kind: ConsulErrorKind, message: str, *, op: str = "", status: int | None = None
    ) -> None:
        super().__init__(message)
        self.kind: ConsulErrorKind = kind
        self.op = op
        self.status = status


@contextlib.contextmanager
def consul_errors(target: ConsulTarget, op: str = "") -> Iterator[None]:
    """Translate what py-consul and aiohttp raise into :class:`ConsulError`: the one place that
    knows their exceptions. Messages name the agent and the operation, never the token."""
    import aiohttp
    import consul.exceptions as ce

    where = f"Consul at {target.url}"
    doing = f" ({op})" if op else ""

    def fail(kind: ConsulErrorKind, message: str, status: int | None = None) -> ConsulError:
        if target.token:
            message = message.replace(target.token, "<token>")
        return ConsulError(kind, message + doing, op=op, status=status)

    try:
        yield
    except ce.ACLPermissionDenied as exc:
        raise fail("permission_denied", f"{where} denied access (403): {exc}", 403) from None
    except ce.ACLDisabled as exc:
        raise fail("permission_denied", f"{where} answered 401: {exc}", 401) from None
    except ce.NotFound as exc:
        raise fail("not_found", f"{where} does not know it (404): {exc}", 404) from None
    except (ce.BadRequest, ce.ClientError) as exc:
        text = str(exc)
        code = text.split(" ", 1)[0]
        status = int(code) if code.isdigit() else None
        raise fail("bad_request", f"{where} rejected the call: {text}", status) from None
    except ce.Timeout:
        raise fail("timeout", f"{where} timed out (599)") from None
    except ce.ConsulException as exc:
        text = str(exc)
        code = text.split(" ", 1)[0]
        status = int(code) if code.isdigit() else None
        kind: ConsulErrorKind = "server_error" if text[:1] == "5" else "bad_response"
        raise fail(kind, f"{where} failed: {text}", status) from None
    except aiohttp.ClientConnectorError as exc:
        reason = exc.os_error.strerror or str(exc.os_error)
        raise fail("unreachable", f"cannot connect to {where}: {reason}") from None
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
        raise fail("unreachable", f"{where} dropped the connection: {exc}") from None
    except aiohttp.ClientError as exc:
        raise fail("bad_response", f"{where}: {type(exc).__name__}: {exc}") from None
    except TimeoutError:
        raise fail("timeout", f"{where} did not answer in time") from None
    except ValueError as exc:  # a body that is not JSON, an index that is not a number
        raise fail("bad_response", f"{where} sent a bad answer: {exc}") from None
