"""Multi-rank tests: a group of rank processes started once per test module, running many cases.

    from multiproc import rank_group_fixture

    group = rank_group_fixture(2, 4)     # module-scoped fixture `group`, one group per size

    def _double_rank(ctx, k):            # runs in every rank; module level, so picklable
        return 2 * ctx.rank + k

    def test_double(group):
        assert group.run(_double_rank, 1) == [2 * r + 1 for r in range(group.world_size)]

Each rank is a real process with ``torch.distributed`` initialised on gloo over loopback. A case is
``fn(ctx, *args, **kwargs)``; ``run`` returns every rank's result, in rank order, or raises in the
test, naming the rank:

- ``RankFailed``: a rank raised; the message carries its traceback, ``.exception`` the original
  exception when it unpickles. ``run(..., return_exceptions=True)`` returns ``RemoteError`` objects
  in place of results instead.
- ``CaseTimeout``: the case did not finish within its deadline (``timeout=``, default
  ``MOELINK_TEST_CASE_TIMEOUT_S`` or 90 s). The stacks of the late ranks are in the message.
- ``RankCrashed``: a rank process died (signal, ``os._exit``); the others get ``grace_s`` to finish.

Never a hang: after a failure, late ranks get ``grace_s`` seconds, then the group is killed. Any
failure marks the group for restart, which ``run`` does by itself before the next case (a rank's
``ctx.state`` is lost then). ``leftover_segments`` lists shared-memory segments left in /dev/shm.

Start cost: ranks are forked from a multiprocessing *forkserver* that has imported torch once, so
a group starts in well under a second after the first (never a fork of the pytest process itself;
``MOELINK_TEST_START_METHOD=spawn`` for fresh interpreters). Ranks see the parent's environment as
of ``start()`` plus ``env`` (variables read while importing torch are the server's), with
``GLOO_SOCKET_IFNAME=lo`` and ``MOELINK_SHM_TAG=<group tag>`` unless given, and
``torch.set_num_threads(threads_per_rank)``.
"""

from __future__ import annotations

import dataclasses
import datetime
import faulthandler
import itertools
import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import shutil
import signal
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Optional

import pytest

__all__ = ["RankContext", "RankGroup", "RemoteError", "RankFailed", "RankCrashed", "CaseTimeout",
           "GroupStartError", "rank_group_fixture", "leftover_segments"]

DEFAULT_CASE_TIMEOUT_S = float(os.environ.get("MOELINK_TEST_CASE_TIMEOUT_S", "90"))
_PENDING = object()
_tags = itertools.count()


@dataclasses.dataclass
class RankContext:
    """What a case receives first. ``state`` persists across the cases of one group."""
    rank: int
    world_size: int
    group: Any  # torch.distributed ProcessGroup (the world group)
    tmp_dir: str  # shared by the group's ranks, removed when the group closes
    shm_tag: str  # MOELINK_SHM_TAG of this group
    state: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class RemoteError:
    """An exception raised by a case on one rank."""
    rank: int
    type_name: str
    message: str
    traceback: str
    pickled: Optional[bytes] = None

    @property
    def exception(self) -> Optional[BaseException]:
        try:
            return pickle.loads(self.pickled) if self.pickled else None
        except Exception:  # noqa: BLE001 - a class that does not unpickle here
            return None

    def __str__(self) -> str:
        return f"rank {self.rank} raised {self.type_name}: {self.message}"


class RankFailed(Exception):
    """A case failed on ``rank``. ``outcomes[r]``: result, RemoteError or None (did not finish)."""

    def __init__(self, message: str, rank: int, outcomes: list, remote: Optional[RemoteError] = None):
        super().__init__(message)
        self.rank, self.outcomes, self.remote = rank, outcomes, remote
        self.exception = remote.exception if remote else None


class RankCrashed(RankFailed):
    """A rank process died during (or between) cases."""


class CaseTimeout(RankFailed):
    """A case did not finish on every rank within its deadline."""


