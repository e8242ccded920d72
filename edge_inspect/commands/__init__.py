"""One module per CLI subcommand; see edge_inspect/cli.py for the contract."""
