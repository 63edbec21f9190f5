"""The llm-mesh worker: serves one model from one inference engine over ``llmmesh.v1.Worker``.

- :class:`WorkerApp`: the Worker servicer and its lifecycle hooks, run by
  :class:`llmmesh.server.ServiceRunner` (``python -m worker``);
- :class:`WorkerConfig` and :func:`load_config`: every setting, from flags and ``LLMMESH_*``;
- :class:`ConsulRegistration`: the worker's own entry in Consul (``--discovery consul``), its
  health check and its leaving on drain; :class:`ConsulError` is what its Consul calls raise;
- :mod:`worker.engines`: the engine interface and the simulated engine.
"""

from llmmesh.consul import ConsulError
from worker._config import WorkerConfig, load_config
from worker._registration import ConsulRegistration
from worker._service import WorkerApp

__all__ = ["ConsulError", "ConsulRegistration", "WorkerApp", "WorkerConfig", "load_config"]
