"""The rank side: what the `deepspeed` launcher starts on every rank (python -m harness.worker)."""
