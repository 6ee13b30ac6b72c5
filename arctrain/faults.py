"""Faults injected at named points of a run, so that the fail-fast paths can be tested as a user meets them.

    ARCTRAIN_FAULT=train_step:1:3:raise       rank 1 raises inside its 3rd optimizer step (after a forward)
    ARCTRAIN_FAULT=checkpoint_save:1:2:kill   rank 1 is SIGKILLed inside its 2nd checkpoint save (files half written)
    ARCTRAIN_FAULT=convert:0:1:sleep20        rank 0 converts a checkpoint 20 s longer (init_from, ds_to_universal)

POINT:RANK:NTH:ACTION, where NTH counts this process's visits of POINT from 1 and ACTION is `raise`, `kill` or
`sleep<seconds>`. Unset (every real run) a fault point costs one environment lookup.
"""

import os
import signal
import time

POINTS = ("train_step", "checkpoint_save", "convert")
_visits: dict[str, int] = {}


class InjectedFault(RuntimeError):
    """What `raise` raises: stands for any Python error on one rank (a bad batch, an out-of-memory)."""


def fault_point(point: str) -> None:
    """Do what ARCTRAIN_FAULT asks of this rank's visit of `point`, if anything."""
    spec = os.environ.get("ARCTRAIN_FAULT")
    if not spec:
        return
    assert point in POINTS, point
    _visits[point] = _visits.get(point, 0) + 1
    try:
        name, rank, nth, action = spec.split(":")
        wanted = (name, int(rank), int(nth))
    except ValueError:
        raise ValueError(f"ARCTRAIN_FAULT={spec!r}: expected POINT:RANK:NTH:ACTION (arctrain/faults.py)") from None
    if wanted != (point, int(os.environ.get("RANK", "0")), _visits[point]):
        return
    print(f"ARCTRAIN_FAULT: {action} at {point} #{_visits[point]}", flush=True)
    if action == "raise":
        raise InjectedFault(f"injected fault at {point} #{_visits[point]} (ARCTRAIN_FAULT={spec})")
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action.startswith("sleep"):
        time.sleep(float(action.removeprefix("sleep")))
        return
    raise ValueError(f"ARCTRAIN_FAULT={spec!r}: ACTION is raise, kill or sleep<seconds>, not {action!r}")
