"""llm-mesh benchmarks: ``python -m bench <command>`` (``python -m bench --help`` lists them).

- :mod:`bench.engine`: the simulated engine in-process and a sim worker over gRPC, at 1 to 256
  concurrent streams, beside the published TensorRT-LLM figures it is calibrated to.
- :mod:`bench._common`: what every benchmark shares (percentiles, tables, the JSON results file,
  a progress bar, CPU meters, a worker process).

Results are written under ``bench/results/`` as JSON, with the machine they were taken on.
"""
