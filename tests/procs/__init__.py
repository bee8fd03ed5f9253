"""Child processes of the multi-process tests (crashes, leases, web workers)."""
