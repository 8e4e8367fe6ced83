"""Benchmarks: QEMU's own migration as the baseline, the raw-copy yardstick, and reports.

- `livemig.bench.qemu`: run QEMU's live migration of the same guest image over loopback.
- `livemig.bench.rawcopy`: time a plain Python socket copy of N bytes (bytes/s).
- `livemig.bench.report`: medians over repeats, livemig/QEMU ratios, tables and JSON.
- `livemig.bench.grid`: the pre-copy scenario grid (`bench precopy --grid`), a row per
  configuration on both livemig and QEMU; `livemig.bench.netns` the networks it runs on,
  `livemig.bench.plot` its `--plot`.
"""
