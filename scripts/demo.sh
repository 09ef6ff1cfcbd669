#!/usr/bin/env bash
# `make demo`: Docker's storage-driver walkthrough (acme/my-final-image:1.0), mounted with cowfs.
#
# Builds four image layers as plain directories under scratch/demo, stacks them with
# cowfs the way Docker's overlay2 driver does, acts like a container on top (change,
# delete, create) and shows where each change landed.
#
#   COWFS_DEMO_KERNEL=1   mount with the kernel's overlayfs instead (to compare; needs root)
#   COWFS=PATH            the cowfs command (default: .venv/bin/cowfs)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd -P)"
DEMO="$ROOT/scratch/demo"
LAYERS="$DEMO/layers"
L1="$LAYERS/1-base" L2="$LAYERS/2-bash" L3="$LAYERS/3-copy-app" L4="$LAYERS/4-chmod"
UPPER="$DEMO/container/upper" WORK="$DEMO/container/work" MNT="$DEMO/merged"
COWFS="${COWFS:-$ROOT/.venv/bin/cowfs}"
KERNEL="${COWFS_DEMO_KERNEL:-0}"
[ "$KERNEL" = 1 ] && ENGINE="kernel overlayfs" || ENGINE="cowfs"

heading() { printf '\n== %s\n' "$1"; }
explain() { printf '   %s\n' "$*"; }
show() { sed 's/^/   | /'; }
fail() { echo "demo: $*" >&2; exit 1; }

# Everything mounted at or under a directory, deepest first.
mounts_under() {
    awk -v d="$1" '$2 == d || index($2, d "/") == 1 { print $2 }' /proc/mounts | sort -r
}

unmount() {
    if [ "$KERNEL" = 1 ]; then
        umount "$1"
    else
        "$COWFS" umount "$1"
    fi
}

# Last resort, used on failure and for leftovers of an interrupted run.
force_unmount() {
    local m
    for m in $(mounts_under "$1"); do
        fusermount3 -u "$m" 2>/dev/null || fusermount -u "$m" 2>/dev/null || umount "$m" 2>/dev/null \
            || umount -l "$m" || echo "demo: could not unmount $m" >&2
    done
}

