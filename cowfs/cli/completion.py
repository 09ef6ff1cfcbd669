"""Shell completion: `cowfs completion bash|zsh` prints a script made from the parser; `cowfs __complete WHAT`
answers it at run time (images and containers of the store, live cowfs mounts).

The script is generated from the argparse parser (`build_parser()`), so a new
command or option completes without touching this module. What an argument
completes to comes from its metavar (`KINDS`): directories for DIR, LOWER,
MOUNTPOINT|UPPERDIR ...; files for FILE, ARCHIVE, PATH; the store's image
names for IMAGE; container IDs for CONTAINER; live mounts for MOUNTPOINT;
choices as words. `__complete` is cheap: it reads the store's
repositories.json, its containers/ directory, or /proc/self/mounts, nothing more.
"""

import argparse
import json
import os
import shlex
import sys

# metavar -> what it completes to (dir, file, image, container, mount, or several, space-separated)
KINDS = {
    "DIR": "dir", "UPPERDIR": "dir", "MOUNTPOINT|UPPERDIR": "dir", "LOWER": "dir", "LAYER": "dir",
    "LOWER... MOUNTPOINT": "dir image", "FILE": "file", "ARCHIVE": "file", "PATH": "file", "OUT.tar": "file",
    "IMAGE": "image", "NAME:TAG": "image", "CONTAINER": "container", "MOUNTPOINT": "mount dir",
}
# Layer options of -o values (lowerdir=A:B ...) complete directories after the '='.
MOUNT_OPTION_WORDS = ("lowerdir=", "upperdir=", "workdir=", "redirect_dir=on", "redirect_dir=off", "metacopy=on",
                      "verity=on", "verity=require", "userxattr", "oci_whiteouts", "volatile", "ro", "allow_other",
                      "trace=")


def _kind(action):
    """What the argument completes to, as the arguments of the script's _cowfs_reply."""
    if action.choices:
        return shlex.quote("words " + " ".join(str(c) for c in action.choices))
    if action.metavar == "OPTIONS":
        return "mountopts"
    return KINDS.get(action.metavar, "none")


def describe(parser):
    """{command: (options, {option: kind}, [positional kind, ...], last positional repeats)} of the parser."""
    sub = parser.commands_action
    commands = {}
    for name, p in sub.choices.items():
        options, valued, positionals, repeats = [], {}, [], False
        for action in p._actions:
            if action.help == argparse.SUPPRESS:
                continue
            if action.option_strings:
                options += action.option_strings
                if action.nargs != 0:
                    for opt in action.option_strings:
                        valued[opt] = _kind(action)
            else:
                positionals.append(_kind(action))
                repeats = action.nargs in ("+", "*", argparse.REMAINDER)
        commands[name] = (options, valued, positionals, repeats)
    return commands


BASH_HEAD = r'''# bash completion for cowfs: source <(cowfs completion bash), or save as /etc/bash_completion.d/cowfs
_cowfs_reply() {  # _cowfs_reply KIND...: add the candidates for the word being completed to COMPREPLY
    local kind prog="${COMP_WORDS[0]}"
    for kind in "$@"; do
        case $kind in
            dir) compopt -o filenames 2>/dev/null; COMPREPLY+=($(compgen -d -- "$cur"));;
            file) compopt -o filenames 2>/dev/null; COMPREPLY+=($(compgen -f -- "$cur"));;
            image|container|mount)
                local -a found
                found=($("$prog" __complete "${kind}s" "${_cowfs_store[@]}" 2>/dev/null))
                local w
                for w in "${found[@]}"; do
                    [[ $w == "$lcur"* ]] && COMPREPLY+=("${w#"$lprefix"}")
                done;;
            mountopts)
                if [[ $lcur == *=* ]]; then
                    [[ $cur == [=:,]* ]] || { compopt -o filenames 2>/dev/null; COMPREPLY+=($(compgen -d -- "$cur")); }
                else
                    compopt -o nospace 2>/dev/null
                    COMPREPLY+=($(IFS=$' \t\n'; compgen -W "__MOUNTOPTS__" -- "$cur"))
                fi;;
            words\ *) COMPREPLY+=($(IFS=$' \t\n'; compgen -W "${kind#words }" -- "$cur"));;
        esac
    done
}

_cowfs() {
    COMPREPLY=()
    local IFS=$'\n'  # candidates are split at newlines only (a path may hold a space)
    local cur="${COMP_WORDS[COMP_CWORD]}"
    # bash splits words at = and : (COMP_WORDBREAKS): join them back into the words typed (NAME:TAG, key=value)
    local -a W=()
    local i tok join=0 lcur=""
    for ((i = 0; i <= COMP_CWORD && i < ${#COMP_WORDS[@]}; i++)); do
        tok="${COMP_WORDS[i]}"
        if ((i > 0 && ${#W[@]} > 0)) && [[ -n $tok && -z ${tok//[=:]/} ]]; then
            W[${#W[@]}-1]+="$tok"; join=1
        elif ((join)); then
            W[${#W[@]}-1]+="$tok"; join=0
        else
            W+=("$tok")
        fi
    done
    ((COMP_CWORD >= ${#COMP_WORDS[@]})) && W+=("")
    lcur="${W[${#W[@]}-1]}"
    [[ $cur == "$lcur" || $lcur == *"$cur" ]] || cur="$lcur"
    local lprefix="${lcur:0:${#lcur}-${#cur}}"
    [[ -n $cur && -z ${cur//[=:]/} ]] && cur=""
    local n=$((${#W[@]} - 1)) prev="" cmd="" c=1
    ((n > 0)) && prev="${W[n-1]}"
    while ((c < n)); do
        case "${W[c]}" in
            --debug) ;;
            -*) ;;
            *) cmd="${W[c]}"; break;;
        esac
        ((c++))
    done
    if [[ -z $cmd ]]; then
        COMPREPLY=($(IFS=$' \t\n'; compgen -W "__COMMANDS__ --help --version --debug" -- "$cur"))
        return 0
    fi
    local -a _cowfs_store=()
    for ((i = c + 1; i < n; i++)); do
        [[ ${W[i]} == --store ]] && _cowfs_store=(--store "${W[i+1]}")
        [[ ${W[i]} == --store=* ]] && _cowfs_store=(--store "${W[i]#--store=}")
    done
    local opts="" valued=""
    case $cmd in
__OPTIONS__
    esac
    if [[ $prev == -* && " $valued " == *" ${prev%%=*} "* && $prev != *=* ]]; then
        case "$cmd $prev" in
__VALUES__
        esac
        return 0
    fi
    if [[ $lcur == -* ]]; then
        if [[ $lcur == --*=* ]]; then  # --option=value
            return 0
        fi
        COMPREPLY=($(IFS=$' \t\n'; compgen -W "$opts" -- "$cur"))
        return 0
    fi
    local p=0 j
    for ((j = c + 1; j < n; j++)); do
        if [[ ${W[j]} == -* ]]; then
            [[ ${W[j]} != *=* && " $valued " == *" ${W[j]} "* ]] && ((j++))
        else
            ((p++))
        fi
    done
    case "$cmd" in
__POSITIONALS__
    esac
    return 0
}
'''

