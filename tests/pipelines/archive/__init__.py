"""Tests of the archive job (pipelines/archive)."""
