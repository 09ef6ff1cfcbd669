"""Shared fixtures: temporary directories that other users can traverse, and the FUSE/kernel gate.

Tests marked ``fuse``, ``kernel``, ``docker`` or ``registry`` (markers declared in setup.cfg)
are skipped with a reason when this machine cannot run them, and fail instead
under ``CI=true``.  The header of every run says what is available.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from cowfs.testing.mounts import (
    MountError,
    availability,
    docker_availability,
    force_unmount,
    in_ci,
    in_user_namespace,
    mounts_under,
    privileged,
    registry_availability,
    require,
)


def pytest_report_header(config):
    avail = dict(availability(), docker=docker_availability(), registry=registry_availability())
    parts = [f"{name}: {'available' if reason is None else 'MISSING (' + reason + ')'}"
             for name, reason in avail.items()]
    who = ("root" if privileged() else "root of a user namespace (userxattr only)" if os.geteuid() == 0
           else f"uid {os.geteuid()}, unprivileged" + (" in a user namespace" if in_user_namespace() else ""))
    return ("cowfs test machine: " + "; ".join(parts) + f"; running as {who}"
            + ("; CI=true (missing features fail)" if in_ci() else ""))


@pytest.fixture(autouse=True)
def _gate_on_mount_features(request):
    """Skip (or, under CI=true, fail) tests marked fuse/kernel when the machine cannot mount, and tests
    marked docker when it cannot run a private dockerd (cowfs.testing.docker)."""
    needed = [name for name in ("fuse", "kernel", "docker", "registry") if request.node.get_closest_marker(name)]
    if needed:
        require(*needed)


@pytest.fixture(scope="session", autouse=True)
def _fixed_umask():
    """Both sides of a differential test create files in this process: give them one umask."""
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def shared_tmp():
    """A fresh directory under /tmp, mode 0755, so that a test may switch to another uid inside it.

    It is removed afterwards, but never while anything is still mounted below
    it (removing through a live overlay would delete layer contents): leftover
    mounts are unmounted first, and the test errors if one cannot be.
    """
    path = tempfile.mkdtemp(prefix="cowfs-test-")
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        leftovers = mounts_under(path)
        for mnt, _ in sorted(leftovers, reverse=True):
            try:
                force_unmount(mnt)
            except MountError:
                pass
        still = mounts_under(path)
        if still:
            pytest.fail(f"could not unmount {still}; left {path} in place", pytrace=False)
        shutil.rmtree(path, ignore_errors=True)
        if leftovers:
            pytest.fail(f"test left mounts behind (now unmounted): {leftovers}", pytrace=False)
