"""QMP input fuzzing against a real monitor: generators, the reply oracle and the campaign.

Entry point: fuzz/qmp/run.py.  tests/integration/test_qmp_fuzz_kvm.py runs a small
fixed-seed campaign with the same code.
"""
