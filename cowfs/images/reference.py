"""Image references (NAME[:TAG][@DIGEST]) checked against Docker's grammar (distribution/reference).

    reference       := name [ ":" tag ] [ "@" digest ]
    name            := [ domain "/" ] path-component ( "/" path-component )*
    domain          := domain-component ( "." domain-component )* [ ":" port-number ]
    domain-component := [a-zA-Z0-9] | [a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]
    path-component  := [a-z0-9]+ ( ( "." | "_" | "__" | "-"+ ) [a-z0-9]+ )*
    tag             := [\\w][\\w.-]{0,127}
    digest          := "sha256:" 64 lowercase hex digits (the one algorithm cowfs knows)

The first component is a registry host only when the name has a "/" after
it and it holds a "." or a ":" or is "localhost" (or has capitals), as
Docker decides; a whole name is at most 255 characters. `check_reference`
says what is wrong in one line; `check_tag_reference` is for naming an
image (import --name, commit --tag), where Docker refuses a digest.
"""

import re

from cowfs.errors import CowfsError

PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*")
DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
DOMAIN = re.compile(rf"(?:{DOMAIN_COMPONENT}(?:\.{DOMAIN_COMPONENT})*|\[[0-9A-Fa-f:.]+\])(?::[0-9]+)?")
TAG = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
NAME_MAX = 255
DEFAULT_DOMAINS = ("docker.io", "index.docker.io")  # Docker Hub's names: the default registry
OFFICIAL = "library/"  # the namespace of Docker Hub's official images, left out when shown


class BadReference(CowfsError):
    """A reference Docker would refuse; str() says which and why, in one line."""

    def __init__(self, ref, reason):
        self.ref, self.reason = ref, reason
        super().__init__(f"invalid reference {ref!r}: {reason}")


def _split(ref):
    """(name, tag or None, digest or None): the tag is after the last ':' that follows the last '/'."""
    name, at, digest = ref.partition("@")
    digest = digest if at else None
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        return name[:colon], name[colon + 1:], digest
    return name, None, digest


def _is_domain(first):
    return "." in first or ":" in first or first == "localhost" or first.lower() != first or first.startswith("[")


def check_reference(ref):
    """`ref` if Docker accepts it as an image reference; else BadReference saying what is wrong."""
    if not isinstance(ref, str) or not ref:
        raise BadReference(ref if isinstance(ref, str) else str(ref), "empty name")
    name, tag, digest = _split(ref)
    if digest is not None and not DIGEST.fullmatch(digest):
        raise BadReference(ref, f"digest {digest!r} is not sha256:<64 lowercase hex digits>")
    if tag is not None and not TAG.fullmatch(tag):
        if not tag:
            raise BadReference(ref, "empty tag after ':'")
        raise BadReference(ref, f"tag {tag!r} must be 1 to 128 letters, digits, '_', '.' or '-', "
                             "and not start with '.' or '-'")
    if not name:
        raise BadReference(ref, "empty name")
    if len(name) > NAME_MAX:
        raise BadReference(ref, f"name is {len(name)} characters long (at most {NAME_MAX})")
    parts = name.split("/")
    if len(parts) > 1 and _is_domain(parts[0]):
        if not DOMAIN.fullmatch(parts[0]):
            raise BadReference(ref, f"registry {parts[0]!r} is not a host name or address with an optional :port")
        parts = parts[1:]
    for part in parts:
        if not part:
            raise BadReference(ref, "empty path component (a '/' at either end, or '//')")
        if not PATH_COMPONENT.fullmatch(part):
            if PATH_COMPONENT.fullmatch(part.lower()):
                raise BadReference(ref, f"name component {part!r} must be lowercase")
            raise BadReference(ref, f"name component {part!r} may only hold lowercase letters and digits, "
                                 "separated by '.', '_', '__' or '-'")
    return ref


def check_tag_reference(ref):
    """`ref` if it can name an image (a valid reference without a digest); else BadReference."""
    check_reference(ref)
    if "@" in ref:
        raise BadReference(ref, "a digest cannot name an image (give NAME[:TAG])")
    return ref


def normalise_ref(ref):
    """A reference as Docker shows it (its "familiar" form), ":latest" added when it has no tag nor digest:
    "alpine", "library/alpine", "docker.io/library/alpine" and "index.docker.io/alpine" are all
    "alpine:latest"; "docker.io/acme/app:1" is "acme/app:1". A registry port ("host:5000/name") is no tag."""
    name, tag, digest = _split(ref)
    for domain in DEFAULT_DOMAINS:
        if name.startswith(domain + "/"):
            name = name[len(domain) + 1:]
            if "/" not in name:
                name = OFFICIAL + name
            break
    if name.startswith(OFFICIAL) and name.count("/") == 1:
        name = name[len(OFFICIAL):]
    if tag is None and digest is None:
        tag = "latest"
    return name + (f":{tag}" if tag is not None else "") + (f"@{digest}" if digest is not None else "")


__all__ = ["BadReference", "check_reference", "check_tag_reference", "normalise_ref"]
