"""llm-mesh benchmarks: ``python -m bench <command>`` (``python -m bench --help`` lists them).

- :mod:`bench.engine`: the simulated engine in-process and a sim worker over gRPC, at 1 to 256
  concurrent streams, beside the published TensorRT-LLM figures it is calibrated to.
- :mod:`bench.lb`: router policies against a join-shortest-queue oracle, and router replicas, on
  a heterogeneous sim fleet under open-loop Poisson load (a package, one module per part).
- :mod:`bench.hotpath`: the RPC hot path on loopback, driven by h2load: a bare ``grpc.aio`` hop,
  a direct worker call, the router on a miss and on a hit, streamed tokens/s (a package, one
  module per part).
- :mod:`bench._common`: what every benchmark shares (percentiles, tables, verdicts, the JSON
  results file, a progress bar, option lists, CPU meters, service processes, waits, a
  Prometheus scrape, gRPC framing); :mod:`bench._h2load` runs h2load as a gRPC load generator.

Results are written under ``bench/results/`` as JSON, with the machine they were taken on.
"""
