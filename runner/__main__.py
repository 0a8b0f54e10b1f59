"""`python -m runner <overrides>`: see runner/driver/cli.py."""

if __name__ == "__main__":
    import sys

    from runner.launch.start import warm_up

    warm_up(sys.argv[1:])  # first: the workers' fork server imports torch while the driver composes the config
    from runner.driver.cli import main

    main()
