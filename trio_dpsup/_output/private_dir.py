"""Directories the supervisor writes in, trusted the way OpenSSH's ``StrictModes``, logrotate
and tmux's socket directory trust one: the supervisor often runs as root, and a directory
another user owns, or others can write, lets them plant a link or swap a file there.

* `open_private_dir` (``--log-dir``, ``--evidence-dir``) creates the directory when it is
  missing, refuses one that is a symbolic link, is not owned by our user, or can be written
  by others (or by a group other than our own), and returns its descriptor: every later
  open goes through it (``dir_fd``), so a path swapped after the check is never followed.
* `check_socket_dir` (the admin socket, for the supervisor and for ``ctl``) holds the
  socket's directory and each directory above it to the same rule, with root's ownership
  allowed too (it could do anything anyway) and a sticky directory such as ``/tmp`` allowed
  above (others cannot rename what is ours in it). A Unix socket is reached by its path
  alone, so whoever can rename any directory on it can put their socket in ours' place.

Each refusal is a ConfigError whose message names the fix.
"""

from __future__ import annotations

import os
import stat

from .._errors import ConfigError

__all__ = ["check_socket_dir", "open_private_dir", "open_subdir"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_private_dir(path: str, option: str, mode: int) -> int:
    """A descriptor of the directory `path`, created (`mode`) when missing, once it is found
    safe to write in. Raises ConfigError, naming the fix, for a directory that cannot be
    made or opened, a symbolic link, or one that others could plant files in."""
    try:
        os.makedirs(path, mode=mode, exist_ok=True)
    except FileExistsError:
        pass  # a dangling link or a file: the open below says which
    except OSError as exc:
        raise ConfigError(
            f"{option} {path}: cannot create it: {exc.strerror or exc}: choose a directory "
            "this user can create"
        ) from exc
    try:
        fd = os.open(path, _DIR_FLAGS)
    except OSError as exc:
        if os.path.islink(path):
            raise ConfigError(
                f"{option} {path} is a symbolic link: give the directory itself "
                f"({os.path.realpath(path)}), where nobody else can write"
            ) from exc
        raise ConfigError(
            f"{option} {path}: {exc.strerror or exc}: give a directory this user can write in"
        ) from exc
    try:
        _check(os.fstat(fd), path, option, owners=frozenset({os.geteuid()}))
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"{option} {path}: this user cannot write in it: chmod u+wx {path}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_subdir(dir_fd: int, name: str, mode: int, *, exist_ok: bool) -> int:
    """Make the directory `name` (`mode`) under the open directory `dir_fd` and open it,
    never following a link; one already there is kept (with `exist_ok`) only if it is ours
    and others cannot write in it. Raises OSError otherwise."""
    try:
        os.mkdir(name, mode, dir_fd=dir_fd)
    except FileExistsError:
        if not exist_ok:
            raise
    fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    info = os.fstat(fd)
    if info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) & (stat.S_IWGRP | stat.S_IWOTH):
        os.close(fd)
        raise PermissionError(f"{name} is not this user's private directory: not written in")
    return fd


def check_socket_dir(path: str, option: str, also: int | None = None) -> None:
    """Refuse (ConfigError) a socket at `path` whose directory, or any directory above it,
    another user could change: see the module's docstring. Both the path as written and
    the one its links lead to are checked (a link is judged by the directory holding it).
    `also` is one more uid trusted beside ours and root (ctl's --user: the supervisor's)."""
    owners = frozenset({os.geteuid(), 0} | ({also} if also is not None else set()))
    written = os.path.dirname(os.path.abspath(path))
    resolved = os.path.realpath(written)
    for directory in dict.fromkeys([*_upwards(written), *_upwards(resolved)]):
        try:
            info = os.lstat(directory)
        except OSError as exc:
            raise ConfigError(f"{option} {path}: {directory}: {exc.strerror or exc}") from exc
        if stat.S_ISLNK(info.st_mode):
            continue  # its target is on the resolved path
        # Where the socket is made, sticky is no help: another user can plant its name first.
        sticky = bool(info.st_mode & stat.S_ISVTX) and directory != resolved
        what = f"{option} {path}: the directory"
        _check(info, directory, what, owners=owners, allow_sticky=sticky)


def _upwards(directory: str) -> list[str]:
    found = [directory]
    while (parent := os.path.dirname(found[-1])) != found[-1]:
        found.append(parent)
    return found


def _check(
    info: os.stat_result,
    path: str,
    what: str,
    *,
    owners: frozenset[int],
    allow_sticky: bool = False,
) -> None:
    uid, gid = os.geteuid(), os.getegid()
    mode = stat.S_IMODE(info.st_mode)
    if info.st_uid not in owners:
        others = sorted(owners - {uid, 0})
        trusted = "this user" if owners == {uid} else "this user or root"
        if others:
            trusted = f"this user, root or uid {others[0]} (--user)"
        raise ConfigError(
            f"{what} {path} is owned by uid {info.st_uid}, not by {trusted} ({uid}): another "
            f"user could replace its files; give a directory of this user's (chown {uid} "
            f"{path}), or one it can create"
        )
    writable = mode & stat.S_IWOTH or (mode & stat.S_IWGRP and info.st_gid != gid)
    if writable and not allow_sticky:
        raise ConfigError(
            f"{what} {path} is writable by {'others' if mode & stat.S_IWOTH else 'its group'} "
            f"(mode {mode:04o}): they could plant links or FIFOs there; chmod go-w {path}, "
            "or choose a directory of this user's"
        )
