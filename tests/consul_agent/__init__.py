"""A Consul agent double: the HTTP API subset llm-mesh uses, with Consul's semantics, on loopback.

No Consul binary can be installed where the tests run, so :class:`ConsulAgent` serves the
endpoints of ``/work/shared/briefs/consul.md`` from the test's event loop over real HTTP, for
the real ``py-consul`` client and for service processes alike. It behaves as a ``consul agent
-dev`` (one node that is also the server) and follows hashicorp/consul's own code:

- **Registration.** ``PUT /v1/agent/service/register[?replace-existing-checks]`` takes
  ``Name`` (required), ``ID`` (defaults to ``Name``), ``Tags``, ``Address``, ``Port``, ``Meta``
  (Consul's key rules), ``Weights``, and ``Check`` and/or ``Checks`` (``Check`` first). Keys
  match case-insensitively and in snake case, as Consul's decoder does, so py-consul's lowercase
  payloads work. A check with no ``CheckID`` gets ``service:<ID>``, or ``service:<ID>:<n>``
  (from 1) when the service has several. A new check starts ``critical`` unless ``Status`` is
  given; re-registering keeps the status and output of checks that already exist;
  ``replace-existing-checks`` removes the service's checks that are not in the request.
- **Checks.** TTL checks go ``critical`` with output ``TTL expired`` (``TTL expired (last output
  before timeout follows): <output>`` when the last update had one) when not refreshed within
  their TTL, which starts at registration. ``GRPC`` (``host:port[/service]``, the
  ``grpc.health.v1`` Check over plaintext, or TLS with ``GRPCUseTLS``), ``HTTP`` and ``TCP``
  checks are probed on their ``Interval`` (at least ``min_check_interval``, Consul's 1 s, first
  probe after a random stagger within it) with their ``Timeout`` (default 10 s).
  ``PUT /v1/agent/check/pass|warn|fail/<id>[?note=]`` and ``.../update/<id>`` with ``{"Status",
  "Output"}`` update TTL checks only (500 otherwise); an unknown check id is 404
  ``Unknown check ID "<id>". Ensure that the check ID is passed, not the check name.``
- **Reaping.** A check registered with ``DeregisterCriticalServiceAfter`` that has been critical
  for longer than ``max(that, min_deregister_after)`` removes its service at the next reap tick
  (every ``reap_interval``). As in Consul, the clock starts when the check *becomes* critical:
  a TTL check that never passed starts it when its TTL expires.
- **Deregistration and maintenance.** ``PUT /v1/agent/service/deregister/<id>`` removes the
  service and its checks; an unknown id changes nothing and answers 404 ``Unknown service ID
  "<id>". Ensure that the service ID is passed, not the service name.``, as current Consul does
  although its docs still say "no action is taken" (py-consul returns ``False``, no exception).
  ``PUT /v1/agent/service/maintenance/<id>?enable=true|false[&reason=]`` adds or removes the
  critical check ``_service_maintenance:<id>``.
- **Reads.** ``GET /v1/health/service/<name>`` returns ``[{"Node", "Service", "Checks"}]`` with
  the node's ``serfHealth`` check; ``passing`` drops entries with any non-passing check (warning
  and maintenance included), each ``tag`` must be among the service's tags, and ``filter`` takes
  a subset of Consul's filter language (``==``, ``!=``, ``in``, ``not in``, ``contains``,
  ``matches``, ``is [not] empty``, ``and``/``or``/``not``, parentheses). ``GET
  /v1/agent/services``, ``/v1/agent/checks``, ``/v1/agent/service/<id>``, ``/v1/agent/self`` and
  ``/v1/status/leader`` are there too.
- **Indexes and blocking.** :attr:`ConsulAgent.index` is the raft-like modify index; it rises by
  one per change that reaches the catalog. The health endpoint's ``X-Consul-Index`` is the last
  change to that service name (its last extinction, or the whole catalog's, when it has no
  instance). Only status changes reach the catalog at once: a heartbeat that repeats the status
  with new output updates ``/v1/agent/checks`` but neither the index nor the health endpoint's
  ``Output`` (Consul defers those by minutes). With ``index`` > 0 a health query blocks until its
  index passes ``index`` or ``wait`` runs out (default 5 m, at most 10 m, plus up to wait/16
  jitter); ``wait`` without ``index`` does not block. Every response carries
  ``X-Consul-Index``.
- **ACL.** With ``acl_token`` set, a request must send it (``X-Consul-Token``, ``Authorization:
  Bearer`` or ``?token=``). Another token is 403 ``ACL not found``; none is the anonymous token,
  403 ``Permission denied: anonymous token lacks permission 'service:write' on "<name>". The
  anonymous token is used implicitly when a request does not specify a token.`` (after the 404 of
  an unknown check or service, as in Consul). Unlike Consul, which filters reads down to an empty
  list for the anonymous token, reads are 403 too so that a missing token cannot go unnoticed;
  ``anonymous_reads="filter"`` does as Consul does for the health endpoint: an anonymous read
  answers ``200 []``. Every response carries ``X-Consul-Default-ACL-Policy`` (Consul >= 1.9):
  ``deny`` with a token configured, else ``allow``. ``/v1/status/leader`` needs no token, as in
  Consul.
- **Outages.** :meth:`~ConsulAgent.go_down` stops listening and drops open connections (in-flight
  blocking queries included) while the agent keeps its state and keeps running its TTL timers,
  probes and reaper, like an agent that became unreachable; :meth:`~ConsulAgent.come_back`
  listens on the same port again. :meth:`~ConsulAgent.restart` does both, forgetting every
  service and check with ``forget=True`` (a dev agent's restart); the index keeps rising unless
  ``reset_index=True``, which restarts it low to exercise the client's "index went backwards"
  rule.

Not implemented: script, docker, alias, H2PING, UDP and OS-service checks (400),
``/v1/agent/check/register``, the catalog, KV, sessions, namespaces, peering, streaming.

:class:`ThreadedConsulAgent` runs one on its own loop in a thread, for tests whose loop blocks
(``ServiceProcess.start()``/``.stop()``) while processes talk to Consul.

Keyword arguments beyond the common brief: ``datacenter`` (default ``dc1``; another ``?dc=`` is
500 ``No path to datacenter``), ``min_check_interval`` (default 1 s) and ``restart(...,
reset_index=...)``.

Modules, by concern: ``_durations`` (Go durations), ``_errors`` (error answers), ``_decoding``
(request bodies and queries), ``_state`` (services and checks), ``_probes`` (GRPC, HTTP and TCP
probes), ``_filter`` (filter expressions), ``_local_state`` (the state machine: index, check
runners, reaper), ``_agent`` (:class:`ConsulAgent`: lifecycle and HTTP handlers) and
``_threaded`` (:class:`ThreadedConsulAgent`).
"""