on_exit() {
    local rc=$?
    if [ -n "$(mounts_under "$DEMO")" ]; then
        echo "demo: removing the mount left by a failed step" >&2
        force_unmount "$DEMO"
    fi
    [ "$rc" -eq 0 ] || echo "demo: FAILED (exit $rc)" >&2
    exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT TERM
trap 'echo "demo: step failed at line $LINENO: $BASH_COMMAND" >&2' ERR

# One line per layer: the Dockerfile step, how many files, how many bytes of file data.
layer_summary() {
    local n bytes
    n="$(find "$2" -type f | wc -l)"
    bytes="$(find "$2" -type f -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }')"
    printf 'layer %s: %s (%s file%s, %s)\n' "$1" "$3" "$n" "$([ "$n" = 1 ] || echo s)" \
        "$(numfmt --to=iec --suffix=B "$bytes")"
}

# Where a merged file comes from: the upper (the container) or the topmost layer that has it.
origin() {
    local d
    for d in upper:"$UPPER" 4:"$L4" 3:"$L3" 2:"$L2" 1:"$L1"; do
        if [ -e "${d#*:}/$1" ] || [ -L "${d#*:}/$1" ]; then
            [ "${d%%:*}" = upper ] && echo "upper" || echo "layer ${d%%:*}"
            return
        fi
    done
}

# A small tree of a directory: mode, size, path; with --origin, where each file comes from.
tree() {
    local line path
    (cd "$1" && find . -mindepth 1 \( -type l -printf '%M %8s  %P -> %l\n' -o -printf '%M %8s  %P\n' \)) \
        | sort -k3 | while IFS= read -r line; do
            path="${line##*  }"
            if [ "${2:-}" = --origin ] && [ "${line:0:1}" != d ]; then
                printf '%-44s <- %s\n' "$line" "$(origin "${path%% -> *}")"
            else
                printf '%s\n' "$line"
            fi
        done | show
}

# Contents and metadata of every entry of every lower layer.
manifest() {
    (cd "$LAYERS" && find . -printf '%y %m %U:%G %s %p -> %l\n' | sort \
        && find . -type f -print0 | sort -z | xargs -0 sha256sum)
}

[ "$KERNEL" = 1 ] || [ -x "$COWFS" ] || fail "$COWFS not found; run 'make demo' (it creates .venv)"
[ "$KERNEL" != 1 ] || [ "$(id -u)" -eq 0 ] || fail "COWFS_DEMO_KERNEL=1 needs root"

echo "cowfs demo: Docker's acme/my-final-image:1.0 as overlay layers, mounted with $ENGINE"

# A fresh scratch area; never delete through a mount an interrupted run left behind.
force_unmount "$DEMO"
[ -z "$(mounts_under "$DEMO")" ] || fail "still mounted under $DEMO"
rm -rf --one-file-system "$DEMO"
mkdir -p "$L1" "$L2" "$L3" "$L4" "$UPPER" "$WORK" "$MNT"

heading "Building the image layers (read-only from now on)"
explain "Each Dockerfile step is one directory; a later layer's file shadows an earlier one."

# FROM alpine: a tiny root filesystem.
mkdir -p "$L1"/{bin,etc,root,tmp,usr/bin,var/log}
cp /bin/dash "$L1/bin/sh"
cat >"$L1/etc/os-release" <<'EOF'
NAME="cowfs demo base"
ID=demo
VERSION_ID=1.0
EOF
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$L1/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$L1/etc/group"
printf '# valid login shells\n/bin/sh\n' >"$L1/etc/shells"
printf 'demo\n' >"$L1/etc/hostname"
printf 'Welcome to the cowfs demo image!\n' >"$L1/etc/motd"
layer_summary 1/4 "$L1" "FROM alpine: a small root filesystem"

# RUN apk add --no-cache bash: adds a file and changes one.
mkdir -p "$L2/bin" "$L2/etc"
cp /bin/bash "$L2/bin/bash"
printf '# valid login shells\n/bin/sh\n/bin/bash\n' >"$L2/etc/shells"
layer_summary 2/4 "$L2" "RUN apk add --no-cache bash: adds bin/bash, changes etc/shells"

# COPY . /app
mkdir -p "$L3/app"
printf '#!/bin/sh\necho "Hello world"\n' >"$L3/app/hello.sh"
chmod 0644 "$L3/app/hello.sh"
layer_summary 3/4 "$L3" "COPY . /app: app/hello.sh, mode 0644"

# RUN chmod +x /app/hello.sh: a metadata change still stores the whole file again.
mkdir -p "$L4/app"
cp -p "$L3/app/hello.sh" "$L4/app/hello.sh"
chmod 0755 "$L4/app/hello.sh"
layer_summary 4/4 "$L4" "RUN chmod +x /app/hello.sh: the whole file again, mode 0755"

manifest >"$DEMO/lower.before"

heading "Mounting: the container's view"
OPTS="lowerdir=$L4:$L3:$L2:$L1,upperdir=$UPPER,workdir=$WORK"
if [ "$KERNEL" = 1 ]; then
    explain "mount -t overlay overlay -o lowerdir=L4:L3:L2:L1,upperdir=...,workdir=... merged"
    mount -t overlay overlay -o "$OPTS" "$MNT"
else
    explain "cowfs mount -o lowerdir=L4:L3:L2:L1,upperdir=...,workdir=... merged   (leftmost is topmost)"
    "$COWFS" mount -o "$OPTS" "$MNT"
fi
mountpoint -q "$MNT" || fail "$MNT is not a mount point after mounting"
grep -F " $MNT " /proc/mounts | awk '{ print $1, "on", $2, "type", $3 }' | show

heading "The merged view"
explain "All four layers as one tree; for each file, the topmost layer that has it wins."
tree "$MNT" --origin

heading "Running /app/hello.sh from the merged view"
explain "It is executable because layer 4 (chmod +x) shadows layer 3's copy."
"$MNT/app/hello.sh" | show
[ "$("$MNT/app/hello.sh")" = "Hello world" ] || fail "app/hello.sh did not print 'Hello world'"

heading "Acting like a container: change, delete, create"
explain "echo /bin/zsh >> etc/shells; sed -i s/1.0/1.1/ etc/os-release; rm etc/motd; echo ... > app/data.txt"
echo /bin/zsh >>"$MNT/etc/shells"
sed -i 's/^VERSION_ID=1.0$/VERSION_ID=1.1/' "$MNT/etc/os-release"
rm "$MNT/etc/motd"
echo "written by the container" >"$MNT/app/data.txt"

heading "The merged view after the changes"
explain "etc/motd is gone; the edited files and app/data.txt now come from the upper directory."
tree "$MNT" --origin
explain "etc/shells now reads:"
show <"$MNT/etc/shells"
[ ! -e "$MNT/etc/motd" ] || fail "etc/motd still visible after rm"
grep -qx /bin/zsh "$MNT/etc/shells" || fail "the edit to etc/shells is not visible"

heading "The upper directory: where every change went"
explain "Copy-up: a changed lower file is copied whole into the upper, then changed there."
explain "Whiteout: a deleted lower file becomes a 0/0 character device that hides it."
(cd "$UPPER" && find . -mindepth 1 | sort | sed 's|^\./||' | xargs ls -ld --time-style=+) | show
[ "$(stat -c '%F %t:%T' "$UPPER/etc/motd")" = "character special file 0:0" ] \
    || fail "no whiteout (char device 0/0) for etc/motd in the upper directory"
[ -f "$UPPER/etc/shells" ] && [ -f "$UPPER/etc/os-release" ] && [ -f "$UPPER/app/data.txt" ] \
    || fail "the upper directory lacks a copied-up or created file"
explain "Copied-up etc/os-release, upper vs layer 1:"
diff "$L1/etc/os-release" "$UPPER/etc/os-release" | show || true

heading "The lower layers are unchanged"
explain "A sha256 manifest of every layer, taken before mounting, compared now."
manifest >"$DEMO/lower.after"
if diff -u "$DEMO/lower.before" "$DEMO/lower.after" >"$DEMO/lower.diff"; then
    explain "identical: $(grep -c . "$DEMO/lower.before") manifest lines, $(find "$LAYERS" -type f | wc -l) files"
else
    show <"$DEMO/lower.diff"
    fail "a lower layer changed"
fi

heading "Unmounting"
if [ "$KERNEL" = 1 ]; then
    explain "umount merged"
else
    explain "cowfs umount merged   (fusermount -u and umount work too)"
fi
unmount "$MNT"
for _ in 1 2 3 4 5 6 7 8 9 10; do
    [ -z "$(mounts_under "$DEMO")" ] && break
    sleep 0.2
done
[ -z "$(mounts_under "$DEMO")" ] || fail "still mounted after unmounting: $(mounts_under "$DEMO")"
explain "no mount left under scratch/demo; the layers and the upper stay for a look: $DEMO"
echo
echo "demo: OK"
