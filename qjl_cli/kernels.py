"""`qjl kernels build` and `qjl kernels check`: the CUDA kernels of csrc/ (qjl/kernels.py).

Plugged into the app by main.py with `kernels.register(app)`. torch is imported only when a command runs, so
`qjl --help` stays fast. Without a CUDA device both commands say so in one line and exit 0: the torch ops
serve that machine and there is nothing to build or check.
"""

from __future__ import annotations

import json

import typer

from .errors import user_errors

HELP = "Build the CUDA kernels ahead of first use, or check them against the torch ops."
EPILOG = """\
Examples:
  qjl kernels build            # compile csrc/ for this GPU (cached under QJL_HOME/kernels)
  qjl kernels check            # parity table: op, shape, dtype, max error, tolerance, pass/fail, time vs torch
  qjl kernels check --json     # the same rows as JSON
  QJL_KERNELS=0 qjl ask ...    # run the torch ops instead of the kernels"""


def _no_cuda_line() -> str | None:
    """One line when this machine has no CUDA device or the kernels are switched off, else None."""
    import torch

    from qjl import kernels

    if not kernels.enabled():
        return f"qjl kernels: switched off ({kernels.ENV}=0); the torch ops run everywhere"
    if not torch.cuda.is_available():
        return "qjl kernels: no CUDA device on this machine; the torch ops serve it (nothing to build or check)"
    return None


def build(verbose: bool = typer.Option(False, "--verbose", "-v", help="Show the compiler's output.")) -> None:
    """Compile the kernels for this GPU now and self-test them (otherwise the first CUDA run does it)."""
    with user_errors():
        line = _no_cuda_line()
        if line:
            typer.echo(line)
            return
        import warnings

        from qjl import kernels

        kernels.reset()
        if verbose:
            kernels.build(verbose=True)  # the compiler's output; ensure_loaded below finds the build cached
            kernels.reset()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the reason goes into the error below instead
            loaded = kernels.ensure_loaded()
        if loaded is None:
            raise kernels.KernelError(kernels.status()["reason"])
        info = kernels.status()["build"] or {}
        how = "cached build" if info.get("cached") else f"built in {info.get('seconds')} s"
        typer.echo(f"qjl kernels: {how} for sm_{str(info.get('arch', '')).replace('.', '')} in {info.get('folder')}; "
                   f"self-test passed")


def check(as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON.")) -> None:
    """Compare every kernel with its torch op on this GPU: errors, tolerances and times."""
    with user_errors():
        line = _no_cuda_line()
        if line:
            typer.echo(line)
            return
        import torch

        from qjl import kernels

        rows = kernels.check()
        if as_json:
            typer.echo(json.dumps({"device": torch.cuda.get_device_name(), "build": kernels.status()["build"],
                                   "rows": [r.as_dict() for r in rows]}, indent=2))
        else:
            typer.echo(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
            typer.echo(kernels.format_table(rows))
        if not all(r.ok for r in rows):
            raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add the `kernels` command group (build, check) to the app."""
    sub = typer.Typer(name="kernels", help=HELP, epilog=EPILOG, no_args_is_help=True, add_completion=False,
                      rich_markup_mode="rich")
    sub.command("build", help="Compile the CUDA kernels for this GPU ahead of first use.")(build)
    sub.command("check", help="Parity and timing of every kernel against its torch op (a GPU).")(check)
    app.add_typer(sub, name="kernels", help=HELP)
