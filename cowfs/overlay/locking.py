"""The engine lock: how an operation takes it, and how it lets go of it while a file's data is copied up.

One lock over every change to the upper keeps the engine simple and correct
under a multithreaded daemon; giving it up for the data copy keeps one big
copy-up from stalling every other caller.
"""

import contextlib
import functools


class DataFirst(Exception):
    """Raised by a locked operation that needs a file's data in the upper: the outermost `locked`
    moves the data without the engine lock, then runs the operation again from the start.
    So an operation changes nothing before its copy-ups, or only what it can do twice."""

    def __init__(self, node):
        super().__init__(node.path)
        self.node = node


def locked(method):
    """Run a public operation under the engine's lock, remembering its name for events.

    The engine (`self`) has `_lock` (an RLock), `_op` (the name of the public operation
    running), `layers` and `_move_data(node, op)`, which copies a file's data in without the lock.
    """
    name = method.__name__

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        while True:
            with self._lock:
                outer, self._op = self._op, self._op or name
                if outer is None:
                    self.layers.start()
                try:
                    return method(self, *args, **kwargs)
                except DataFirst as e:
                    if outer is not None:
                        raise
                    pending = e.node
                finally:
                    self._op = outer
            self._move_data(pending, name)
    return wrapper


@contextlib.contextmanager
def locked_for(engine, op):
    """The engine lock, taken again (by a data copy-up) on behalf of operation `op`."""
    with engine._lock:
        engine._op = op
        try:
            yield
        finally:
            engine._op = None
