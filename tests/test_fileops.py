"""fallocate(2) and random file I/O: cowfs against the kernel overlay, over the same layers.

The fixed scenarios run as those of ``tests/test_differential.py`` do
(``compare_scenario``: every outcome, the merged trees, the lowers, the upper
directories on disk, and the kernel's view of cowfs's upper).  The fsx-style
test draws sequences of reads, writes, truncates, fallocates, hole punches and
range zeroings with Hypothesis, on a lower file that each sequence copies up
(at once, or only at its first write), and compares both mounts byte for byte
after every step, then the two upper copies on disk.
``COWFS_FSX_EXAMPLES`` sets how many sequences it draws (``make fuzz-fsx``).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from cowfs.overlay.syscalls import (
    FALLOC_FL_COLLAPSE_RANGE,
    FALLOC_FL_INSERT_RANGE,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_UNSHARE_RANGE,
    FALLOC_FL_ZERO_RANGE,
    fallocate,
)
from cowfs.testing.harness import MODES, Pair, Side, compare_scenario
from cowfs.testing.layers import USER, Dir, File, Layer, Pattern, StackSpec, materialise
from cowfs.testing.outcomes import Session, errno_outcome

TIMEOUT = float(os.environ.get("COWFS_DIFF_TIMEOUT", "120"))
KEEP, PUNCH, ZERO = FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE
FALLOC_FL_WRITE_ZEROES = 0x80
MOUNTED = [pytest.mark.kernel, pytest.mark.fuse]
SCENARIO_MODES = ("redirect_off", "redirect_on", "metacopy")

LAYERS = StackSpec(
    Layer(
        File("data.bin", Pattern(20_000)),
        File("small.txt", b"hello\n"),
        File("suid.bin", Pattern(5000), mode=0o4755, owner=(USER, USER)),
        File("holes.bin", b"head", hole=3 << 20, tail=b"tail"),
        Dir("dir", mode=0o777),
    ),
    Layer(File("deep/lower.bin", Pattern(9000))),
)


def _digest(fd: int) -> str:
    size = os.fstat(fd).st_size
    return hashlib.sha256(os.pread(fd, size + 1, 0)).hexdigest()[:16]


def _fallocate_and_look(fs: Session, fd: int | None, mode: int, offset: int, length: int, label: str) -> None:
    fs.do(f"fallocate {label} mode={mode:#x} {offset}+{length}", fallocate, fd, mode, offset, length)
    fs.do(f"size after {label}", lambda: os.fstat(fd).st_size)
    fs.do(f"data after {label}", _digest, fd)


# -- the fixed scenarios -----------------------------------------------------------------------------

def sc_fallocate_modes(fs: Session):
    """Every mode FUSE passes on, on a lower file opened for writing (so copied up first), and the
    combinations the VFS or ext4 refuse, with their errno."""
    fd = fs.open("data.bin", os.O_RDWR)
    for mode, offset, length in (
            (0, 30_000, 5000),  # extends the file
            (KEEP, 40_000, 8192),  # blocks past the end, size kept
            (PUNCH | KEEP, 4096, 8192),
            (ZERO, 1000, 3000),
            (ZERO | KEEP, 30_000, 20_000),
            (ZERO, 34_000, 10_000),  # zeroes past the end: extends
            (PUNCH, 0, 10),  # a hole needs KEEP_SIZE: EOPNOTSUPP
            (PUNCH | ZERO | KEEP, 0, 10),
            (FALLOC_FL_UNSHARE_RANGE, 0, 4096),
            (FALLOC_FL_WRITE_ZEROES, 0, 4096),
            (0x100, 0, 10),  # no such mode
            (0, -1, 10),
            (0, 0, 0),
            (KEEP, 1 << 62, 1 << 62)):  # past the largest file: EFBIG
        _fallocate_and_look(fs, fd, mode, offset, length, "data.bin")
    fs.close(fd)
    fs.stat("data.bin")
    fs.digest("data.bin")


def sc_fallocate_not_for_writing(fs: Session):
    """A descriptor open for reading only is refused by the VFS (EBADF), and nothing is copied up."""
    fd = fs.open("small.txt", os.O_RDONLY)
    _fallocate_and_look(fs, fd, 0, 0, 100, "small.txt read-only")
    fs.close(fd)
    fd = fs.open("deep/lower.bin", os.O_WRONLY | os.O_APPEND)
    _fallocate_and_look(fs, fd, PUNCH | KEEP, 0, 4096, "deep/lower.bin O_APPEND")
    fs.close(fd)
    fs.stat("deep")


def sc_fallocate_new_and_sparse(fs: Session):
    """A new file in a lower directory (whose copy-up makes its parents), and a sparse lower file whose
    holes are filled, punched and zeroed."""
    fd = fs.open("dir/new.bin", os.O_RDWR | os.O_CREAT, 0o640)
    _fallocate_and_look(fs, fd, 0, 0, 1 << 20, "dir/new.bin")
    _fallocate_and_look(fs, fd, PUNCH | KEEP, 4096, 65536, "dir/new.bin")
    fs.close(fd)
    fd = fs.open("holes.bin", os.O_RDWR)
    _fallocate_and_look(fs, fd, 0, 1 << 20, 1 << 20, "holes.bin")
    _fallocate_and_look(fs, fd, ZERO | KEEP, 0, 2, "holes.bin")
    _fallocate_and_look(fs, fd, PUNCH | KEEP, (3 << 20) - 4096, 8192, "holes.bin")
    fs.close(fd)
    fs.stat("holes.bin")


def sc_fallocate_drops_set_id(fs: Session):
    """As a write does: the owner's fallocate of a set-uid file clears the bit."""
    def as_owner(u: Session):
        fd = u.open("suid.bin", os.O_RDWR)
        _fallocate_and_look(u, fd, 0, 0, 8192, "suid.bin")
        u.fstat(fd, "suid.bin")
        u.close(fd)
    fs.as_user(USER, USER, as_owner)
    fs.stat("suid.bin")


