"""The FUSE adapter's inode table in-process (cowfs.daemon.inodes), without a mount.

What the kernel is told depends on it: one node id per merged object (every
name of an upper hard link is one inode, a lower hard link one inode per
name), the merged path rebuilt from the names after renames, lookup counts
that keep an inode until the kernel forgets it (or an open handle lets it
go), and the move generation that tells a request its path may be stale.
"""

import errno
import os
import stat
import threading
import time

import pytest

from cowfs.daemon.inodes import ROOT_ID, InodeTable, identity, key_of

REG, DIR, LNK, FIFO = stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFIFO


def attrs(ino, kind=REG, nlink=1, lower_link=False):
    """The attributes the engine's getattr gives, as far as the table reads them."""
    found = {"st_ino": ino, "st_mode": kind | 0o644, "st_nlink": nlink}
    if lower_link:
        found["lower_link"] = True
    return found


@pytest.fixture
def table():
    return InodeTable()


def gone(table, inode):
    """Whether the table has let `inode` go: its node id is stale."""
    try:
        table.get(inode.id)
    except OSError as e:
        assert e.errno == errno.ESTALE
        return True
    return False


# ---------------------------------------------------------------------------------------------
# keys

def test_identity_is_number_and_type():
    assert identity(attrs(7, DIR, nlink=3)) == (7, DIR)
    assert identity({"st_ino": 9, "st_mode": LNK | 0o777, "st_nlink": 1}) == (9, LNK)


def test_a_lower_link_is_keyed_by_its_name_too(table):
    d = table.found(table.root, "d", attrs(2, DIR))
    assert key_of(attrs(7, nlink=2)) == (7, REG)
    assert key_of(attrs(7, nlink=2, lower_link=True), d, "f") == (7, REG, d.id, "f")


# ---------------------------------------------------------------------------------------------
# the root and node ids

def test_root_is_node_one_and_never_forgotten(table):
    assert table.root.id == ROOT_ID == 1
    assert table.get(1) is table.root
    assert table.root.kind == DIR
    assert table.path(table.root) == "/"
    assert table.at_path("/") is table.root
    assert len(table) == 1
    table.forget(table.root, 1)
    table.forget_id(ROOT_ID, 5)
    assert table.get(ROOT_ID) is table.root
    assert len(table) == 1


def test_unknown_node_id_is_stale(table):
    with pytest.raises(OSError) as e:
        table.get(2)
    assert (e.value.errno, e.value.strerror) == (errno.ESTALE, os.strerror(errno.ESTALE))
    table.forget_id(99, 1)  # a forget of an id never given (or already forgotten) is no error
    assert len(table) == 1


def test_new_objects_get_new_ids_from_two(table):
    a = table.found(table.root, "a", attrs(10))
    b = table.found(table.root, "b", attrs(11, DIR))
    c = table.found(b, "c", attrs(12, LNK))
    assert (a.id, b.id, c.id) == (2, 3, 4)
    assert (a.kind, b.kind, c.kind) == (REG, DIR, LNK)
    assert table.get(a.id) is a and table.get(b.id) is b and table.get(c.id) is c
    assert len(table) == 4
    assert a.nlookup == b.nlookup == c.nlookup == 1


def test_inodes_of_one_type_share_one_kind_object(table):
    """A table may hold millions of inodes: each keeps its type as the one int of that type, not its own."""
    a = table.found(table.root, "a", attrs(10))
    b = table.found(table.root, "b", attrs(11))
    assert a.kind == b.kind == REG
    assert a.kind is b.kind


# ---------------------------------------------------------------------------------------------
# lookups

def test_the_same_object_again_is_the_same_inode_with_one_more_lookup(table):
    a = table.found(table.root, "a", attrs(10))
    assert table.found(table.root, "a", attrs(10)) is a
    assert table.found(table.root, "a", attrs(10)) is a
    assert a.nlookup == 3
    assert a.names() == [(table.root, "a")]  # one name, not one per lookup
    assert len(table) == 2


