"""`python -m moeforge` is the `moeforge` command."""

from moeforge.cli.main import main

if __name__ == "__main__":
    main()
