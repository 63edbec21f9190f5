"""llm-mesh: what the router, worker and cache services share.

- :mod:`llmmesh.v1`: generated protobuf and gRPC stubs of the public contract;
- :mod:`llmmesh.settings`: flags and ``LLMMESH_*`` environment into frozen config dataclasses;
- :mod:`llmmesh.logs`: structured JSON logging with the request id bound per RPC;
- :mod:`llmmesh.server`: the gRPC server lifecycle (health, reflection, metrics, graceful drain);
- :mod:`llmmesh.errors`: the exception tree and its translation to gRPC status codes;
- :mod:`llmmesh.validation`: request validation shared by router and worker;
- :mod:`llmmesh.cache_key`: the canonical cache key of a request;
- :mod:`llmmesh.discovery`: how a router finds its workers;
- :mod:`llmmesh.client`: a synchronous client of the router, for the command and ``up --try``;
- :mod:`llmmesh.cli`: the ``llm-mesh`` command;
- :mod:`llmmesh.local_mesh`: ``llm-mesh up``, the whole mesh on this machine.
"""

from importlib import metadata

try:
    __version__ = metadata.version("llm-mesh")
except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
