"""Names in the merged view: creating, linking, removing and renaming them (the kernel's dir.c).

Each change of a name is built in the workdir and lands in the upper in one
renameat2 step, leaving a whiteout where a lower layer still has the name,
so that a crash leaves the upper before or after the change, never between.
"""

from __future__ import annotations

import errno
import os
import stat

from cowfs.errors import os_error
from cowfs.formatting import kind_name
from cowfs.overlay import acl, copyup, fileattr, handles, override
from cowfs.overlay.locking import locked
from cowfs.overlay.lookup import parent_of, renamed_paths
from cowfs.overlay.syscalls import RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT, rename2
from cowfs.overlay.whiteout import (
    KERNEL_ORIGIN,
    REDIRECT,
    is_opaque,
    is_whiteout,
    make_whiteout,
    mark_impure,
    set_marker,
    set_opaque,
)

# The longest absolute redirect the kernel writes (its overlay module's redirect_max, 256 by default): a
# move that needs a longer one fails with EXDEV, so that tools fall back to copying, as on the kernel.
REDIRECT_MAX = 256


class Namespace:
    """The name operations of the engine (mixed into `Union`).

    Uses the engine's `stack`, `layers`, `prefix`, `work`, `events`, `idmap`, `_node`, `_dir`, `_changed`,
    `_require_writable`, `_copy_up` and `_upper_parent`.
    """

    # -- creating names --------------------------------------------------------------------------
    def _new_owner(self, parent, owner):
        """(uid, gid, setgid) on disk of a new object by `owner` (None: this process) in directory `parent`,
        which passes on its group when it is set-group-ID (as its recorded attributes say, if any)."""
        if owner is None:
            uid, gid = os.geteuid(), os.getegid()
        elif self.idmap:
            uid, gid = self.idmap.disk_uid(owner[0]), self.idmap.disk_gid(owner[1])
        else:
            uid, gid = owner
        st = os.lstat(parent.real)
        mode, group = st.st_mode, st.st_gid
        if self.layers.marked:
            recorded = override.read(parent.real, st.st_mode)
            if recorded is not None:
                mode, group = recorded.mode, recorded.gid
        setgid = bool(mode & stat.S_ISGID)
        return uid, (group if setgid else gid), setgid

    def _chown_new(self, tmp, uid, gid, kind):
        """Give a new object its owner; True when it must be recorded instead (see override.py): an
        unprivileged mount cannot give it away, and in a marked upper a file or directory keeps it
        recorded. Otherwise an owner the mapping options ask for is left as this process's, as
        fuse-overlayfs leaves it; without them the failure is the caller's (EPERM)."""
        try:
            os.chown(tmp, uid, gid, follow_symlinks=False)
            return False
        except PermissionError:
            if 0 in self.layers.marked and override.carries(kind):
                return True
            if self.idmap:
                return False
            raise

    def _place_new(self, path, make, mode, owner, kind, umask=0):
        """Create a new object at merged `path`: built in the workdir, then renamed into the upper.

        `make(tmp)` creates the bare object and may return an open descriptor.
        A directory made where a whiteout stands is made opaque so that old
        lower entries do not come back; one made in a merged directory too,
        unless offline changes are allowed (`Stack.allow_offline_changes`), as
        the kernel does. The umask
        applies unless the directory has a default ACL, which is inherited.
        """
        self._require_writable(path)
        parent = self._dir(parent_of(path)[0])
        if self.layers.resolve(path) is not None:
            raise os_error(errno.EEXIST, path)
        self._check_protection(parent, path, fileattr.FS_IMMUTABLE_FL)
        uid, gid, setgid = self._new_owner(parent, owner)
        upper_parent, name = self._upper_parent(path)
        target = upper_parent.real + "/" + name
        try:
            with copyup.staged(self.work) as tmp:
                fd = None
                try:
                    fd = make(tmp)
                    record = self._chown_new(tmp, uid, gid, kind)
                    if kind != stat.S_IFLNK:
                        mode, acls = acl.for_new(upper_parent.real, mode, umask, kind == stat.S_IFDIR)
                        if kind == stat.S_IFDIR and setgid:
                            mode |= stat.S_ISGID
                        os.chmod(tmp, stat.S_IMODE(mode))
                        for name, value in acls.items():  # after chmod, which would rewrite the ACL's mask
                            os.setxattr(tmp, name, value, follow_symlinks=False)
                    if record:
                        override.write(tmp, override.Override(uid, gid, stat.S_IMODE(mode), kind))
                    try:
                        existing = os.lstat(target)
                    except FileNotFoundError:
                        existing = None
                    opaque = kind == stat.S_IFDIR and (existing is not None or (
                        upper_parent.has_lower and not self.stack.allow_offline_changes))
                    if opaque:
                        set_opaque(tmp, self.prefix)
                    if existing is None:
                        fileattr.inherit_flags(upper_parent.real, tmp, kind)
                        rename2(tmp, target, RENAME_NOREPLACE)
                    elif not is_whiteout(existing):
                        raise os_error(errno.EEXIST, path)
                    elif kind == stat.S_IFDIR:
                        rename2(tmp, target, RENAME_EXCHANGE)
                        os.unlink(tmp)  # the whiteout, swapped out
                    else:
                        os.rename(tmp, target)  # replaces the whiteout in one step
                except BaseException:  # the new object's descriptor goes with it
                    if fd is not None:
                        os.close(fd)
                    raise
        finally:
            self._changed()
        if self.events:
            if existing is not None:
                self.events.emit("whiteout_removed", path)
            self.events.emit("create", path, kind=kind_name(kind))
            if opaque:
                self.events.emit("opaque", path)
        return fd

    @locked
    def mkdir(self, path: str, mode: int, owner: tuple[int, int] | None = None, umask: int = 0) -> None:
        self._place_new(path, lambda tmp: os.mkdir(tmp, 0o700), mode, owner, stat.S_IFDIR, umask)

    @locked
    def symlink(self, path: str, target: str, owner: tuple[int, int] | None = None) -> None:
        """Create a symlink at `path` pointing to `target` (the order of ln -s reversed, as in FUSE)."""
        self._place_new(path, lambda tmp: os.symlink(target, tmp), 0o777, owner, stat.S_IFLNK)

    @locked
    def mknod(self, path: str, mode: int, rdev: int = 0, owner: tuple[int, int] | None = None,
              umask: int = 0) -> None:
        """Create a FIFO, socket, device node (as root) or empty regular file."""
        kind = stat.S_IFMT(mode) or stat.S_IFREG
        if kind == stat.S_IFDIR:
            raise os_error(errno.EINVAL, path)
        if kind == stat.S_IFCHR and rdev == 0:
            raise os_error(errno.EPERM, path)  # a whiteout cannot be made through the mount
        self._place_new(path, lambda tmp: os.mknod(tmp, kind | 0o600, rdev), mode, owner, kind, umask)

    @locked
    def link(self, old: str, new: str) -> None:
        """Hard link: the source is copied up and linked inside the upper."""
        self._require_writable(new)
        src = self._node(old)
        if src.is_dir:
            raise os_error(errno.EPERM, old)
        new_parent = self._dir(parent_of(new)[0])
        if self.layers.resolve(new) is not None:
            raise os_error(errno.EEXIST, new)
        self._check_protection(new_parent, new, fileattr.FS_IMMUTABLE_FL)
        self._check_protection(src, old)
        if self.stack.metacopy and stat.S_ISREG(src.st.st_mode) and self._stays_metadata_only(src):
            # A metadata-only copy stays one: an absolute redirect on the shared inode lets
            # every name of it find the data (the kernel uses the origin file handle instead);
            # one it has already (another name of an indexed file) stays, as the kernel's.
            data_path = "/" + next(rel for layer, rel in src.parts if layer > 0)
            src = self._copy_up(src, data=False)
            if not (src.redirect or "").startswith("/"):
                set_marker(src.real, self.prefix, REDIRECT, data_path)
                self._changed()
        else:
            src = self._copy_up(src)
        entry = self._index_of(src)
        nlink = copyup.merged_nlink(entry, self.prefix) if entry is not None else None
        upper_parent, name = self._upper_parent(new)
        target = upper_parent.real + "/" + name
        over_whiteout = os.path.lexists(target)
        try:
            if over_whiteout:  # link beside it, then replace it in one step
                with copyup.staged(self.work) as tmp:
                    os.link(src.real, tmp, follow_symlinks=False)
                    os.rename(tmp, target)
            else:
                os.link(src.real, target, follow_symlinks=False)
            if entry is not None:
                copyup.set_nlink(entry, self.prefix, nlink + 1)
        finally:
            self._changed()
        if self.events:
            if over_whiteout:
                self.events.emit("whiteout_removed", new)
            self.events.emit("create", new, kind="hard link", to=old)

    # -- removing names --------------------------------------------------------------------------
    @locked
    def unlink(self, path: str) -> None:
        """Remove a non-directory; a name a lower layer has becomes a whiteout."""
        self._require_writable(path)
        node = self._node(path)
        if path != "/":
            self._check_removable(node)  # first, as the VFS's may_delete
        if node.is_dir:
            raise os_error(errno.EISDIR, path)
        self._remove(node)

    @locked
    def rmdir(self, path: str) -> None:
        """Remove an empty (in the merged view) directory, with the whiteouts inside its upper part."""
        self._require_writable(path)
        node = self._node(path)
        if path != "/":
            self._check_removable(node)  # first, as the VFS's may_delete
        if not node.is_dir:
            raise os_error(errno.ENOTDIR, path)
        if path == "/":
            raise os_error(errno.EBUSY, path)
        if self.layers.list_dir(node):
            raise os_error(errno.ENOTEMPTY, path)
        self._remove(node)

    def _remove(self, node):
        """Remove `node` from the merged view (an open descriptor keeps an upper file alive, unnamed)."""
        node, entry, nlink = self._indexed_name(node)
        self.layers.remembered.pop(node.path, None)
        parent_path, name = parent_of(node.path)
        needs_whiteout = self.layers.lower_positive(self.layers.resolve_required(parent_path), name)
        if self.events:
            if node.in_upper:
                self.events.emit("remove", node.path, kind=kind_name(node.st.st_mode))
            if needs_whiteout:
                self.events.emit("whiteout", node.path)
        try:
            if node.in_upper and (needs_whiteout or node.is_dir):  # the entry moves to the workdir, and goes
                with copyup.staged(self.work) as tmp:
                    if needs_whiteout:
                        self._whiteout_in_place(node.real, tmp)
                    else:
                        os.rename(node.real, tmp)
            elif node.in_upper:
                os.unlink(node.real)
            else:
                upper_parent, name = self._upper_parent(node.path)
                with copyup.staged(self.work) as tmp:
                    make_whiteout(tmp)
                    rename2(tmp, upper_parent.real + "/" + name, RENAME_NOREPLACE)
            self._name_gone(entry, nlink)
        finally:
            self._changed()

    # -- index=on: the merged link count of a lower hard link copied up through WORKDIR/index -------
    def _index_of(self, node):
        """The index entry of upper file `node` when it is indexed (its origin names an entry that is
        its own inode), else None."""
        if self.layers.index is None or node is None or node.is_dir or not node.in_upper:
            return None
        try:
            origin = os.getxattr(node.real, self.prefix + KERNEL_ORIGIN, follow_symlinks=False)
        except OSError:
            return None
        entry = self.layers.index + "/" + handles.index_name(origin)
        try:
            return entry if os.path.samestat(os.lstat(entry), os.lstat(node.real)) else None
        except FileNotFoundError:
            return None

    def _indexed_name(self, node):
        """Before a name of a lower hard link goes, the file is copied up through the index, as the
        kernel does, so that the index keeps its merged link count; returns (node, its index entry
        or None, the merged link count before)."""
        if self.layers.index is None or node is None or node.is_dir:
            return node, None, None
        if node.index is not None or self._indexed(node):
            node = self._copy_up(node, data=False)  # with metacopy=on, metadata only (as the kernel's)
        entry = self._index_of(node)
        return node, entry, (copyup.merged_nlink(entry, self.prefix) if entry is not None else None)

    def _name_gone(self, entry, nlink):
        """One name of the indexed file at `entry`, whose merged count was `nlink`, is gone: the count
        drops, and at none left the index entry goes too."""
        if entry is None:
            return
        if nlink <= 1:
            os.unlink(entry)
        else:
            copyup.set_nlink(entry, self.prefix, nlink - 1)

    def _check_removable(self, node):
        """EPERM for a name that may not go: an append-only or immutable object, or one in an append-only
        or immutable directory (as the VFS's may_delete)."""
        self._check_protection(node, node.path)
        self._check_protection(self._node(parent_of(node.path)[0]), node.path)

    def _whiteout_in_place(self, real, tmp):
        """Turn the upper entry at `real` into a whiteout, in one step; the entry lands at staging name `tmp`.

        In a set-group-ID directory the whiteout is made in the workdir and exchanged in, as the kernel makes
        it there: RENAME_WHITEOUT would give it the directory's group."""
        if not os.lstat(os.path.dirname(real)).st_mode & stat.S_ISGID:
            try:
                rename2(real, tmp, RENAME_WHITEOUT)
                return
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise
        make_whiteout(tmp)
        rename2(tmp, real, RENAME_EXCHANGE)

    # -- renaming --------------------------------------------------------------------------------
    @locked
    def rename(self, old: str, new: str, flags: int = 0) -> bool | None:
        """Rename within the merged view, with renameat2's NOREPLACE or EXCHANGE; a name a lower layer
        still shows is left as a whiteout (RENAME_WHITEOUT), in the same step. Returns False when a
        plain rename has nothing to do (the same name, or two names of one file).

        A directory with a lower part moves only with redirect_dir=on (it gets a
        redirect xattr); otherwise EXDEV, and tools such as mv copy instead.
        """
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == RENAME_NOREPLACE | RENAME_EXCHANGE:
            raise os_error(errno.EINVAL, old)
        self._require_writable(old)
        src = self._node(old)
        old_parent_path, old_name = parent_of(old)
        new_parent_path, new_name = parent_of(new)
        self._dir(new_parent_path)
        dst = self.layers.resolve(new)
        if flags & RENAME_NOREPLACE and dst is not None:
            raise os_error(errno.EEXIST, new)
        if flags & RENAME_EXCHANGE:
            if dst is None:
                raise os_error(errno.ENOENT, new)
            self._check_removable(src)
            self._check_removable(dst)
            return self._exchange(src, dst)
        if old == new:
            return False
        if src.is_dir and (new + "/").startswith(old + "/"):
            raise os_error(errno.EINVAL, new)
        # the checks the VFS makes before the overlay is asked, in its order: the same file, then may the
        # old name go (append-only, immutable), then may the new one go or be made, then the types
        if dst is not None and src.in_upper and dst.in_upper and os.path.samestat(src.st, dst.st):
            return False  # two links to one file: rename(2) does nothing
        if dst is not None and self.layers.index is not None and not src.is_dir and os.path.samestat(src.st, dst.st):
            return False  # index=on: names of one lower file (or its indexed copy) are one inode too
        self._check_removable(src)
        if dst is not None:
            self._check_removable(dst)
        else:
            self._check_protection(self._node(new_parent_path), new, fileattr.FS_IMMUTABLE_FL)
        if dst is not None:
            if src.is_dir and not dst.is_dir:
                raise os_error(errno.ENOTDIR, new)
            if dst.is_dir and not src.is_dir:
                raise os_error(errno.EISDIR, new)
        if not self._can_move(src):
            raise os_error(errno.EXDEV, old)
        if dst is not None and dst.is_dir and self.layers.list_dir(dst):
            raise os_error(errno.ENOTEMPTY, new)

        needs_whiteout = self.layers.lower_positive(self.layers.resolve_required(old_parent_path), old_name)
        dst, dst_entry, dst_nlink = self._indexed_name(dst)
        try:
            src, upper_parent = self._prepare_move(src, new)
            target = upper_parent.real + "/" + new_name
            try:
                existing = os.lstat(target)
            except FileNotFoundError:
                existing = None
            if existing is not None and stat.S_ISDIR(existing.st_mode):
                self._empty_upper_dir(target)
            if existing is not None and src.is_dir and is_whiteout(existing):
                rename2(src.real, target, RENAME_EXCHANGE)  # the whiteout lands at the old name
                if not needs_whiteout:
                    os.unlink(src.real)
            else:
                rename2(src.real, target, RENAME_WHITEOUT if needs_whiteout else 0)
            if dst_entry is not None and not os.path.samestat(os.lstat(dst_entry), os.lstat(target)):
                self._name_gone(dst_entry, dst_nlink)
        finally:
            self._changed()
        self._move_remembered(old, new)
        if self.events:
            self.events.emit("rename", old, to=new)
            if existing is not None and is_whiteout(existing):
                self.events.emit("whiteout_removed", new)
            if needs_whiteout:
                self.events.emit("whiteout", old)

    def _exchange(self, a, b):
        """renameat2(RENAME_EXCHANGE): both names stay, so no whiteout; each side is marked for its new place."""
        if a.path == b.path:
            return
        if (b.path + "/").startswith(a.path + "/") or (a.path + "/").startswith(b.path + "/"):
            raise os_error(errno.EINVAL, b.path)
        if a.in_upper and b.in_upper and os.path.samestat(a.st, b.st):
            return
        for node in (a, b):
            if not self._can_move(node):
                raise os_error(errno.EXDEV, node.path)
        old, new = a.path, b.path
        try:
            self._copy_up(b, data=False)  # the kernel copies both up before it writes either redirect
            a, _ = self._prepare_move(a, new)
            b, _ = self._prepare_move(self.layers.resolve_required(new), old)
            rename2(self.layers.resolve_required(old).real, b.real, RENAME_EXCHANGE)
        finally:
            self._changed()
        self._move_remembered(old, new, exchange=True)
        if self.events:
            self.events.emit("rename", old, to=new)
            self.events.emit("rename", new, to=old)

    def _can_move(self, node):
        """A directory with a lower part can change its name only by getting a redirect."""
        return not (node.is_dir and node.has_lower) or self.stack.create_redirects

    def _prepare_move(self, node, to):
        """Copy `node` up and mark it to read the same at path `to`; returns it and the upper parent of `to`.

        A directory with lower parts (or, under metacopy, a file whose data
        stays below) gets a redirect to where its lower part lies; a new
        directory landing where lower directories merge is made opaque.
        """
        from_parent, from_name = parent_of(node.path)
        to_parent, _ = parent_of(to)
        redirect = kept = None
        # a metadata-only copy finds its data by name
        moves_data_ref = self.stack.metacopy and stat.S_ISREG(node.st.st_mode) and self._stays_metadata_only(node)
        if (node.is_dir and node.has_lower) or moves_data_ref:
            # as the kernel's ovl_need_absolute_redirect: relative within one directory, except for
            # a lower hard link, whose upper names could come to live in different directories
            if (node.redirect or "").startswith("/"):  # kept, as the kernel's ovl_set_redirect keeps it
                redirect = kept = node.redirect
            elif from_parent == to_parent and (node.is_dir or _lower_nlink(node) == 1):
                redirect = node.redirect or from_name
            else:
                redirect = "/" + next(rel for layer, rel in node.parts if layer > 0)
        node = self._copy_up(node, data=False)
        upper_parent, _ = self._upper_parent(to)
        if redirect is not None and redirect != kept and redirect.startswith("/") and len(redirect) > REDIRECT_MAX:
            raise os_error(errno.EXDEV, node.path)  # after the copy-ups, as the kernel's ovl_set_redirect; a
            # redirect kept is kept whatever its length (a kernel with a larger redirect_max may have written it)
        if redirect is not None and redirect != node.redirect:
            set_marker(node.real, self.prefix, REDIRECT, redirect)
            if self.events:
                self.events.emit("redirect", to, value=redirect)
        elif node.is_dir and not node.has_lower and upper_parent.has_lower and not is_opaque(node.real, self.prefix):
            set_opaque(node.real, self.prefix)
            if self.events:
                self.events.emit("opaque", to)
        if from_parent != to_parent and _has_origin(node.real, self.prefix):
            mark_impure(upper_parent.real, self.prefix)  # as the kernel's rename into another dir
        return node, upper_parent

    def _move_remembered(self, old, new, exchange=False):
        remembered = self.layers.remembered
        moves = renamed_paths(list(remembered), old, new, exchange)
        taken = {p: remembered.pop(p) for p, _ in moves}
        for p, q in moves:
            remembered[q] = taken[p]

    def _empty_upper_dir(self, real):
        """Make an upper directory about to be replaced really empty (it may hold whiteouts),
        by swapping in an empty opaque copy, so the merged view never shows lower entries."""
        if not os.listdir(real):
            return
        with copyup.staged(self.work) as tmp:
            os.mkdir(tmp, 0o700)
            set_opaque(tmp, self.prefix)
            rename2(tmp, real, RENAME_EXCHANGE)


def _has_origin(real, prefix):
    try:
        os.getxattr(real, prefix + KERNEL_ORIGIN, follow_symlinks=False)
    except OSError:
        return False
    return True


def _lower_nlink(node):
    """The link count of the lower file whose data `node` reads (its own while it is not copied up)."""
    return (os.lstat(node.data) if node.data is not None else node.st).st_nlink