def test_another_object_under_a_known_name_is_a_new_inode(table):
    old = table.found(table.root, "a", attrs(10))
    new = table.found(table.root, "a", attrs(20))
    assert new is not old and new.id != old.id
    assert table.at_path("/a") is new
    assert table.path(new) == "/a"
    assert table.path(old) is None  # the old object lost that name
    assert old.names() == []
    assert not gone(table, old)  # the kernel still holds it
    table.forget(old, 1)
    assert gone(table, old)
    assert table.at_path("/a") is new


def test_a_name_that_changes_type_is_a_new_inode(table):
    old = table.found(table.root, "a", attrs(10, REG))
    new = table.found(table.root, "a", attrs(10, DIR))
    assert new is not old
    assert new.kind == DIR and old.kind == REG


def test_names_of_an_upper_hard_link_are_one_inode(table):
    d = table.found(table.root, "d", attrs(2, DIR))
    a = table.found(table.root, "a", attrs(10, nlink=2))
    b = table.found(d, "b", attrs(10, nlink=2))
    assert b is a
    assert a.nlookup == 2
    assert a.names() == [(table.root, "a"), (d, "b")]
    assert table.path(a) == "/a"
    assert table.at_path("/d/b") is a
    assert len(table) == 3


def test_single_names_with_one_number_are_separate_inodes(table):
    """A number seen again under another name, with one link, is another object (or a move the table
    was not told of): never merged into the first, nor are directories or lower hard links."""
    a = table.found(table.root, "a", attrs(10, nlink=1))
    b = table.found(table.root, "b", attrs(10, nlink=1))
    assert b is not a
    d1 = table.found(table.root, "d1", attrs(30, DIR, nlink=2))
    d2 = table.found(table.root, "d2", attrs(30, DIR, nlink=2))
    assert d2 is not d1
    l1 = table.found(table.root, "l1", attrs(40, nlink=2, lower_link=True))
    l2 = table.found(table.root, "l2", attrs(40, nlink=2, lower_link=True))
    assert l2 is not l1
    assert l1.key != l2.key
    assert table.found(table.root, "l1", attrs(40, nlink=2, lower_link=True)) is l1
    assert not table._by_key  # only an upper hard link is ever found by its number


def test_a_new_link_to_a_known_inode_joins_it(table):
    """link(2): the engine says which inode the new name is; later names find it by number."""
    src = table.found(table.root, "a", attrs(10, nlink=1))
    assert table.found(table.root, "b", attrs(10, nlink=2), inode=src) is src
    assert src.nlookup == 2
    assert src.names() == [(table.root, "a"), (table.root, "b")]
    assert table.found(table.root, "c", attrs(10, nlink=3)) is src  # by number, as now shared
    assert table.at_path("/c") is src


def test_a_given_inode_replaces_what_was_known_under_the_name(table):
    src = table.found(table.root, "a", attrs(10, nlink=1))
    old = table.found(table.root, "b", attrs(20))
    assert table.found(table.root, "b", attrs(10, nlink=2), inode=src) is src
    assert table.at_path("/b") is src
    assert table.path(old) is None


# ---------------------------------------------------------------------------------------------
# paths

def test_paths_are_built_from_the_names(table):
    a = table.found(table.root, "a", attrs(2, DIR))
    b = table.found(a, "b", attrs(3, DIR))
    c = table.found(b, "c", attrs(4))
    assert table.path(a) == "/a"
    assert table.path(c) == "/a/b/c"
    assert table.child_path(table.root, "x") == "/x"
    assert table.child_path(b, "x") == "/a/b/x"
    assert table.at_path("/a/b/c") is c
    assert table.at_path("/a/b/c/") is c
    assert table.at_path("/a/b") is b
    assert table.at_path("/a/x") is None
    assert table.at_path("/a/b/c/d") is None  # below a file: nothing
    assert table.at_path("/x/b") is None
    assert table.at_path("/b") is None
    odd = table.found(b, "XcX", attrs(5))
    assert table.at_path("/a/b/XcX") is odd  # only slashes are trimmed


def test_no_path_once_a_directory_on_the_way_is_removed(table):
    d = table.found(table.root, "d", attrs(2, DIR))
    f = table.found(d, "f", attrs(3))
    table.removed(table.root, "d")
    assert table.path(d) is None
    assert table.path(f) is None
    with pytest.raises(OSError) as e:
        table.child_path(d, "x")
    assert (e.value.errno, e.value.strerror) == (errno.ENOENT, os.strerror(errno.ENOENT))
    assert table.at_path("/d") is None
    assert table.at_path("/d/f") is None


