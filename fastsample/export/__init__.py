"""`python -m fastsample.export`: artifacts for serving (see export/README.md)."""
