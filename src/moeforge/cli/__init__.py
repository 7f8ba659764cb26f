"""The `moeforge` command line: thin typer commands over the library."""
