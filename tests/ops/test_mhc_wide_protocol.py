"""Host model of the cross-CTA protocol of mhc.cu's one-pass prefill kernel (mhc_wide_kernel,
pipelined version): per tile, every CTA of the cluster pushes its CTA sums (st.async) into the
receive slot of the CTA that finalises each token, whose mbarrier counts the bytes; during the
next tile the finalising warp waits for them, and pushes pre into every CTA's pre slot; at the
end of that next tile every CTA waits for the pre and writes u. Slots and barriers are double
buffered by tile parity.

The model runs each CTA as two actors (warps 0-14, and warp 15 which finalises), meeting at the
CTA barriers of the kernel's loop, with every st.async a message delivered at a random later
moment, and the mbarrier rules of the PTX ISA (pending arrivals, tx-count that may go negative
before the local expect-tx, phase completion, parity waits). Random interleavings must never
deadlock, never rewrite a slot before its tile was read, never let a parity wait see a phase two
ahead, and must leave every barrier balanced. Mutations of the protocol (one parity, a missing
wait) must be caught, so the model can fail. It checks the protocol as written in the kernel's
loop, not the hardware."""

from __future__ import annotations

import random

import pytest


class _Mbarrier:
    """mbarrier with arrival count 1 (the local expect-tx arrival)."""

    def __init__(self) -> None:
        self.phase, self.pending, self.tx = 0, 1, 0

    def _check(self) -> None:
        if self.pending == 0 and self.tx == 0:
            self.phase += 1
            self.pending = 1

    def arrive_expect(self, nbytes: int) -> None:
        assert self.pending == 1, "a second arrival in one phase"
        self.pending -= 1
        self.tx += nbytes
        self._check()

    def complete_tx(self, nbytes: int) -> None:
        self.tx -= nbytes
        self._check()

    def wait_done(self, k: int) -> bool:
        """try_wait.parity for tile k's phase (k >> 1) of barrier k & 1."""
        want = k >> 1
        done = (self.phase & 1) != (want & 1)   # what the hardware answers
        if done != (self.phase > want) or self.phase > want + 1:
            raise AssertionError(f"parity aliasing: waiting for phase {want}, barrier at "
                                 f"{self.phase}")
        return done