# ---------------------------------------------------------------------------------------------
# forgetting

def test_an_inode_lives_until_every_lookup_is_forgotten(table):
    a = table.found(table.root, "a", attrs(10))
    table.found(table.root, "a", attrs(10))
    table.found(table.root, "a", attrs(10))
    table.forget(a, 2)
    assert a.nlookup == 1
    assert not gone(table, a)
    assert table.at_path("/a") is a
    table.forget(a, 1)
    assert gone(table, a)
    assert table.path(a) is None  # a request still holding it finds no name
    assert table.at_path("/a") is None
    assert table.root.kids is None
    assert len(table) == 1


def test_forget_by_id_counts_too(table):
    a = table.found(table.root, "a", attrs(10))
    table.found(table.root, "a", attrs(10))
    table.forget_id(a.id, 1)
    assert not gone(table, a) and a.nlookup == 1
    table.forget_id(a.id, 1)
    assert gone(table, a)


def test_a_forgotten_directory_stays_while_it_has_known_names(table):
    d = table.found(table.root, "d", attrs(2, DIR))
    e = table.found(d, "e", attrs(3, DIR))
    f = table.found(e, "f", attrs(4))
    table.forget(d, 1)
    table.forget(e, 1)
    assert not gone(table, d) and not gone(table, e)
    assert table.path(f) == "/d/e/f"  # the engine still needs the way to f
    table.forget(f, 1)
    assert gone(table, f) and gone(table, e) and gone(table, d)
    assert len(table) == 1
    assert table.root.kids is None


def test_a_forgotten_link_lets_every_directory_of_its_names_go(table):
    d1 = table.found(table.root, "d1", attrs(2, DIR))
    d2 = table.found(table.root, "d2", attrs(3, DIR))
    d3 = table.found(table.root, "d3", attrs(4, DIR))
    f = table.found(d1, "f", attrs(10, nlink=3))
    table.found(d2, "g", attrs(10, nlink=3))
    table.found(d3, "h", attrs(10, nlink=3))
    keep = table.found(d3, "keep", attrs(11))
    for d in (d1, d2, d3):
        table.forget(d, 1)
    table.forget(f, 3)
    assert gone(table, f)
    assert gone(table, d1) and gone(table, d2)
    assert not gone(table, d3)  # still holds another known name
    assert table.path(keep) == "/d3/keep"
    assert table.at_path("/d3/h") is None
    # the number may come back as another object
    again = table.found(table.root, "x", attrs(10, nlink=2))
    assert again is not f


# ---------------------------------------------------------------------------------------------
# removals

def test_a_removed_name_held_by_the_kernel(table):
    d = table.found(table.root, "d", attrs(2, DIR))
    f = table.found(d, "f", attrs(10))
    table.forget(d, 1)  # kept only for f's name
    table.removed(d, "f")
    assert table.path(f) is None
    assert table.at_path("/d/f") is None
    assert not gone(table, f)  # the kernel still holds it
    assert gone(table, d)  # nothing keeps the directory any more
    table.forget(f, 1)
    assert gone(table, f)
    assert len(table) == 1


def test_removing_an_unknown_name_changes_nothing(table):
    a = table.found(table.root, "a", attrs(10))
    d = table.found(table.root, "d", attrs(2, DIR))
    table.removed(table.root, "x")
    table.removed(d, "x")
    assert table.at_path("/a") is a and table.at_path("/d") is d
    assert len(table) == 3


def test_removing_names_of_a_link_one_by_one(table):
    a = table.found(table.root, "a", attrs(10, nlink=3))
    table.found(table.root, "b", attrs(10, nlink=3))
    table.found(table.root, "c", attrs(10, nlink=3))
    table.removed(table.root, "b")  # a later name
    assert a.names() == [(table.root, "a"), (table.root, "c")]
    assert table.at_path("/b") is None
    table.removed(table.root, "a")  # the first name: the next becomes the path
    assert a.names() == [(table.root, "c")]
    assert table.path(a) == "/c"
    assert table.found(table.root, "n", attrs(10, nlink=2)) is a  # still known by number
    table.removed(table.root, "c")
    table.removed(table.root, "n")
    assert table.path(a) is None
    assert not gone(table, a)
    # every name gone: the number may be reused by a new object, which is a new inode
    new = table.found(table.root, "new", attrs(10, nlink=2))
    assert new is not a


