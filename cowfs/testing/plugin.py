"""pytest plugin shipped with cowfs: mounted stacks as fixtures, and Hypothesis profiles.

Registered through the ``pytest11`` entry point ``cowfs = cowfs.testing.plugin``
(or ``-p cowfs.testing.plugin``).  It adds:

``cowfs_stack``
    A cowfs mount, unmounted after the test whatever happened.  The layers
    come from, in order: indirect parametrisation
    (``@pytest.mark.parametrize("cowfs_stack", [spec_or_dirs], indirect=True)``),
    the marker ``@pytest.mark.cowfs_layers(spec_or_dirs, options=[...])``,
    or else one empty lower layer.  ``spec_or_dirs`` is a list of existing
    layer directories (topmost first) or a ``cowfs.testing.layers.StackSpec``
    (written under the test's tmp_path).  The value is a mounted
    ``cowfs.testing.harness.Side`` (alias ``MountedStack``) with ``.mountpoint``,
    ``.upper``, ``.work``, ``.lowers``, ``.options``, ``.kind`` and
    ``.remount()``.  Skipped with the reason when FUSE is missing, failed
    instead under ``CI=true``.
``kernel_overlay``
    The same with the kernel's overlayfs (``mount -t overlay``: needs root,
    or root of a user namespace; see below).
``mounted_stack(spec_or_dirs, base, kind="cowfs", options=())``
    The context manager both fixtures use; call it inside ``@given`` tests,
    where function-scoped fixtures would be shared between examples.

Without root (``cowfs.testing.mounts.privileged()`` false), both fixtures and
``mounted_stack`` mount with ``userxattr`` (added when not given) and write a
``StackSpec``'s markers as ``user.overlay.*``, as an unprivileged mount must:
trusted.* xattrs need CAP_SYS_ADMIN of the initial namespace.  Nothing
assumes root: the directories are the caller's, layers are written as
``cowfs.testing.layers`` does for an ordinary user, cowfs's runtime directory
is the user's own.  An ordinary user gets ``cowfs_stack`` as it is (FUSE
through the setuid fusermount3); ``kernel_overlay`` needs the test process
inside a user namespace with its own mount namespace, where the user is root
(``unshare -Urm python -m pytest ...``, or
``cowfs.testing.unprivileged.run_as_user(..., userns=True)``): the kernel then
mounts overlayfs with ``userxattr`` and libfuse mounts cowfs directly, both
visible to the test, so kernel and cowfs compare as they do for root, in the
``userxattr`` mode only.  Outside one, it skips saying so (fails under CI=true).

Hypothesis profiles (``--hypothesis-profile NAME``, or
``settings.load_profile(NAME)``): ``ci`` (deterministic, sized so that the
whole parity run of tests/test_parity.py stays within about 6 minutes on two
cores), ``dev`` (a quick look), ``fuzz`` (long runs; ``make fuzz`` time-boxes
them).  Registering does not load any of them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from cowfs.testing import mounts
from cowfs.testing.harness import BACKENDS, Side
from cowfs.testing.layers import StackSpec, materialise
from cowfs.testing.mounts import StrPath

try:  # Hypothesis is optional: without it the fixtures still work with layer directories
    from hypothesis import HealthCheck, settings
except ImportError:  # pragma: no cover
    HealthCheck = settings = None

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
            HealthCheck.function_scoped_fixture] if HealthCheck else []

PROFILES = {
    "ci": dict(max_examples=60, stateful_step_count=25, deadline=None, derandomize=True, database=None,
               print_blob=True, suppress_health_check=_SLOW_OK),
    "dev": dict(max_examples=10, stateful_step_count=20, deadline=None, suppress_health_check=_SLOW_OK),
    "fuzz": dict(max_examples=1_000_000, stateful_step_count=50, deadline=None, database=None,
                 suppress_health_check=_SLOW_OK),
}


def register_profiles() -> None:
    if settings is None:
        return
    for name, kwargs in PROFILES.items():
        settings.register_profile(name, **kwargs)


register_profiles()


MountedStack = Side  # what the fixtures yield (the name this plugin has always documented)


def _layers(spec_or_dirs: StackSpec | Iterable[StrPath] | None, base: str, kind: str, userxattr: bool) -> list[str]:
    if spec_or_dirs is None:  # one empty lower layer
        empty = os.path.join(base, f"{kind}-lower")
        os.mkdir(empty)
        return [empty]
    if isinstance(spec_or_dirs, StackSpec):
        layer_base = os.path.join(base, f"{kind}-layers")
        os.mkdir(layer_base)
        return materialise(spec_or_dirs, layer_base, userxattr=userxattr)
    return [os.fspath(d) for d in spec_or_dirs]


@contextlib.contextmanager
def mounted_stack(spec_or_dirs: StackSpec | Iterable[StrPath] | None = None, base: StrPath | None = None,
                  kind: str = "cowfs", options: Iterable[str] = ()) -> Iterator[Side]:
    """Mount layers (a ``StackSpec`` or directories, topmost first) with cowfs or the kernel,
    with a fresh upper and work directory under *base* (a new temporary directory by default);
    yield the mounted ``cowfs.testing.harness.Side``; unmount whatever happened."""
    options = list(options)
    if kind not in BACKENDS:
        raise ValueError(f"kind must be 'cowfs' or 'kernel', not {kind!r}")
    options = mounts.with_userxattr_unless_privileged(options)  # layers written in the flavour mounted
    own_base = base is None
    base = tempfile.mkdtemp(prefix=f"cowfs-{kind}-") if own_base else os.fspath(base)
    try:
        lowers = _layers(spec_or_dirs, base, kind, userxattr="userxattr" in options)
        with Side(base, kind, kind, lowers, options) as side:
            yield side
    finally:
        if own_base and not mounts.mounts_under(base):
            shutil.rmtree(base, ignore_errors=True)


def _requested(request):
    """(layers, options) asked for by indirect parametrisation or the cowfs_layers marker."""
    param = getattr(request, "param", None)
    if param is not None:
        return param, []
    marker = request.node.get_closest_marker("cowfs_layers")
    if marker is not None:
        layers = marker.args[0] if marker.args else marker.kwargs.get("layers")
        return layers, list(marker.kwargs.get("options", ()))
    return None, []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "cowfs_layers(layers, options=[]): the layers (a StackSpec or directories, topmost first) "
                   "and mount options the cowfs_stack / kernel_overlay fixtures mount")


def _stack_fixture(request: pytest.FixtureRequest, tmp_path: Path, kind: str) -> Iterator[Side]:
    mounts.require("fuse" if kind == "cowfs" else "kernel")
    layers, options = _requested(request)
    base = tmp_path / f"{kind}-stack"
    base.mkdir()
    with mounted_stack(layers, base, kind, options) as stack:
        yield stack


@pytest.fixture
def cowfs_stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Side]:
    """A cowfs mount of the requested layers (see the module doc); always unmounted."""
    yield from _stack_fixture(request, tmp_path, "cowfs")


@pytest.fixture
def kernel_overlay(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Side]:
    """A kernel overlayfs mount of the requested layers; skipped where the kernel cannot mount
    (neither root nor root of a user namespace, no overlay), failed instead under CI=true; always unmounted."""
    yield from _stack_fixture(request, tmp_path, "kernel")
