"""Non-finite model outputs: the message a user reads, and the UNet's checks deferred to a run's end.

Reading ``torch.isfinite(x).all()`` on the host after every UNet call stalls an accelerator each
call (the host waits for the GPU, then the GPU for the host's next launch). Inside a run
(:meth:`FiniteWatch.run`: a sampling loop, an inversion) each call only queues its check on the
device, and the run reads every check in one transfer when it ends, raising the same error as an
immediate check would (the first bad call's), before the run's result reaches any file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from npinv.errors import NpinvError

# Pending checks are stacked into one device tensor every this many calls (a long NTI run makes
# hundreds), so the list stays short; stacking queues a kernel and reads nothing.
_STACK_EVERY = 256


def nonfinite_message(what: str, dtype: torch.dtype) -> str:
    """Non-finite values: a half-precision overflow (say so, with the fix) or, in fp32, bad inputs or
    weights (no dtype advice: fp32 is already the safe choice)."""
    name = str(dtype).removeprefix("torch.")
    if dtype in (torch.float16, torch.bfloat16):
        hint = "rerun with --dtype fp32" if dtype == torch.bfloat16 else "rerun with --dtype fp32 (or bf16)"
        return f"{what} has non-finite values in {name} (a half-precision overflow); {hint}"
    return (f"{what} has non-finite values in {name}: the model's weights or the inputs hold NaN "
            "or infinite numbers")


def check_finite(x: torch.Tensor, what: str, dtype: torch.dtype) -> None:
    """Raise :class:`NpinvError` now if ``x`` holds NaN or infinite values (a host read)."""
    if not torch.isfinite(x).all():
        raise NpinvError(nonfinite_message(what, dtype))


class FiniteWatch:
    """One model's UNet output checks: immediate outside a run, deferred to the run's end inside one."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self._depth = 0
        self._stacked: list[torch.Tensor] = []  # each: a (k,) bool tensor of k calls' checks
        self._flags: list[torch.Tensor] = []  # 0-dim bool tensors not stacked yet
        self._whats: list[str] = []  # what each check was of, in call order

    @property
    def deferring(self) -> bool:
        return self._depth > 0

    def note(self, x: torch.Tensor, what: str) -> None:
        """Check ``x``: now (outside a run) or at the end of the run (queued on ``x``'s device)."""
        if not self._depth:
            check_finite(x, what, self.dtype)
            return
        self._flags.append(torch.isfinite(x).all())
        self._whats.append(what)
        if len(self._flags) >= _STACK_EVERY:
            self._stacked.append(torch.stack(self._flags))
            self._flags = []

    @contextlib.contextmanager
    def run(self) -> Iterator[None]:
        """Defer the checks of the calls made meanwhile to the end (nested runs: the outermost's end).

        The end reads them all in one transfer and raises the first bad call's error, also when the
        run itself raised (a non-finite value is the likelier cause, and it came first)."""
        self._depth += 1
        try:
            yield
        except Exception:
            self._leave()
            raise
        except BaseException:  # KeyboardInterrupt and the like: drop the checks, read nothing
            self._depth -= 1
            if not self._depth:
                self._clear()
            raise
        self._leave()

    def _leave(self) -> None:
        self._depth -= 1
        if self._depth:
            return
        whats, parts = self._whats, self._stacked + ([torch.stack(self._flags)] if self._flags else [])
        self._clear()
        if not parts:
            return
        finite = torch.cat(parts).cpu()  # the run's one host read of its checks
        if not finite.all():
            first = int(torch.nonzero(~finite)[0])
            raise NpinvError(nonfinite_message(whats[first], self.dtype))

    def _clear(self) -> None:
        self._stacked, self._flags, self._whats = [], [], []
