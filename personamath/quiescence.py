"""Quiescence of a stage's tasks, by exact accounting: every task created under run_items is tracked
through the event loop's task factory. A task is *busy* unless it is parked on a batch request or waits
on live tasks of its own (a gather). Grading in worker processes, online requests, sleeps and plain
computation all keep their task busy. When no task is busy, every live flow waits on the batch, and
the batch driver (batch.py) submits everything parked."""
import asyncio
import contextvars
import time
from contextlib import contextmanager


_SCOPE: contextvars.ContextVar = contextvars.ContextVar("batch_scope", default=None)


class _Flow:
    __slots__ = ("parent", "children", "parked")

    def __init__(self, parent):
        self.parent, self.children, self.parked = parent, 0, False

    @property
    def busy(self) -> bool:
        return not self.parked and not self.children


class FlowTracker:
    """The tasks of one run_items call, and how many of them are busy: alive, not parked on a batch
    request, and not waiting on live tasks of their own. `busy == 0` is quiescence."""

    def __init__(self):
        self.flows: dict[asyncio.Task, _Flow] = {}
        self.busy = 0
        self.went_idle = asyncio.Event()  # set whenever busy falls to 0
        self.last_change = time.monotonic()
        self._loop = self._previous = None

    def install(self) -> None:
        """Track every task the stage's tasks create, until uninstall()."""
        self._loop = asyncio.get_running_loop()
        self._previous = self._loop.get_task_factory()
        self._loop.set_task_factory(self._factory)

    def uninstall(self) -> None:
        if self._loop is not None and self._loop.get_task_factory() == self._factory:
            self._loop.set_task_factory(self._previous)

    @contextmanager
    def scope(self):
        """Tasks created inside (the items' own) are the stage's; so are the tasks they create."""
        token = _SCOPE.set(self)
        try:
            yield
        finally:
            _SCOPE.reset(token)

    def _factory(self, loop, coro, **kwargs):
        task = self._previous(loop, coro, **kwargs) if self._previous else asyncio.Task(coro, loop=loop, **kwargs)
        if _SCOPE.get() is self:
            parent = asyncio.current_task(loop)
            self._add(task, parent if parent in self.flows else None)
        return task

    def _change(self, flow: _Flow, apply) -> None:
        before = flow.busy
        apply(flow)
        self._count(flow.busy - before)

    def _count(self, delta: int) -> None:
        self.last_change = time.monotonic()
        if delta:
            self.busy += delta
            if self.busy == 0:
                self.went_idle.set()

    def _add(self, task, parent) -> None:
        self.flows[task] = _Flow(parent)
        self._count(+1)
        if parent is not None:
            self._change(self.flows[parent], lambda f: setattr(f, "children", f.children + 1))
        task.add_done_callback(self._done)  # before gather's own callbacks: the parent is busy as it wakes

    def _done(self, task) -> None:
        flow = self.flows.pop(task, None)
        if flow is None:
            return
        self._count(-1 if flow.busy else 0)
        if flow.parent in self.flows:
            self._change(self.flows[flow.parent], lambda f: setattr(f, "children", f.children - 1))

    def tracks(self, task) -> bool:
        return task in self.flows

    def park(self, task) -> None:
        if task in self.flows:
            self._change(self.flows[task], lambda f: setattr(f, "parked", True))

    def unpark(self, task) -> None:
        if task in self.flows:
            self._change(self.flows[task], lambda f: setattr(f, "parked", False))

    def quiet_for(self) -> float:
        return time.monotonic() - self.last_change