def test_removing_the_first_of_three_names_keeps_the_other_two(table):
    a = table.found(table.root, "a", attrs(10, nlink=3))
    table.found(table.root, "b", attrs(10, nlink=3))
    table.found(table.root, "c", attrs(10, nlink=3))
    table.removed(table.root, "a")
    assert a.names() == [(table.root, "b"), (table.root, "c")]
    assert table.at_path("/b") is a and table.at_path("/c") is a


# ---------------------------------------------------------------------------------------------
# open handles

def test_an_open_handle_keeps_a_forgotten_inode(table):
    a = table.found(table.root, "a", attrs(10))
    with table.lock:
        table.add_handle(a, 7)
        table.add_handle(a, 8)
    table.forget(a, 1)
    assert not gone(table, a)
    assert table.path(a) == "/a"
    table.drop_handle(a, 7)
    assert not gone(table, a)
    table.drop_handle(a, 8)
    assert gone(table, a)
    assert table.at_path("/a") is None


def test_an_unlinked_open_file_goes_with_its_last_handle(table):
    a = table.found(table.root, "a", attrs(10))
    with table.lock:
        table.add_handle(a, 1)
    table.removed(table.root, "a")
    table.forget(a, 1)
    assert not gone(table, a)
    assert table.path(a) is None
    table.drop_handle(a, 1)
    assert gone(table, a)


def test_dropping_a_handle_of_an_inode_without_any(table):
    a = table.found(table.root, "a", attrs(10))
    table.drop_handle(a, 3)
    assert not gone(table, a)
    assert a.handles is None


# ---------------------------------------------------------------------------------------------
# renames

def test_a_rename_moves_the_name_and_what_is_below(table):
    d = table.found(table.root, "d", attrs(2, DIR))
    f = table.found(d, "f", attrs(3))
    e = table.found(table.root, "e", attrs(4, DIR))
    table.renamed(table.root, "d", e, "moved")
    assert table.path(d) == "/e/moved"
    assert table.path(f) == "/e/moved/f"
    assert table.at_path("/d") is None
    assert table.at_path("/e/moved/f") is f
    assert d.names() == [(e, "moved")]


def test_a_rename_over_a_known_name(table):
    a = table.found(table.root, "a", attrs(10))
    t = table.found(table.root, "t", attrs(20))
    table.renamed(table.root, "a", table.root, "t")
    assert table.at_path("/t") is a
    assert table.at_path("/a") is None
    assert table.path(t) is None
    assert not gone(table, t)  # the kernel still holds it
    table.forget(t, 1)
    assert gone(table, t)
    assert table.path(a) == "/t"


def test_a_replaced_link_number_may_come_back(table):
    """A hard-linked file replaced by a rename, by its last known name, is no longer found by its
    number: a new object with that number is a new inode."""
    t = table.found(table.root, "t", attrs(20, nlink=2))
    table.found(table.root, "a", attrs(10))
    table.renamed(table.root, "a", table.root, "t")
    assert table.found(table.root, "x", attrs(20, nlink=2)) is not t


def test_a_replaced_link_with_another_name_keeps_its_number(table):
    t = table.found(table.root, "t", attrs(20, nlink=2))
    table.found(table.root, "u", attrs(20, nlink=2))
    table.found(table.root, "a", attrs(10))
    table.renamed(table.root, "a", table.root, "t")
    assert t.names() == [(table.root, "u")]
    assert table.found(table.root, "x", attrs(20, nlink=2)) is t


