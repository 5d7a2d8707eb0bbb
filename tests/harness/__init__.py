"""Real local servers for the test suite: S3 (moto), STAC APIs (pgstac, rustac), Ray."""
