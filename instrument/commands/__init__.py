"""Commands of the `instrument` CLI beyond `attribute`, one module each (listed in `cli.COMMAND_MODULES`).

A module defines `add_command(commands) -> argparse.ArgumentParser`, which adds its subparser and sets
`parser.set_defaults(run=fn)`; `fn(args)` runs the command (heavy imports inside it, so `--help` stays fast).
"""
