"""One module per `resnet` subcommand: `HELP`, `add_arguments(parser)`, `run(args) -> int`."""
