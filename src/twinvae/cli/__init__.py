"""The `twinvae` command line: thin typer commands over tested library functions."""
