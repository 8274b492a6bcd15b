"""convgen's benchmarks: ``python -m bench`` (see ``python -m bench --help``).

Two parts, both made from data rather than written out by hand:

* micro-benchmarks, one per generated kernel.  The list is built at run time
  from ``codegen.table.SPECS`` and ``codegen.cases.case_for(spec, "bench")``,
  the same table and the same case builder that generate the kernels and the
  tests, and every case checks that ``convgen.kernel_for`` really dispatches to
  its kernel.  Building it at run time (rather than rendering a
  ``bench_cases.py`` from a template) is the cleaner choice here: a case is
  data, not code, so a template would only print a list that ``case_for``
  already returns, and a generated file could go stale against the table (it
  would need the build to refresh it), while the runtime list cannot;
* the real-network layer suite, ``shared/bench/layers.json`` (``--layers``).

Peers (convgen, PyTorch, NumPy im2col + BLAS, onnxruntime) each run in their
own worker process (bench/worker.py), kept alive and driven over a socket in
alternating rounds (bench/runner.py); this process only orchestrates and never
imports convgen, torch or onnxruntime.  The FMA peak that "% of peak" divides
by is measured by a generated kernel, ``convgen._generated._peak``
(templates/fma_peak.pyx.j2).  Results go to bench/results/ (JSON, Markdown, PNG).

Modules: suite (cases), peers (the implementations), im2col (the NumPy peer),
worker, runner, progress, report.
"""
