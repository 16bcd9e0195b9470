"""The `resnet` command: parses arguments and calls into the modules; holds no logic of its own.

Each subcommand lives in `resnet.commands.<name>` and provides `HELP`, `add_arguments(parser)` and
`run(args) -> int`. Modules are imported only when their command runs, so `resnet models` never pays
for importing the trainer.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import UserError

# name -> module under resnet.commands (the table is the whole registry of commands).
COMMANDS: dict[str, str] = {
    "models": "models",
    "info": "info",
    "data": "data",
    "train": "train",
    "eval": "evaluate",
    "predict": "predict",
    "export": "export",
    "reproduce": "reproduce",
    "demo": "demo",
}

_HELP: dict[str, str] = {
    "models": "table of every model: depth, shortcut, params, multiply-adds, the paper's figures",
    "info": "per-stage output shapes, params and multiply-adds of one model",
    "data": "describe a data source the way the trainer sees it",
    "train": "train a model from a recipe (running it again resumes)",
    "eval": "top-1/top-5 error of a trained model on a data split",
    "predict": "class predictions for images or folders",
    "export": "export a trained model to ONNX, TorchScript or safetensors",
    "reproduce": "re-run one of the paper's experiments and write its report",
    "demo": "the main job: train the quickstart recipe on the embedded digits set",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resnet", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        # Sub-parsers are filled lazily in main(); here only names and help, so --help stays fast.
        sub.add_parser(name, help=_HELP[name], add_help=False)
    return parser


def _command_module(name: str):
    return importlib.import_module(f"resnet.commands.{COMMANDS[name]}")


def _plain_warnings(name: str) -> None:
    """Our own warnings as one line each, like the errors ('resnet data: warning: ...'), without the source
    line Python adds; warnings from other packages keep Python's format (their location helps there)."""
    import warnings

    package = os.path.dirname(os.path.abspath(__file__))
    default = getattr(warnings.formatwarning, "python_format", warnings.formatwarning)

    def fmt(message, category, filename, lineno, line=None):
        if os.path.abspath(filename).startswith(package + os.sep):
            return f"resnet {name}: warning: {message}\n"
        return default(message, category, filename, lineno, line)

    fmt.python_format = default  # main() called again (tests) wraps Python's format, not the last wrapper
    warnings.formatwarning = fmt


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser = build_parser()
        if argv and argv[0] not in ("-h", "--help"):
            from .errors import did_you_mean

            print(f"resnet: unknown command '{argv[0]}'{did_you_mean(argv[0], COMMANDS)}; "
                  f"run 'resnet --help' for the list.", file=sys.stderr)
            return 2
        parser.print_help()
        return 0
    name, rest = argv[0], argv[1:]
    _plain_warnings(name)
    from .machine import keep_freed_memory

    keep_freed_memory()  # every command: its tensors' buffers are reused, not page-faulted back in
    try:
        module = _command_module(name)
        parser = argparse.ArgumentParser(prog=f"resnet {name}", description=_HELP[name])
        module.add_arguments(parser)
        args = parser.parse_args(rest)
        return int(module.run(args) or 0)
    except UserError as err:
        print(f"resnet {name}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"resnet {name}: interrupted.", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader (e.g. `| head`) closed the pipe: not an error of ours; silence the flush at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as err:  # a path the commands did not foresee (permissions, a full disk, a name too long)
        where = f" ({err.filename})" if err.filename else ""
        print(f"resnet {name}: {err.strerror or err}{where}; check the path and its permissions.", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
