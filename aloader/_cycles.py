"""Which maker serves the consumer better: itself (or, for ``async for``, the lane's thread) holding the source, or
the loop's concurrent fetches. The channels of ``_bridge`` measure it; the lane asks them (``_core/lane.py``).
"""

from __future__ import annotations

from typing import Final

__all__ = ["DIRECT", "LOOP", "Cycles"]


DIRECT: Final = 0  # the consumer made the item itself, holding the source
LOOP: Final = 1  # the item came from the loop's side (the lane's thread, fetch threads, or a call the consumer ran)


class Cycles:
    """Which maker serves a consumer that is busy between batches better: itself (holding the source) or the loop.

    A consumer that spends time between two batches (a training step) would overlap it with the next batches made on
    the lane's thread, if its step left the GIL free. Often it does not (the step's own Python, or short tensor ops
    between which the GIL changes hands): the two threads then take the GIL in turns, and the overlap costs more
    than it gains (measured: a model step of small matrix products ran at 0.90x torch's loop with the lane's thread,
    1.0x with the consumer making its batches). So the consumer's *cycle*, its time from one ``get()`` to the next,
    is measured with each maker (its mean since the figure was started, leaving out the first few cycles after a change
    of maker, when the pipeline refills or the consumer drains it: a mean, as the GIL's turns make a few cycles far
    longer than the rest), and the consumer keeps the source while it is busy only where its cycle with the source
    is the shorter. The loop is the default; the consumer tries making its batches once the loop's cycle is known,
    and each figure is measured again after ``STALE`` items.

    The loop's figure counts after ``LOOP_ENOUGH`` cycles, the consumer's after ``ENOUGH``: where the consumer is the
    better maker (beside a busy thread: ~2x the loop's speed), each cycle the loop measures costs the epoch about one
    batch, and a trial that loses is given up early (``ABORT``, ``ABORT_MEAN``). A mistake either way is bounded: the
    other maker is measured again once its figure is stale. Each time the consumer wins again against a fresh figure
    of the loop, the items before the loop's next measure double (``STALE`` up to ``STALE_MAX``); while the consumer
    holds the source, two cycles in a row over ``ABORT`` times the loop's (units that began to wait on storage) give
    it back at once.

    ``took`` and ``keep_direct`` run in the consumer's thread, ``direct_better`` and ``try_direct`` on the loop
    (under the channel's lock, while the consumer does not hold the source): a benign race, as with ``Speed``, where a
    cycle counted late moves a figure by one cycle.

    ``by_maker``: for ``async for`` (``LoopChannel``), whose consumer makes no batch. There the source is held by the
    lane's thread, which hands its batches over in runs, so the consumer's cycles with it come in bursts; the
    "consumer's" figure is instead the time that thread takes per unit (``made``, in its thread). Whichever is the
    shorter bounds how fast the consumer is served.
    """

    WARMUP: Final = 8  # cycles after a change of maker that are not measured
    ENOUGH: Final = 64  # measured cycles before the consumer's figure counts
    LOOP_ENOUGH: Final = 16  # and before the loop's does
    STALE: Final = 2048  # items after which a maker's figure is measured again
    MARGIN: Final = 1.0  # the consumer keeps the source only if its cycle is shorter than this times the loop's
    # A trial is given up early: at a cycle over ABORT times the loop's, or once the mean of its first EARLY cycles
    # is over ABORT_MEAN times the loop's (units that wait on storage, which the loop overlaps). Each trial given
    # up or lost doubles the items before the next (from STALE, at most STALE_MAX). Past its trial, the consumer
    # gives the source back at ABORTS cycles in a row over ABORT times the loop's.
    ABORT: Final = 4.0
    EARLY: Final = 4
    ABORT_MEAN: Final = 1.5
    STALE_MAX: Final = 2048 * 64
    ABORTS: Final = 2

    __slots__ = (
        "_at",
        "_by_maker",
        "_count",
        "_items",
        "_last",
        "_maker",
        "_over",
        "_rechecked",
        "_stale",
        "_streak",
        "_trial",
        "_trial_count",
        "_trial_total",
        "_value",
    )

    def __init__(self, by_maker: bool = False) -> None:
        self._by_maker = by_maker  # the consumer's figure is the maker's time per unit (made), not the cycles
        self._value = [0.0, 0.0]  # per maker: the cycles' total since its figure was (re)started
        self._count = [0, 0]  # per maker: cycles measured since the figure was (re)started
        self._at = [0, 0]  # per maker: the item count when it was last measured
        self._stale = [self.STALE, self.STALE]  # per maker: items after which its figure is measured again
        self._items = 0
        self._last = 0.0  # when the consumer entered get() for the last item (0: not yet)
        self._maker = LOOP  # who made the last item
        self._streak = 0  # items in a row from that maker
        self._trial = False  # the consumer holds the source to have its cycle measured (try_direct)
        self._trial_total = 0.0  # the trial's cycles so far, warm-up included (for giving it up early)
        self._trial_count = 0
        self._over = 0  # the consumer's cycles in a row over ABORT times the loop's
        self._rechecked = False  # the loop's figure was started afresh while the consumer was the better maker

    def took(self, entered: float, maker: int) -> None:
        """An item made by ``maker`` was returned by a ``get()`` entered at ``entered``: the cycle that ends here
        (from the last item's ``get()``) was the last item's maker's."""
        last = self._maker
        by_cycles = not (last == DIRECT and self._by_maker)
        if self._last and last == DIRECT and by_cycles and self._known_cycle(LOOP):
            self._check_direct(entered - self._last)
        if self._last and self._streak >= self.WARMUP and by_cycles:
            self._measure(last, entered - self._last)
        self._streak = self._streak + 1 if maker == last else 0
        self._maker = maker
        self._last = entered
        self._items += 1

    def made(self, seconds: float) -> None:
        """``by_maker``: the maker holding the source made a unit in ``seconds`` (its thread): the consumer's figure."""
        if self._known_cycle(LOOP) and self._check_direct(seconds):
            return
        self._measure(DIRECT, seconds)

    def _measure(self, maker: int, cycle: float) -> None:
        """Add ``cycle`` to ``maker``'s figure (which starts afresh from a count of 0)."""
        count = self._count[maker]
        self._value[maker] = cycle + (self._value[maker] if count else 0.0)
        self._count[maker] = count + 1
        self._at[maker] = self._items

    def _check_direct(self, cycle: float) -> bool:
        """A cycle of the consumer's: give its trial up if it is far slower than the loop already, and the source
        too if units began to wait on storage (two cycles in a row far over the loop's). True if given up."""
        loop = self._value[LOOP] / self._count[LOOP]
        over = cycle > self.ABORT * loop
        self._over = self._over + 1 if over else 0
        if self._trial:
            self._trial_total += cycle
            self._trial_count += 1
            early_mean = (
                self._trial_count >= self.EARLY and self._trial_total > self.ABORT_MEAN * loop * self._trial_count
            )
            if over or early_mean:
                self._slower(self._trial_total / self._trial_count)
                return True
        elif self._over >= self.ABORTS:
            self._slower(cycle)
            return True
        return False

    def _slower(self, cycle: float) -> None:
        """The consumer's figure is known, and slower (``cycle``): not tried again until it is stale (``keep_direct``
        now gives the source back), after twice as many items as the last time."""
        self._trial = False
        self._over = 0
        self._count[DIRECT] = self.ENOUGH
        self._value[DIRECT] = self.ENOUGH * cycle
        self._at[DIRECT] = self._items
        self._stale[DIRECT] = min(self.STALE_MAX, 2 * self._stale[DIRECT])

    def units_changed(self) -> None:
        """The units turned slow (they began to wait on storage): both figures were measured on other units, and
        start afresh. Until the loop's counts again, the source stays with the loop, whose concurrent fetches
        serve slow units; a trial of the consumer's may follow as usual."""
        self._count = [0, 0]
        self._trial = False
        self._over = 0
        self._rechecked = False

    def _known_cycle(self, maker: int) -> bool:
        return self._count[maker] >= (self.LOOP_ENOUGH if maker == LOOP else self.ENOUGH)

    def _known(self, maker: int) -> bool:
        return self._known_cycle(maker) and self._items - self._at[maker] < self._stale[maker]

    def direct_better(self) -> bool:
        """Both cycles are known, and the consumer's own is the shorter (by ``MARGIN``)."""
        return self._known(DIRECT) and self._known(LOOP) and self._shorter()

    def _shorter(self) -> bool:
        """The consumer's figure is the shorter (both are measured, stale or not)."""
        value, count = self._value, self._count
        return value[DIRECT] / count[DIRECT] < self.MARGIN * value[LOOP] / count[LOOP]

    def choose_direct(self) -> bool:
        """Hand the source to the busy consumer: it is the better maker, or to try (``try_direct``). Its win
        against a fresh figure of the loop doubles the items before the loop's next (a loss brings ``STALE``
        back)."""
        if self.direct_better():
            if self._rechecked:
                self._rechecked = False
                self._stale[LOOP] = min(self.STALE_MAX, 2 * self._stale[LOOP])
            return True
        if self._rechecked and self._known(LOOP):
            self._rechecked = False
            self._stale[LOOP] = self.STALE
        return self.try_direct()

    def try_direct(self) -> bool:
        """The loop's cycle is known and the consumer's is not (never measured, or stale): try it (its figure
        starts afresh)."""
        if not self._known(LOOP) or self._known(DIRECT):
            return False
        self._over = 0
        self._count[DIRECT] = 0
        self._trial = True
        self._trial_total, self._trial_count = 0.0, 0
        return True

    def keep_direct(self) -> bool:
        """Holding the source while busy: keep it while its trial runs or while it is the better maker; give it back
        for the loop's figure to be measured again once that is stale (which starts it afresh)."""
        if self._trial:
            if self._count[DIRECT] < self.ENOUGH:
                return True
            self._trial = False
            # A trial lost waits longer for the next; one won brings the usual wait back.
            won = self.direct_better()
            self._stale[DIRECT] = self.STALE if won else min(self.STALE_MAX, 2 * self._stale[DIRECT])
        if self._known(DIRECT) and self._known_cycle(LOOP) and self._items - self._at[LOOP] >= self._stale[LOOP]:
            self._rechecked = self._shorter()
            self._count[LOOP] = 0
            return False
        return self.direct_better()