def simulate(ranks: int, n_tiles: int, seed: int, head: bool = False,
             parities: int = 2, wait_recv: bool = True, wait_pre: bool = True) -> list[str]:
    """Runs one cluster of `ranks` CTAs over `n_tiles` tiles (2·ranks tokens each); returns the
    protocol errors found (empty: none). `parities`, `wait_recv`, `wait_pre` mutate it."""
    rng = random.Random(seed)
    n_send = 5 if head else 25                 # columns sent per token (mixes + sum of squares)
    recv_bytes = ranks * 2 * n_send * 4        # per tile, at each finalising CTA
    pre_bytes = ranks * 2 * 16                 # per tile, at every CTA
    ctas = [dict(recv_bar=[_Mbarrier() for _ in range(2)], pre_bar=[_Mbarrier() for _ in range(2)],
                 recv={}, spre={}, bars={"W": 0, "F": 0}) for _ in range(ranks)]
    messages: list[tuple] = []
    errors: list[str] = []

    def parity(k: int) -> int:
        return k % parities

    def deliver(msg: tuple) -> None:
        dst, kind, key, tile, nbytes, par = msg
        store = ctas[dst]["recv" if kind == "recv" else "spre"]
        old = store.get(key)
        if old is not None and not old[1]:
            errors.append(f"{kind} slot {key} of CTA {dst} rewritten by tile {tile} before tile "
                          f"{old[0]} was read")
        store[key] = [tile, False, 0]
        ctas[dst]["recv_bar" if kind == "recv" else "pre_bar"][par].complete_tx(nbytes)

    def cta_barrier(r: int, who: str):
        c = ctas[r]
        c["bars"][who] += 1
        n, other = c["bars"][who], "F" if who == "W" else "W"
        yield lambda: c["bars"][other] >= n

    def finalise(r: int, k: int):
        c, par = ctas[r], parity(k)
        c["recv_bar"][par].arrive_expect(recv_bytes)
        if wait_recv:
            yield lambda: c["recv_bar"][par].wait_done(k)
        for s in range(ranks):
            for h in range(2):
                for col in range(n_send):
                    slot = c["recv"].get((par, s, h, col))
                    if slot is None or slot[0] != k:
                        errors.append(f"finalise of tile {k} in CTA {r} read {slot} from rank {s}")
                    else:
                        slot[1] = True
        for dst in range(ranks):                # pre of tokens 2r, 2r + 1 -> every CTA
            for h in range(2):
                messages.append((dst, "spre", (par, 2 * r + h), k, 16, par))

    def collapse(r: int, k: int, who: str):
        c, par = ctas[r], parity(k)
        if who == "W":                          # thread 0's arrival
            c["pre_bar"][par].arrive_expect(pre_bytes)
        if wait_pre:
            yield lambda: c["pre_bar"][par].wait_done(k)
        for i in range(2 * ranks):
            slot = c["spre"].get((par, i))
            if slot is None or slot[0] != k:
                errors.append(f"u of tile {k} in CTA {r} used pre {slot} of token {i}")
            else:
                slot[2] += 1
                slot[1] = slot[2] == 2          # read by both actors

    def actor(r: int, who: str):                # the kernel's tile loop, one CTA's warps
        for it in range(n_tiles + 1):
            yield from cta_barrier(r, who)      # top of the loop
            fin = it >= 1 and who == "F"
            if it < n_tiles:
                for mt in range(2):
                    if mt > 0:
                        yield from cta_barrier(r, who)  # stage free
                    yield from cta_barrier(r, who)      # stage complete
                    if mt == 0 and fin:
                        yield from finalise(r, it - 1)
                    elif who == "W":                    # the CTA sums of this half -> finalisers
                        for i in range(ranks):
                            ti = mt * ranks + i
                            for col in range(n_send):
                                messages.append((ti >> 1, "recv", (parity(it), r, ti & 1, col),
                                                 it, 4, parity(it)))
            elif fin:
                yield from finalise(r, it - 1)
            if it >= 1:
                yield from collapse(r, it - 1, who)
            yield lambda: True

    actors = [[actor(r, w), None] for r in range(ranks) for w in ("W", "F")]
    live = list(range(len(actors)))
    while live or messages:
        try:
            runnable = [i for i in live if actors[i][1] is None or actors[i][1]()]
        except AssertionError as e:
            return errors + [str(e)]
        choices = len(runnable) + (1 if messages else 0)
        if choices == 0:
            return errors + ["deadlock"]
        pick = rng.randrange(choices)
        if pick == len(runnable):
            deliver(messages.pop(rng.randrange(len(messages))))
        else:
            i = runnable[pick]
            try:
                actors[i][1] = next(actors[i][0])
            except StopIteration:
                live.remove(i)
        if errors:
            return errors
    for r, c in enumerate(ctas):
        for b in c["recv_bar"] + c["pre_bar"]:
            if b.tx != 0 or b.pending != 1:
                errors.append(f"CTA {r}: a barrier ends with tx-count {b.tx}")
    return errors


@pytest.mark.parametrize("head", [False, True])
def test_protocol_random_interleavings_4_ctas(head):
    for seed in range(25):
        for n_tiles in (0, 1, 2, 3, 6):
            assert simulate(4, n_tiles, seed, head=head) == [], (seed, n_tiles)


def test_protocol_random_interleavings_16_ctas():
    for seed in range(2):
        for n_tiles in (1, 4):
            assert simulate(16, n_tiles, seed, head=True) == [], (seed, n_tiles)


@pytest.mark.parametrize("mutation", [dict(parities=1), dict(wait_recv=False),
                                      dict(wait_pre=False)])
def test_the_model_catches_protocol_bugs(mutation):
    assert any(simulate(4, n, seed, **mutation) for seed in range(40) for n in (2, 3, 5))