SCENARIOS = {fn.__name__.removeprefix("sc_"): fn for fn in (
    sc_fallocate_modes, sc_fallocate_not_for_writing, sc_fallocate_new_and_sparse, sc_fallocate_drops_set_id)}


@pytest.mark.parametrize("name", list(SCENARIOS))
@pytest.mark.parametrize("mode", SCENARIO_MODES)
@pytest.mark.kernel
@pytest.mark.fuse
def test_fileops_differential(name, mode, shared_tmp):
    lowers = materialise(LAYERS, shared_tmp, userxattr=MODES[mode].userxattr)
    pair = Pair(shared_tmp, lowers, mode)
    problems, ref_out = compare_scenario(pair, SCENARIOS[name], name=name, timeout=TIMEOUT)
    assert not problems, f"scenario {name} [{mode}]:\n" + "\n\n".join(problems)
    assert any(label.split("] ")[-1].startswith("fallocate") and value is None for label, value in ref_out), \
        "no fallocate succeeded on the kernel: the scenario tests nothing"


@pytest.mark.kernel
@pytest.mark.fuse
@pytest.mark.xfail(strict=True, reason="known difference fallocate_shift: FUSE passes no COLLAPSE_RANGE or "
                                      "INSERT_RANGE to a daemon (EOPNOTSUPP); the kernel overlay gives them to ext4")
def test_fallocate_collapse_and_insert(shared_tmp):
    lowers = materialise(LAYERS, shared_tmp)
    pair = Pair(shared_tmp, lowers, "redirect_off")

    def shift(fs: Session):
        fd = fs.open("data.bin", os.O_RDWR)
        _fallocate_and_look(fs, fd, FALLOC_FL_COLLAPSE_RANGE, 4096, 4096, "collapse")
        _fallocate_and_look(fs, fd, FALLOC_FL_INSERT_RANGE, 4096, 8192, "insert")
        fs.close(fd)
    problems, _ = compare_scenario(pair, shift, name="fallocate_shift", timeout=TIMEOUT)
    assert not problems, "\n".join(problems)


# -- fsx: random sequences ---------------------------------------------------------------------------

FSX_EXAMPLES = int(os.environ.get("COWFS_FSX_EXAMPLES", "20"))
FSX_LOWER_SIZES = (0, 1, 4095, 4096, 70_000, (1 << 20) + 3)
MAX_OFFSET = 3 << 20

_offset = st.integers(0, MAX_OFFSET)
_length = st.integers(0, 200_000)
_step = st.one_of(
    st.tuples(st.just("pwrite"), _offset, st.integers(1, 70_000), st.integers(0, 255)),
    st.tuples(st.just("pread"), _offset, _length),
    st.tuples(st.just("pread_early"), _offset, _length),  # through a descriptor opened before the copy-up
    st.tuples(st.just("ftruncate"), _offset),
    st.tuples(st.just("truncate"), _offset),  # by name
    st.tuples(st.just("fallocate"), st.sampled_from((0, KEEP, PUNCH | KEEP, ZERO, ZERO | KEEP)), _offset,
              st.integers(1, 300_000)),
    st.tuples(st.just("fsync")),
)


def _fsx_lowers(base: str, count: int) -> list[str]:
    """One lower layer with `count` files, one per drawn sequence (each copies its own file up): sizes from
    FSX_LOWER_SIZES, every third with a hole in the middle."""
    entries = []
    for i in range(count):
        size = FSX_LOWER_SIZES[i % len(FSX_LOWER_SIZES)]
        if i % 3 == 2 and size > 8192:
            entries.append(File(f"f{i:04d}", Pattern(4096), hole=size - 8192, tail=Pattern(4096)))
        else:
            entries.append(File(f"f{i:04d}", Pattern(size)))
    return materialise(StackSpec(Layer(*entries)), base)