BASH_TAIL = "complete -F _cowfs cowfs\n"

ZSH_HEAD = """#compdef cowfs
# zsh completion for cowfs, through bash's (bashcompinit): `source <(cowfs completion zsh)` in ~/.zshrc
(( $+functions[compdef] )) || { autoload -U +X compinit && compinit; }
autoload -U +X bashcompinit && bashcompinit
"""


def bash_script(parser):
    commands = describe(parser)
    option_cases, value_cases, positional_cases = [], [], []
    for name, (options, valued, positionals, repeats) in commands.items():
        option_cases.append(f"        {shlex.quote(name)}) opts={shlex.quote(' '.join(options))}; "
                            f"valued={shlex.quote(' '.join(valued))};;")
        for opt, kind in valued.items():
            value_cases.append(f"            {shlex.quote(name + ' ' + opt)}) _cowfs_reply {kind};;")
        if positionals:
            arms = [f"                {i}) _cowfs_reply {kind};;" for i, kind in enumerate(positionals)]
            last = f"_cowfs_reply {positionals[-1]}" if repeats else ":"
            positional_cases.append(f"        {shlex.quote(name)})\n            case $p in\n" + "\n".join(arms)
                                    + f"\n                *) {last};;\n            esac;;")
    script = (BASH_HEAD.replace("__COMMANDS__", " ".join(commands))
              .replace("__MOUNTOPTS__", " ".join(MOUNT_OPTION_WORDS))
              .replace("__OPTIONS__", "\n".join(option_cases))
              .replace("__VALUES__", "\n".join(value_cases) or "            *) ;;")
              .replace("__POSITIONALS__", "\n".join(positional_cases) or "        *) ;;"))
    return script + BASH_TAIL


def script(parser, shell):
    """The completion script for `shell` (bash or zsh)."""
    if shell == "zsh":
        return ZSH_HEAD + bash_script(parser)
    return bash_script(parser)


# -- `cowfs __complete WHAT [--store DIR]` -------------------------------------------------------------

def complete(argv):
    """Print the candidates for the completion script, one a line; never an error (exit 0, nothing)."""
    what = argv[0] if argv else ""
    store = None
    if "--store" in argv[1:]:
        i = argv.index("--store", 1)
        store = argv[i + 1] if i + 1 < len(argv) else None
    try:
        found = {"images": _images, "containers": _containers, "mounts": _mounts}.get(what, lambda s: [])(store)
    except (OSError, ValueError, KeyError, TypeError):
        found = []
    for word in found:
        sys.stdout.write(word + "\n")
    sys.stdout.flush()
    return 0


def _store_root(store):
    from cowfs.images.store import default_store
    return os.path.expanduser(store) if store else default_store()


def _images(store):
    """The image names of the store (NAME:TAG), from its index alone."""
    with open(os.path.join(_store_root(store), "repositories.json")) as f:
        return sorted(json.load(f))


def _containers(store):
    root = os.path.join(_store_root(store), "containers")
    return sorted(name[:12] for name in os.listdir(root)) if os.path.isdir(root) else []


def _mounts(store):
    from cowfs import mounttable
    return [m.mountpoint for m in mounttable.read() if m.fstype == "fuse.cowfs"]
