"""Property-based parity with kernel overlayfs: Hypothesis drives the same operations on both.

``cowfs.testing.machine`` mounts a drawn layer stack with the kernel and with
cowfs and compares every operation's outcome and the whole merged tree after
each step (see its module doc).  The profile comes from ``HYPOTHESIS_PROFILE``
(default ``ci``; ``dev`` and ``fuzz`` also exist, see ``cowfs.testing.plugin``).
``make fuzz`` (scripts/fuzz.py) runs the same machine for a long time.

The machine classes are module globals under the names Hypothesis prints in
a failing example (``state = RedirectOn()``), so a printed reproduction can
be pasted below as a regression test: wrap its steps in
``try: ... finally: state.teardown()``.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import settings
from hypothesis.stateful import run_state_machine_as_test

from cowfs.testing.harness import KNOWN_DIFFERENCES, Divergence
from cowfs.testing.machine import parity_machine
from cowfs.testing.plugin import register_profiles
from cowfs.testing.strategies import (  # noqa: F401 (names used by pasted reproductions)
    Device,
    Dir,
    Fifo,
    File,
    HardLink,
    Layer,
    Oct,
    Pattern,
    Socket,
    StackSpec,
    Symlink,
    Whiteout,
)

register_profiles()
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")

RedirectOff = parity_machine("redirect_off")
RedirectOn = parity_machine("redirect_on")
UserXattr = parity_machine("userxattr")
ManyLayers = parity_machine("many_layers")          # 4-6 lower layers, redirect_dir=on
ManyLayersOff = parity_machine("many_layers_off")   # 4-6 lower layers, redirect_dir=off
RedirectOffKernelSelf = parity_machine("redirect_off", backend="kernel")
RedirectOffStrict = type("RedirectOffStrict", (RedirectOff,), {"known_differences": frozenset()})

Index = parity_machine("index")
IndexStrict = type("IndexStrict", (Index,), {"known_differences": frozenset()})

MACHINES = {
    "redirect_off": RedirectOff,
    "redirect_on": RedirectOn,
    "userxattr": UserXattr,
    "many_layers": ManyLayers,
    "many_layers_off": ManyLayersOff,
    "metacopy": parity_machine("metacopy"),
    "index": Index,
    "index_metacopy": parity_machine("index_metacopy"),  # lower hard links copied up metadata only, indexed
}

@pytest.mark.parametrize("mode", list(MACHINES), ids=list(MACHINES))
@pytest.mark.kernel
@pytest.mark.fuse
def test_parity(mode):
    run_state_machine_as_test(MACHINES[mode], settings=settings.get_profile(PROFILE))


@pytest.mark.kernel
def test_harness_kernel_against_itself():
    """Two kernel mounts of the same stack never differ: a failure here is a harness bug."""
    run_state_machine_as_test(RedirectOffKernelSelf,
                              settings=settings(settings.get_profile(PROFILE), max_examples=15))


def test_machine_counts_and_names():
    assert RedirectOn.__name__ == "RedirectOn" and RedirectOn.mode.name == "redirect_on"
    assert RedirectOn.counters is not RedirectOff.counters
    assert repr(StackSpec(Layer(File("a", mode=Oct(0o4755)), Whiteout("b")))) == \
        "StackSpec(Layer(File('a', mode=0o4755), Whiteout('b')))"


# ---------------------------------------------------------------------------
# Regression tests: divergences Hypothesis found, shrunk, replayed step by step.
# strict xfail while cowfs still diverges, so that a fix shows up as XPASS.

def _replay(cls, steps):
    state = cls()
    try:
        steps(state)
        state.trees_match()
        state.lowers_unchanged()
    finally:
        state.teardown()


@pytest.mark.kernel
@pytest.mark.fuse
@pytest.mark.xfail(strict=True, raises=Divergence, reason=KNOWN_DIFFERENCES["unmerged_whiteouts"].reason)
def test_regression_whiteout_in_unmerged_lower_dir_is_listed():
    # kernel: readdir of a/ lists 'c', lstat('a/c') -> ENOENT; cowfs: 'c' not listed
    _replay(RedirectOff, lambda state: state.init_stack(
        stack=StackSpec(Layer(Dir('a'), Dir('a/a'), Whiteout('a/c')))))


@pytest.mark.kernel
@pytest.mark.fuse
@pytest.mark.xfail(strict=True, raises=Divergence, reason=KNOWN_DIFFERENCES["small_holes"].reason)
def test_regression_copy_up_fills_holes_smaller_than_a_chunk():
    # kernel: the copied-up file is not sparse any more; cowfs: still sparse
    def steps(state):
        state.init_stack(stack=StackSpec(Layer(File('a', data=b'x', hole=70000, tail=b'end'))))
        state.chmod(path='a', mode=Oct(0o600))
    _replay(RedirectOffStrict, steps)  # the machines excuse this quirk by name; this one does not


def _index_link_up_other_name(state):
    # found by make fuzz [index]: c/a/b is a second name of c/b; chmod through it links up c/a/b on the
    # kernel, c/b (the name the mount found first) on cowfs: only the upper differs
    state.init_stack(stack=StackSpec(Layer(Dir('c'), File('c/b', mode=0o755), Dir('c/a'), File('c/a/a'),
                                           HardLink('c/a/b'))))
    state.trees_match()  # the invariant, which finds c/b first
    state.chmod(mode=0o644, path='c/a/b')


@pytest.mark.kernel
@pytest.mark.fuse
def test_regression_index_links_up_another_name_of_the_file():
    _replay(Index, _index_link_up_other_name)  # excused by name (index_link_up_name), and read back with W/index


@pytest.mark.kernel
@pytest.mark.fuse
@pytest.mark.xfail(strict=True, raises=Divergence, reason=KNOWN_DIFFERENCES["index_link_up_name"].reason)
def test_regression_index_links_up_another_name_of_the_file_strict():
    _replay(IndexStrict, _index_link_up_other_name)


@pytest.mark.kernel
@pytest.mark.fuse
@pytest.mark.parametrize("machine", [Index, MACHINES["index_metacopy"]], ids=lambda m: m.__name__)
def test_regression_index_link_up_in_a_directory_with_xattrs(machine):
    # found by test_parity[index_metacopy] (ci profile): chattr of b/a/a, whose other name is c, links up
    # b/a/a (copying up b, which has a user xattr, and b/a) on the kernel, c on cowfs; excused by name
    # (index_link_up_name) as long as the directories made only to hold the name carry no overlay xattr
    def steps(state):
        state.init_stack(stack=StackSpec(Layer(), Layer(
            Symlink('a', target='a'), Dir('b', xattrs=(('user.a', b''),)), Dir('b/a'),
            File('b/a/a', xattrs=(('user.long.name', b''), ('user.a', b''))), Device('b/a/b', mode=0o644),
            HardLink('c'))))
        state.trees_match()
        state.chattr(add=0, path='b/a/a', remove=0)
    _replay(machine, steps)


@pytest.mark.kernel
@pytest.mark.fuse
def test_regression_rename_lower_dir_over_nonempty_dir_is_exdev():
    # found by make fuzz [redirect_off]; kernel -> EXDEV, cowfs -> ENOTEMPTY
    def steps(state):
        state.init_stack(stack=StackSpec(Layer(Dir('a'), File('a/a'), Dir('b'), Dir('b/c'))))
        state.rename(src='b/c', dst='a')
    _replay(RedirectOff, steps)


@pytest.mark.kernel
@pytest.mark.fuse
def test_regression_userxattr_chmod_lower_fifo():
    # found by test_parity[userxattr] (ci profile); kernel -> None (success), cowfs -> EPERM
    def steps(state):
        state.init_stack(stack=StackSpec(Layer(Fifo('a'))))
        state.chmod(path='a', mode=Oct(0o644))
    _replay(UserXattr, steps)


@pytest.mark.kernel
@pytest.mark.fuse
@pytest.mark.xfail(strict=True, raises=Divergence, reason=KNOWN_DIFFERENCES["small_holes"].reason)
def test_regression_stat_after_copy_up_of_file_with_small_hole():
    # found by make fuzz [redirect_off]: stat('c/b/b') kernel sparse=False, cowfs sparse=True
    _replay(RedirectOffStrict, _stat_after_small_hole_copy_up)


def _stat_after_small_hole_copy_up(state):
    state.init_stack(stack=StackSpec(Layer(Dir('c'), File('c/b', data=Pattern(200000), hole=70000))))
    state.utime(path='c/b', ns=1_200_000_000_123_456_789, follow=False)
    state.stat(path='c/b')


@pytest.mark.kernel
@pytest.mark.fuse
def test_small_hole_quirk_is_excused_by_name_only():
    """The default machines excuse exactly KNOWN_DIFFERENCES['small_holes'] (with 'protection_after_type',
    a rule for one errno pair of removals and renames, and the index mode's index_link_up_name, which only
    an upper with indexed files can show) and still see the rest."""
    _replay(RedirectOff, _stat_after_small_hole_copy_up)
    assert RedirectOff.known_differences == frozenset({"small_holes", "protection_after_type", "index_link_up_name"})


@pytest.mark.kernel
@pytest.mark.fuse
def test_regression_userxattr_link_of_copied_up_symlink_keeps_numbers_apart():
    # found by make fuzz [userxattr]; kernel: b and c/b show different st_ino (b keeps its lower
    # number in the kernel's inode cache, as no user.* origin fits on a symlink); cowfs: one group
    def steps(state):
        state.init_stack(stack=StackSpec(Layer(), Layer(), Layer(Dir('c'), Symlink('b', target='a'))))
        state.link(dst='c/b', src='b')
    _replay(UserXattr, steps)


@pytest.mark.kernel
@pytest.mark.fuse
def test_regression_metacopy_data_step_moves_mtime():
    # found by the ci profile [metacopy]; kernel: opening a metadata-only copy for write lets its
    # mtime move; cowfs restored the old one
    def steps(state):
        state.init_stack(stack=StackSpec(Layer(File('b', data=b'x'), File('a'), File('c'))))
        state.rename(dst='a', src='b')
        state.open_fd(how='w', path='a')
    _replay(parity_machine("metacopy"), steps)


@pytest.mark.kernel
@pytest.mark.fuse
def test_regression_metacopy_data_step_with_no_data_keeps_mtime():
    # found by test_parity[index_metacopy] (ci profile); kernel: the data step of an empty metadata-only
    # copy writes nothing, so its mtime stays; cowfs truncated it to its own size, which moved the mtime
    def steps(state):
        state.init_stack(stack=StackSpec(Layer(File('a', mode=0o0))))
        state.setxattr(flags='any', name='user.a', path='a', value=b'v')
        state.open_fd(how='creat', path='a')
    _replay(parity_machine("metacopy"), steps)


@pytest.mark.kernel
@pytest.mark.fuse
def test_regression_metacopy_marker_after_the_origin():
    # found by test_parity[index_metacopy] (ci profile); the kernel sets the metacopy xattr after the origin,
    # so on ext4 (the first xattr in the inode, the next in a block) the data copy-up frees that block; cowfs
    # set it first, kept a block for the origin, and the file was no longer sparse after a fallocate
    def steps(state):
        state.init_stack(stack=StackSpec(Layer(File('f'))))
        state.setxattr(flags='replace', name='user.a', path='f', value=b'v')  # ENODATA, after the copy-up
        state.open_fd(how='creat', path='f')
        state.fd_fallocate(fd=0, length=1, mode=0, offset=5000)
    _replay(parity_machine("metacopy"), steps)


@pytest.mark.kernel
@pytest.mark.fuse
@pytest.mark.parametrize("machine", [RedirectOff, RedirectOn, UserXattr], ids=lambda m: m.__name__)
def test_regression_mkdir_in_a_merged_dir_is_opaque_only_without_offline_changes(machine):
    # found by comparing the uppers: cowfs made every new directory in a merged one opaque; the kernel
    # does so only when lower layers may not change offline (redirect_dir=on, metacopy), so a layer
    # committed from a redirect_dir=off upper would have hidden a base's directory of that name
    def steps(state):
        state.init_stack(stack=StackSpec(Layer(Dir('a'), File('a/f'))))
        state.mkdir(path='a/new', mode=Oct(0o755))
        state.mkdir(path='b', mode=Oct(0o755))
    _replay(machine, steps)