def test_an_exchange_swaps_the_names(table):
    a = table.found(table.root, "a", attrs(10, DIR))
    d = table.found(table.root, "d", attrs(2, DIR))
    b = table.found(d, "b", attrs(20, nlink=2))
    inner = table.found(a, "inner", attrs(30))
    table.renamed(table.root, "a", d, "b", exchange=True)
    assert table.at_path("/d/b") is a
    assert table.at_path("/a") is b
    assert table.path(b) == "/a"
    assert table.path(inner) == "/d/b/inner"
    assert table.found(table.root, "link", attrs(20, nlink=2)) is b  # still known by number


def test_a_rename_of_an_unknown_name_onto_a_known_one(table):
    t = table.found(table.root, "t", attrs(20))
    table.renamed(table.root, "never-looked-up", table.root, "t")
    assert table.at_path("/t") is None
    assert table.path(t) is None
    assert not gone(table, t)


def test_a_rename_between_directories_with_no_known_names(table):
    d = table.found(table.root, "d", attrs(2, DIR))
    e = table.found(table.root, "e", attrs(3, DIR))
    table.renamed(d, "x", e, "y")
    assert d.kids is None and e.kids is None
    assert table.at_path("/d") is d and table.at_path("/e") is e


def test_a_rename_onto_an_unknown_name(table):
    a = table.found(table.root, "a", attrs(10))
    d = table.found(table.root, "d", attrs(2, DIR))
    table.renamed(table.root, "a", d, "b")
    assert table.at_path("/d/b") is a
    assert table.path(a) == "/d/b"


def test_a_rename_of_one_name_of_a_link(table):
    a = table.found(table.root, "a", attrs(10, nlink=2))
    table.found(table.root, "b", attrs(10, nlink=2))
    table.renamed(table.root, "a", table.root, "c")
    assert a.names() == [(table.root, "b"), (table.root, "c")]
    assert table.path(a) == "/b"
    assert table.at_path("/c") is a and table.at_path("/a") is None


def test_a_forgotten_directory_renamed_away_from_is_let_go(table):
    d = table.found(table.root, "d", attrs(2, DIR))
    f = table.found(d, "f", attrs(3))
    table.forget(d, 1)  # kept only for f's name
    table.renamed(d, "f", table.root, "f")
    assert gone(table, d)
    assert table.path(f) == "/f"


# ---------------------------------------------------------------------------------------------
# copy-up of a lower hard link (changed)

def test_a_copied_up_lower_link_keeps_its_inode_under_its_only_name(table):
    low = attrs(40, nlink=2, lower_link=True)
    a = table.found(table.root, "a", low)
    up = attrs(50, nlink=1)
    assert table.changed(a, table.root, "a", up) is False
    assert a.key == (50, REG)
    assert table.found(table.root, "a", up) is a
    assert a.nlookup == 2


def test_a_copied_up_shared_object_is_found_by_number(table):
    a = table.found(table.root, "a", attrs(40, nlink=2, lower_link=True))
    up = attrs(50, nlink=2)
    assert table.changed(a, table.root, "a", up) is False
    assert table.found(table.root, "b", up) is a


def test_a_copied_up_lower_link_stays_under_the_number_it_had(table):
    """After the copy-up, the old lower number is no longer this inode's; the other lower name is
    still its own inode."""
    a = table.found(table.root, "a", attrs(40, nlink=2, lower_link=True))
    other = table.found(table.root, "other", attrs(40, nlink=2, lower_link=True))
    assert table.changed(a, table.root, "a", attrs(50)) is False
    assert table.at_path("/other") is other and other is not a
    assert other.key == (40, REG, table.root.id, "other")


def test_an_unchanged_identity_is_no_change(table):
    a = table.found(table.root, "a", attrs(40, nlink=2, lower_link=True))
    key = a.key
    assert table.changed(a, table.root, "a", attrs(40, nlink=2, lower_link=True)) is False
    assert a.key == key
    assert table.at_path("/a") is a