def _apply(side: Side, name: str, fds: dict, step: tuple) -> object:
    """Run one step on one side; returns its outcome (a value, or the errno name)."""
    path = os.path.join(side.mountpoint, name)
    try:
        if "rw" not in fds:
            if step[0] == "truncate":
                os.truncate(path, step[1])
                return None
            fds["rw"] = os.open(path, os.O_RDWR)
        fd = fds["rw"]
        kind = step[0]
        if kind == "pwrite":
            return os.pwrite(fd, bytes([step[3]]) * step[2], step[1])
        if kind == "pread":
            return hashlib.sha256(os.pread(fd, step[2], step[1])).hexdigest()[:16]
        if kind == "pread_early":
            return hashlib.sha256(os.pread(fds["early"], step[2], step[1])).hexdigest()[:16]
        if kind == "ftruncate":
            return os.ftruncate(fd, step[1])
        if kind == "truncate":
            return os.truncate(path, step[1])
        if kind == "fallocate":
            return fallocate(fd, step[1], step[2], step[3])
        return os.fsync(fd)
    except OSError as e:
        return errno_outcome(e)


def _looks(side: Side, name: str) -> tuple:
    """What a step left: the file's bytes (by a fresh descriptor) and its stat fields, st_blocks aside."""
    path = os.path.join(side.mountpoint, name)
    st_ = os.lstat(path)
    with open(path, "rb") as f:
        data = f.read()
    return (hashlib.sha256(data).hexdigest(), len(data), st_.st_size, stat.filemode(st_.st_mode), st_.st_nlink,
            st_.st_uid, st_.st_gid)


@pytest.mark.parametrize("mode", ("redirect_off", "metacopy"))
@pytest.mark.kernel
@pytest.mark.fuse
def test_fsx(mode, shared_tmp):
    count = FSX_EXAMPLES + 10  # a fresh lower file for every sequence (and the replay of a failing one)
    lowers = _fsx_lowers(shared_tmp, count)
    sides = [Side(shared_tmp, "kernel", "kernel", lowers, MODES[mode].options("kernel")),
             Side(shared_tmp, "cowfs", "cowfs", lowers, MODES[mode].options("cowfs"))]
    names = iter(f"f{i:04d}" for i in range(count))
    ran = []
    try:
        for side in sides:
            side.start()

        # no shrinking: each try needs a fresh lower file, and a mounted lower must not change
        @settings(max_examples=FSX_EXAMPLES, deadline=None, database=None, phases=(Phase.generate,),
                  suppress_health_check=list(HealthCheck))
        @given(copied_first=st.booleans(), steps=st.lists(_step, min_size=1, max_size=25))
        def sequence(copied_first, steps):
            name = next(names)
            fds = [{}, {}]
            try:
                for side, mine in zip(sides, fds):
                    mine["early"] = os.open(os.path.join(side.mountpoint, name), os.O_RDONLY)
                    if copied_first:
                        mine["rw"] = os.open(os.path.join(side.mountpoint, name), os.O_RDWR)
                for i, step in enumerate(steps):
                    outcomes = [_apply(side, name, mine, step) for side, mine in zip(sides, fds)]
                    assert outcomes[0] == outcomes[1], \
                        f"{name} step {i} {step}: kernel {outcomes[0]} cowfs {outcomes[1]}"
                    looks = [_looks(side, name) for side in sides]
                    assert looks[0] == looks[1], f"{name} after step {i} {step}: kernel {looks[0]} cowfs {looks[1]}"
            finally:
                for mine in fds:
                    for fd in mine.values():
                        os.close(fd)
            uppers = []
            for side in sides:
                with open(os.path.join(side.upper, name), "rb") as f:
                    data = f.read()
                uppers.append((hashlib.sha256(data).hexdigest(), len(data),
                               stat.filemode(os.lstat(os.path.join(side.upper, name)).st_mode)))
            assert uppers[0] == uppers[1], f"{name}: the upper copies differ: kernel {uppers[0]} cowfs {uppers[1]}"
            ran.append(len(steps))

        sequence()
    finally:
        problems = [p for side in reversed(sides) for p in side.stop()]
    assert not problems, problems
    assert len(ran) >= min(FSX_EXAMPLES, 5), f"only {len(ran)} sequences ran"


def test_fallocate_errno_of_a_refused_mode(tmp_path):
    """The ctypes call raises OSError with the kernel's errno (not -1, not a bare ctypes error)."""
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        with pytest.raises(OSError) as info:
            fallocate(fd, PUNCH, 0, 10)  # a hole without KEEP_SIZE
        assert info.value.errno == errno.EOPNOTSUPP
        fallocate(fd, 0, 0, 10_000)
        assert os.fstat(fd).st_size == 10_000
    finally:
        os.close(fd)
