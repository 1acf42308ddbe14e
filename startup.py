"""Imported first by every command, before torch (whose import takes seconds): SIGINT and
SIGTERM during start-up end the command at once with one line and exit status 128 + the signal
number, even when SIGINT was inherited ignored (a shell's background job ignores it). Once the
command runs, common.cli installs the handlers of the run proper.

Only a command started as a script of this folder is affected: importing the scripts as
modules (tests, notebooks) leaves the process's handlers alone.
"""
import os
import signal
import sys


def _stop(signum, frame):
    print(f"stopped by {signal.Signals(signum).name} during start-up (nothing was written)",
          file=sys.stderr, flush=True)
    os._exit(128 + signum)


_main = getattr(sys.modules.get("__main__"), "__file__", None) or ""
if os.path.dirname(os.path.abspath(_main)) == os.path.dirname(os.path.abspath(__file__)):
    for _signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_signum, _stop)
