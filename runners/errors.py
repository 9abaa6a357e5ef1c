"""How the entry points report errors: a mistake in a command, a config or a run directory is one line.

Anything the user can fix (a bad value, a missing checkpoint, a run directory that holds other
results or is in use) is a ``vtclab.errors.UsageError``: its message is printed alone, exit 2,
with the full traceback only under ``hydra.verbose=true``. Anything else is a bug and keeps its
traceback. Ctrl-C prints one line and exits 130.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import traceback
from collections.abc import Iterator

from hydra.errors import CompactHydraException

from vtclab.errors import ConfigError, UsageError

__all__ = ["ConfigError", "RunInterrupted", "SweepJobError", "UsageError", "hydra_verbose", "reported_errors"]

log = logging.getLogger(__name__)

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # the shell's code for SIGINT


class SweepJobError(CompactHydraException):
    """A sweep job's usage error as Hydra reports it at the end of the sweep: the message, no traceback."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run, with the one line to print (how far it got, how to resume)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def hydra_verbose() -> bool:
    """True when the command has ``hydra.verbose`` set (full tracebacks asked for)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized() and bool(HydraConfig.get().verbose)


@contextlib.contextmanager
def reported_errors(*, verbose: bool = False, in_sweep: bool = False) -> Iterator[None]:
    """Turn usage errors and Ctrl-C into one line on stderr and an exit code.

    In a sweep job a usage error is logged as one line and re-raised, so Hydra records the job as
    failed and the sweep goes on (the sweep's table lists it); Ctrl-C always stops everything.
    """
    try:
        yield
    except UsageError as error:
        if verbose:
            traceback.print_exc()
        if in_sweep:
            log.error("error: %s", error)
            raise SweepJobError(str(error)) from error
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    except KeyboardInterrupt as interrupt:
        if verbose:
            traceback.print_exc()
        message = interrupt.message if isinstance(interrupt, RunInterrupted) else (
            "interrupted; rerun the same command to resume")
        print(message, file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