class GroupStartError(RuntimeError):
    """The rank processes could not be started or could not form the process group."""


# --- the rank process ----------------------------------------------------------------------

def _rank_main(rank: int, world: int, port: int, conn, env: dict, tmp_dir: str, tag: str, threads: int) -> None:
    os.environ.clear()
    os.environ.update(env)
    try:  # die with the parent instead of lingering (Linux only)
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001
        pass
    dump = open(os.path.join(tmp_dir, f"stacks.rank{rank}"), "w")
    faulthandler.register(signal.SIGUSR1, file=dump, all_threads=True)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=datetime.timedelta(seconds=120))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=float(env.get("MOELINK_TEST_GLOO_TIMEOUT_S", "120"))))
    ctx = RankContext(rank, world, dist.group.WORLD, tmp_dir, tag)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            break
        if message[0] != "case":
            break
        _, case_id, payload = message
        try:
            fn, args, kwargs = pickle.loads(payload)
            reply = ("ok", case_id, fn(ctx, *args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - everything goes back to the test
            reply = ("err", case_id, _remote_error(rank, exc))
        try:
            conn.send(reply)
        except Exception as exc:  # noqa: BLE001 - typically an unpicklable result
            conn.send(("err", case_id, _remote_error(rank, exc, note="while sending the case's result")))
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass


def _remote_error(rank: int, exc: BaseException, note: str = "") -> RemoteError:
    try:
        pickled = pickle.dumps(exc)
    except Exception:  # noqa: BLE001
        pickled = None
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    message = f"{exc} ({note})" if note else str(exc)
    return RemoteError(rank, type(exc).__qualname__, message, text, pickled)


# --- the group, in the test process ----------------------------------------------------------

class RankGroup:
    def __init__(self, world_size: int, *, env: Optional[dict] = None, case_timeout: Optional[float] = None,
                 start_timeout: float = 120.0, grace_s: float = 10.0, threads_per_rank: int = 1,
                 start_method: Optional[str] = None):
        self.world_size = world_size
        self.env = dict(env or {})
        self.case_timeout = DEFAULT_CASE_TIMEOUT_S if case_timeout is None else case_timeout
        self.start_timeout, self.grace_s, self.threads_per_rank = start_timeout, grace_s, threads_per_rank
        self.start_method = start_method or os.environ.get("MOELINK_TEST_START_METHOD", "forkserver")
        self.shm_tag = f"t{os.getpid()}g{next(_tags)}"
        self.tmp_dir: Optional[str] = None
        self.starts = 0  # how many times the processes were (re)started
        self._procs: list = []
        self._conns: list = []
        self._store = None
        self._case_ids = itertools.count()
        self._needs_restart = False

    # lifecycle
    @property
    def alive(self) -> bool:
        return bool(self._procs) and not self._needs_restart and all(p.is_alive() for p in self._procs)

    def start(self) -> None:
        import torch.distributed as dist

        self.close()
        ctx = mp.get_context(self.start_method)
        if self.start_method == "forkserver":
            here = os.path.dirname(os.path.abspath(__file__))
            if here not in sys.path:
                sys.path.insert(0, here)
            ctx.set_forkserver_preload(["torch", "torch.distributed", "multiproc"])
        self.tmp_dir = tempfile.mkdtemp(prefix=f"moelink-{self.shm_tag}-")
        env = dict(os.environ)
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        env["MOELINK_SHM_TAG"] = self.shm_tag
        env.update(self.env)
        self.shm_tag = env["MOELINK_SHM_TAG"]  # `env` may choose the tag
        self._store = dist.TCPStore("127.0.0.1", 0, None, is_master=True, wait_for_workers=False,
                                    timeout=datetime.timedelta(seconds=self.start_timeout))
        for rank in range(self.world_size):
            parent, child = ctx.Pipe(duplex=True)
            proc = ctx.Process(target=_rank_main, name=f"moelink-rank{rank}", daemon=True,
                               args=(rank, self.world_size, self._store.port, child, env, self.tmp_dir,
                                     env["MOELINK_SHM_TAG"], self.threads_per_rank))
            proc.start()
            child.close()
            self._procs.append(proc)
            self._conns.append(parent)
        self.starts += 1
        deadline = time.monotonic() + self.start_timeout
        for rank, (proc, conn) in enumerate(zip(self._procs, self._conns)):
            ready = multiprocessing.connection.wait([conn, proc.sentinel], max(0.0, deadline - time.monotonic()))
            if conn in ready:
                try:
                    if conn.recv()[0] == "ready":
                        continue
                except (EOFError, OSError):
                    pass
            state = f"exited with {_exit_text(proc.exitcode)}" if not proc.is_alive() else "not ready"
            self.kill()
            raise GroupStartError(f"{self.world_size}-rank group: rank {rank} {state} within {self.start_timeout} s")

    def kill(self) -> None:
        """Kills every rank process at once (SIGKILL)."""
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
        for proc in self._procs:
            proc.join(timeout=10)
        for conn in self._conns:
            conn.close()
        self._procs, self._conns, self._store = [], [], None

    def close(self) -> None:
        """Asks the ranks to leave, kills those that do not within 5 s, removes the scratch dir."""
        for conn in self._conns:
            try:
                conn.send(("exit",))
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 5.0
        for proc in self._procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        self.kill()
        if self.tmp_dir:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
            self.tmp_dir = None
        self._needs_restart = False

    def leftover_segments(self) -> list[str]:
        """Shared-memory segments named with this group's tag still in /dev/shm."""
        return leftover_segments(self.shm_tag)

    # running cases
    def run(self, fn: Callable, *args, timeout: Optional[float] = None, grace_s: Optional[float] = None,
            return_exceptions: bool = False, **kwargs) -> list:
        """Runs ``fn(ctx, *args, **kwargs)`` on every rank; returns the results in rank order.

        ``timeout`` and ``grace_s`` override the group's for this case (keyword names reserved)."""
        payload = pickle.dumps((fn, args, kwargs))  # an unpicklable case fails here, in the test
        if not self.alive:
            self.start()
        case_id = next(self._case_ids)
        label = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}"
        timeout = self.case_timeout if timeout is None else timeout
        for conn in self._conns:
            conn.send(("case", case_id, payload))
        try:
            outcomes, crashes, timed_out = self._collect(case_id, timeout, self.grace_s if grace_s is None else grace_s)
        except BaseException:
            self.kill()
            raise
        errors = [o for o in outcomes if isinstance(o, RemoteError)]
        late = [r for r, o in enumerate(outcomes) if o is _PENDING]
        if errors or crashes or late:
            self._needs_restart = True
        stacks = self._dump_stacks(late) if late else ""
        if late or crashes:
            self.kill()
        outcomes = [None if o is _PENDING else o for o in outcomes]
        head = f"case {label} on {self.world_size} ranks"
        if crashes:
            rank = min(crashes)
            raise RankCrashed(f"{head}: rank {rank} died ({crashes[rank]})" + _summary(outcomes, crashes) + stacks,
                              rank, outcomes)
        if errors and not (return_exceptions and not late):
            first = errors[0]
            raise RankFailed(f"{head}: {first}" + _summary(outcomes, crashes) + stacks +
                             f"\n--- traceback on rank {first.rank} ---\n{first.traceback}", first.rank, outcomes, first)
        if late:
            why = "did not finish within " + (f"{timeout} s" if timed_out else "the grace period after another failure")
            raise CaseTimeout(f"{head}: ranks {late} {why}; the group was killed" + _summary(outcomes, crashes) + stacks,
                              late[0], outcomes)
        return outcomes

    def _collect(self, case_id: int, timeout: float, grace_s: float):
        outcomes: list = [_PENDING] * self.world_size
        crashes: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        failed_at: Optional[float] = None
        while any(o is _PENDING for o in outcomes):
            now = time.monotonic()
            limit = deadline if failed_at is None else min(deadline, failed_at + grace_s)
            if now >= limit:
                return outcomes, crashes, failed_at is None
            waitables = {}
            for r, o in enumerate(outcomes):
                if o is _PENDING:
                    waitables[self._conns[r]] = r
                    waitables[self._procs[r].sentinel] = r
            for ready in multiprocessing.connection.wait(list(waitables), limit - now):
                r = waitables[ready]
                if outcomes[r] is not _PENDING:
                    continue
                conn, proc = self._conns[r], self._procs[r]
                message = None
                try:
                    if conn.poll():
                        message = conn.recv()
                except (EOFError, OSError):
                    pass
                if message is not None and message[1] == case_id:
                    outcomes[r] = message[2]
                    if message[0] == "err" and failed_at is None:
                        failed_at = time.monotonic()
                elif message is None and not proc.is_alive():
                    proc.join(timeout=1)
                    crashes[r] = _exit_text(proc.exitcode)
                    outcomes[r] = None
                    failed_at = failed_at or time.monotonic()
        return outcomes, crashes, False

    def _dump_stacks(self, ranks: list[int]) -> str:
        """Python stacks of the given ranks, via the SIGUSR1 faulthandler each rank registered."""
        if not self.tmp_dir:
            return ""
        sizes = {}
        for r in ranks:
            path = os.path.join(self.tmp_dir, f"stacks.rank{r}")
            sizes[r] = os.path.getsize(path) if os.path.exists(path) else 0
            try:
                os.kill(self._procs[r].pid, signal.SIGUSR1)
            except (ProcessLookupError, IndexError):
                pass
        time.sleep(0.5)
        parts = []
        for r in ranks:
            try:
                with open(os.path.join(self.tmp_dir, f"stacks.rank{r}")) as f:
                    f.seek(sizes[r])
                    parts.append(f"\n--- stack of rank {r} ---\n{f.read().strip() or '(no dump)'}")
            except OSError:
                pass
        return "".join(parts)


def _exit_text(code: Optional[int]) -> str:
    if code is None:
        return "no exit code"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def _summary(outcomes: list, crashes: dict) -> str:
    lines = []
    for r, o in enumerate(outcomes):
        if r in crashes:
            lines.append(f"  rank {r}: died ({crashes[r]})")
        elif isinstance(o, RemoteError):
            lines.append(f"  rank {r}: raised {o.type_name}: {o.message}")
        elif o is None:
            lines.append(f"  rank {r}: did not finish")
        else:
            lines.append(f"  rank {r}: finished")
    return "\n" + "\n".join(lines)


def leftover_segments(tag: Optional[str] = None) -> list[str]:
    """Names of moelink shared-memory segments in /dev/shm: those of ``tag`` if given, else all."""
    prefix = f"moelink-{tag}-" if tag else "moelink-"
    try:
        return sorted(n for n in os.listdir("/dev/shm") if n.startswith(prefix))
    except FileNotFoundError:
        return []


def rank_group_fixture(*world_sizes: int, name: Optional[str] = None, **options):
    """A module-scoped pytest fixture yielding a RankGroup per world size (parametrised if several).

    ``options`` go to RankGroup. The group is closed after the module's last test that uses it.
    """
    sizes = list(world_sizes) or [2]

    @pytest.fixture(scope="module", params=sizes, ids=[f"{n}ranks" for n in sizes], name=name)
    def _group(request):
        group = RankGroup(request.param, **options)
        try:
            yield group
        finally:
            group.close()

    return _group


def nic_threads() -> int:
    """This process's host NIC threads (named moelink-nic; other threads come and go under load)."""
    count = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as comm:
                count += comm.read().strip() == "moelink-nic"
        except OSError:  # the thread ended meanwhile
            pass
    return count
