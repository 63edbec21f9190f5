"""The llm-mesh worker: serves one model from one inference engine over ``llmmesh.v1.Worker``.

- :class:`WorkerApp`: the Worker servicer and its lifecycle hooks, run by
  :class:`llmmesh.server.ServiceRunner` (``python -m worker``);
- :class:`WorkerConfig` and :func:`load_config`: every setting, from flags and ``LLMMESH_*``;
- :mod:`worker.engines`: the engine interface and the simulated engine.
"""

from worker._config import WorkerConfig, load_config
from worker._service import WorkerApp

__all__ = ["WorkerApp", "WorkerConfig", "load_config"]
