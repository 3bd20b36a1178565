"""`python -m lora_cli` and the `loractl` script: install the Ctrl-C handling first, then import the app.

Only the stdlib is imported before the handler is in place, so an interruption at any moment of start-up exits
130 with one line (lora_cli/cli/_signals.py).
"""

from lora_cli.cli._signals import install_start_up


def main() -> None:
    install_start_up()  # before anything but the standard library is imported
    from lora_cli.cli.app import main as run

    run()


if __name__ == "__main__":
    main()
