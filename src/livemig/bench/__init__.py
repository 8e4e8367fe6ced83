"""Benchmarks: QEMU's own migration as the baseline, the raw-copy yardstick, and reports.

- `livemig.bench.qemu`: run QEMU's live migration of the same guest image over loopback.
- `livemig.bench.rawcopy`: time a plain Python socket copy of N bytes (bytes/s).
- `livemig.bench.report`: medians over repeats, livemig/QEMU ratios, tables and JSON.
"""