from tests.consul_agent._agent import (
    ANONYMOUS_HINT,
    DEFAULT_MAINT_REASON,
    DEFAULT_QUERY_TIME,
    JITTER_FRACTION,
    MAINT_PREFIX,
    MAX_QUERY_TIME,
    ConsulAgent,
)
from tests.consul_agent._decoding import OUTPUT_MAX_SIZE
from tests.consul_agent._durations import format_go_duration, parse_go_duration
from tests.consul_agent._local_state import SERF_CHECK_ID
from tests.consul_agent._probes import DEFAULT_CHECK_TIMEOUT
from tests.consul_agent._state import CRITICAL, PASSING, STATUSES, WARNING
from tests.consul_agent._threaded import ThreadedConsulAgent

__all__ = [
    "ANONYMOUS_HINT",
    "CRITICAL",
    "DEFAULT_CHECK_TIMEOUT",
    "DEFAULT_MAINT_REASON",
    "DEFAULT_QUERY_TIME",
    "JITTER_FRACTION",
    "MAINT_PREFIX",
    "MAX_QUERY_TIME",
    "OUTPUT_MAX_SIZE",
    "PASSING",
    "SERF_CHECK_ID",
    "STATUSES",
    "WARNING",
    "ConsulAgent",
    "ThreadedConsulAgent",
    "format_go_duration",
    "parse_go_duration",
]
