"""`python -m runner <overrides>`: see runner/cli.py."""

from runner.cli import main

if __name__ == "__main__":
    main()
