"""Benchmarks (installed as ``fastssl.benchmarks``): one ``bench_<slice>.py`` a slice, the harness,
and the GPU check script. ``fastssl bench`` and ``pytest benchmarks/ --benchmark-only`` run the same cases."""
