"""One module per CLI verb (see evomerge/cli.py for the contract)."""
