"""Side-by-side benchmarks of stratovirt-py against QEMU microvm.

Run them with `scripts/bench` (or `python3 -m benchmarks` from the repo root).
The metric definitions are in `benchmarks.metrics`; the memory accounting is in
`benchmarks.smaps`; `benchmarks.harness` runs the monitors in alternating pairs.
"""
