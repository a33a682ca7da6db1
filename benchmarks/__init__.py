"""Side-by-side performance of isofast against what users run today.

Run ``python benchmarks/run.py --quick --out DIR`` (see :mod:`benchmarks.run`). Modules:

- :mod:`benchmarks.cases`: the decoders, batches and inputs measured;
- :mod:`benchmarks.providers`: the competitors (official IRVAE recipe, torch.func, forward_ad,
  vmap exact, isofast backends eager / compiled, JAX);
- :mod:`benchmarks.timing`: alternating-repetition timer and peak-memory probes;
- :mod:`benchmarks.flops`: the FLOP model of docs/maths.md section 5;
- :mod:`benchmarks.estimator_quality`: Hutchinson variance against the exact metric;
- :mod:`benchmarks.report`: records, tables and the speed-up plot;
- :mod:`benchmarks.bench_spectral`: the extension's batched eigenvalues against ``torch.linalg``;
- :mod:`benchmarks.gpu_checks` and ``gpu_suite.sh``: the one-call GPU validation and benchmark run.
"""