def test_a_change_not_of_a_lower_link_is_left_to_the_kernel(table):
    """An upper object, a removed one, or one of another type: the table keeps what it knows."""
    a = table.found(table.root, "a", attrs(10))
    assert table.changed(a, table.root, "a", attrs(11)) is False
    assert a.key == (10, REG)
    assert table.at_path("/a") is a
    low = table.found(table.root, "low", attrs(40, nlink=2, lower_link=True))
    key = low.key
    assert table.changed(low, table.root, "low", attrs(41, DIR)) is False
    assert low.key == key
    assert table.at_path("/low") is low
    gone_one = table.found(table.root, "g", attrs(42, nlink=2, lower_link=True))
    table.removed(table.root, "g")
    assert gone_one.key is None
    assert table.changed(gone_one, table.root, "g", attrs(43)) is False
    assert gone_one.key is None


def test_a_copied_up_lower_link_that_is_now_a_known_object_lets_the_name_go(table):
    known = table.found(table.root, "k", attrs(50, nlink=2))
    a = table.found(table.root, "a", attrs(40, nlink=2, lower_link=True))
    assert table.changed(a, table.root, "a", attrs(50, nlink=2)) is True
    assert table.at_path("/a") is None
    assert table.path(a) is None
    assert a.key is None
    assert table.at_path("/k") is known
    assert not gone(table, a)  # the kernel holds it until it forgets


def test_a_copied_up_lower_link_with_several_names_lets_the_name_go(table):
    a = table.found(table.root, "a", attrs(40, nlink=2, lower_link=True))
    table.found(table.root, "b", attrs(40, nlink=2, lower_link=True), inode=a)
    assert table.changed(a, table.root, "a", attrs(50)) is True
    assert a.names() == [(table.root, "b")]
    assert table.at_path("/a") is None
    assert a.key == (40, REG, table.root.id, "a")  # still keyed: it has a name


# ---------------------------------------------------------------------------------------------
# moves and the generation

def test_a_move_counts_twice_in_the_generation(table):
    assert table.generation == 0 and table.moving == 0
    with table.moving_names():
        assert table.generation == 1
        assert table.moving == 1
    assert table.generation == 2
    assert table.moving == 0
    with pytest.raises(RuntimeError), table.moving_names():
        raise RuntimeError("the engine failed")
    assert table.generation == 4
    assert table.moving == 0


def test_settled_says_whether_names_moved(table):
    start = time.monotonic()
    assert table.settled(table.generation, 30) is False  # no move under way: no wait
    generation = table.generation
    with table.moving_names():
        pass
    assert table.settled(generation, 30) is True
    assert time.monotonic() - start < 10


def test_settled_never_waits_on_its_own_move(table):
    start = time.monotonic()
    with table.moving_names():
        assert table.settled(table.generation, 30) is False
    assert time.monotonic() - start < 10


def moving_in_thread(table, release):
    """A move in another thread that lasts until `release` is set (or 10 s pass): the thread, once moving."""
    started = threading.Event()

    def move():
        with table.moving_names():
            started.set()
            release.wait(10)
    thread = threading.Thread(target=move)
    thread.start()
    assert started.wait(10)
    return thread


def test_settled_waits_for_another_threads_move_to_end(table):
    with table.moving_names():  # this thread's own move is over: it no longer counts as the mover
        pass
    release = threading.Event()
    thread = moving_in_thread(table, release)
    generation = table.generation
    timer = threading.Timer(0.3, release.set)
    start = time.monotonic()
    timer.start()
    assert table.settled(generation, 20) is True
    waited = time.monotonic() - start
    thread.join()
    assert 0.2 < waited < 8  # woken at the move's end, not at the timeout
    assert table.generation == generation + 1


def test_settled_gives_up_after_the_timeout(table):
    release = threading.Event()
    thread = moving_in_thread(table, release)
    generation = table.generation
    start = time.monotonic()
    assert table.settled(generation, 0.2) is False
    waited = time.monotonic() - start
    release.set()
    thread.join()
    assert 0.15 < waited < 5
    assert table.settled(generation, 0.2) is True


def test_settled_during_its_own_move_waits_for_anothers(table):
    """A thread moving names itself still waits for another thread's move (only its own never counts)."""
    release = threading.Event()
    thread = moving_in_thread(table, release)
    timer = threading.Timer(0.3, release.set)
    with table.moving_names():
        generation = table.generation
        start = time.monotonic()
        timer.start()
        assert table.settled(generation, 20) is True
        waited = time.monotonic() - start
    thread.join()
    assert 0.2 < waited < 8
