"""A small Dockerfile parser (the instructions this project's Dockerfile uses) and ``.dockerignore`` matching.

    df = Dockerfile.from_file(Path("Dockerfile"))
    df.base_image                          # "python:3.11-slim-bookworm"
    df.state().env                         # {"HOME": "/home/user", ...} after every ENV, expanded
    [i.commands for i in df.of("RUN")]     # each RUN split on its top-level ``&&``

What it reads: FROM, ARG, ENV, LABEL, WORKDIR, COPY, ADD, RUN, USER, EXPOSE, HEALTHCHECK, CMD and
ENTRYPOINT; comments and blank lines, also inside line continuations (a trailing ``\\``); shell and
JSON (exec) forms; leading ``--name=value`` options (``COPY --chown=…``, ``HEALTHCHECK --interval=…``);
``$VAR``, ``${VAR}``, ``${VAR:-default}`` and ``${VAR:+alt}`` in the instructions where Docker
substitutes them (not in RUN, CMD or HEALTHCHECK: their shell does). What it refuses
(:class:`DockerfileError`): heredocs, an escape character other than ``\\``, a second FROM
(multi-stage builds) and ONBUILD: none of them is needed here, and a silent misreading would make
the replay (``deploy/replay.py``) prove the wrong thing.

:class:`DockerIgnore` applies ``.dockerignore`` as Docker does: Go ``filepath.Match`` patterns
(``*`` and ``?`` stop at ``/``; ``**`` crosses folders), a pattern also excludes everything under a
matching folder, ``!pattern`` re-includes, and the last matching line wins.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

KEYWORDS = frozenset(
    {"FROM", "ARG", "ENV", "LABEL", "WORKDIR", "COPY", "ADD", "RUN", "USER", "EXPOSE", "HEALTHCHECK", "CMD",
     "ENTRYPOINT", "STOPSIGNAL", "VOLUME", "SHELL"}
)
_CONTINUATION = re.compile(r"\\[ \t]*$")
_VAR = re.compile(
    r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:[-+])(?P<word>[^}]*))?\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))"
)
_HEREDOC = re.compile(r"<<-?\s*[\"']?[A-Za-z_]")
_FLAG = re.compile(r"--(?P<name>[a-z][a-z0-9-]*)(?:=(?P<value>\S*))?")


class DockerfileError(ValueError):
    """A Dockerfile this parser cannot read faithfully (the message names the line)."""


# ---------------------------------------------------------------------------------------------
# Words: Docker's shell-like lexing of ENV / ARG / COPY / … arguments


def _dollar(text: str, i: int, variables: dict[str, str] | None) -> tuple[str, int]:
    if variables is None:
        return "$", i + 1
    m = _VAR.match(text, i)
    if not m:
        return "$", i + 1
    value = variables.get(m["braced"] or m["plain"], "")
    if m["op"] == ":-":
        value = value or m["word"]
    elif m["op"] == ":+":
        value = m["word"] if value else ""
    return value, m.end()


def words(text: str, variables: dict[str, str] | None = None) -> list[str]:
    """Split ``text`` into words as Docker does for ENV, ARG, COPY…: quotes removed, backslash escapes,
    ``$VAR`` expanded from ``variables`` (none when ``None``) except inside single quotes."""
    out: list[str] = []
    cur: list[str] = []
    have = False
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            if have:
                out.append("".join(cur))
                cur, have = [], False
            i += 1
            continue
        have = True
        if c == "'":
            j = text.find("'", i + 1)
            if j < 0:
                raise DockerfileError(f"unterminated single quote in {text!r}")
            cur.append(text[i + 1 : j])
            i = j + 1
        elif c == '"':
            i += 1
            while i < n and text[i] != '"':
                if text[i] == "\\" and i + 1 < n and text[i + 1] in '"\\$':
                    cur.append(text[i + 1])
                    i += 2
                elif text[i] == "$":
                    s, i = _dollar(text, i, variables)
                    cur.append(s)
                else:
                    cur.append(text[i])
                    i += 1
            if i >= n:
                raise DockerfileError(f"unterminated double quote in {text!r}")
            i += 1
        elif c == "\\" and i + 1 < n:
            cur.append(text[i + 1])
            i += 2
        elif c == "$":
            s, i = _dollar(text, i, variables)
            cur.append(s)
        else:
            cur.append(c)
            i += 1
    if have:
        out.append("".join(cur))
    return out


def split_commands(shell: str) -> list[str]:
    """A shell command line split on its top-level ``&&`` (not inside quotes), each part stripped."""
    parts, cur, i, quote = [], [], 0, None
    while i < len(shell):
        c = shell[i]
        if quote:
            cur.append(c)
            if c == "\\" and quote == '"' and i + 1 < len(shell):
                cur.append(shell[i + 1])
                i += 1
            elif c == quote:
                quote = None
        elif c in "'\"":
            quote = c
            cur.append(c)
        elif c == "\\" and i + 1 < len(shell):
            cur.append(shell[i : i + 2])
            i += 1
        elif shell.startswith("&&", i):
            parts.append("".join(cur).strip())
            cur = []
            i += 1
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur).strip())
    return [p for p in parts if p]


# ---------------------------------------------------------------------------------------------
# Instructions


@dataclass(frozen=True)
class Instruction:
    """One instruction: ``keyword`` upper-cased, ``value`` its argument text after any leading
    ``--name=value`` options (``flags``), continuation lines joined; ``exec_form`` the JSON array when
    the argument is one (RUN, CMD, ENTRYPOINT, HEALTHCHECK's CMD, COPY); ``line`` where it starts (1-based)."""

    keyword: str
    value: str
    line: int
    flags: dict[str, str] = field(default_factory=dict)
    exec_form: tuple[str, ...] | None = None

    @property
    def shell(self) -> str:
        """The command as one shell line (an exec form is quoted back together)."""
        return shlex.join(self.exec_form) if self.exec_form is not None else self.value

    @property
    def commands(self) -> list[str]:
        """The shell line split on its top-level ``&&``."""
        return split_commands(self.shell)

    def argv(self) -> list[str]:
        """What Docker executes: the exec form as is, a shell form as ``/bin/sh -c VALUE``."""
        return list(self.exec_form) if self.exec_form is not None else ["/bin/sh", "-c", self.value]


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """(first line number, instruction text) with continuations joined and comment lines dropped."""
    buf: list[str] = []
    start = 0
    directives = True
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if directives and stripped.startswith("#"):
            m = re.match(r"#\s*(\w+)\s*=\s*(\S+)", stripped)
            if m and m[1].lower() == "escape" and m[2] != "\\":
                raise DockerfileError(f"line {number}: only the default escape character \\ is supported")
        if stripped and not stripped.startswith("#"):
            directives = False
        if stripped.startswith("#") or (not stripped and buf):
            continue  # comment lines vanish, even inside a continuation; so do blank ones there
        if not stripped:
            continue
        if not buf:
            start = number
        if _CONTINUATION.search(raw):
            buf.append(_CONTINUATION.sub("", raw))
            continue
        buf.append(raw)
        yield start, "".join(buf).strip()
        buf = []
    if buf:
        yield start, "".join(buf).strip()


def _take_flags(rest: str) -> tuple[dict[str, str], str]:
    flags: dict[str, str] = {}
    while True:
        m = _FLAG.match(rest)
        if not m or (m.end() < len(rest) and not rest[m.end()].isspace()):
            return flags, rest
        flags[m["name"]] = m["value"] if m["value"] is not None else "true"
        rest = rest[m.end() :].lstrip()


def _json_array(text: str) -> tuple[str, ...] | None:
    if not text.startswith("["):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None  # Docker too falls back to the shell form
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    return None


def parse_instructions(text: str) -> list[Instruction]:
    """Every instruction of a Dockerfile's ``text``, in order."""
    out: list[Instruction] = []
    for line, body in _logical_lines(text):
        keyword, *tail = body.split(None, 1)
        keyword, rest = keyword.upper(), (tail[0].strip() if tail else "")
        if keyword not in KEYWORDS:
            raise DockerfileError(f"line {line}: unknown or unsupported instruction {keyword!r}")
        if keyword in ("RUN", "COPY", "ADD") and _HEREDOC.search(rest):
            raise DockerfileError(f"line {line}: heredocs are not supported")
        flags: dict[str, str] = {}
        if keyword in ("FROM", "RUN", "COPY", "ADD", "HEALTHCHECK"):
            flags, rest = _take_flags(rest)
        exec_form = None
        if keyword == "HEALTHCHECK":
            kind, *cmd_tail = rest.split(None, 1) or [""]
            cmd = cmd_tail[0] if cmd_tail else ""
            if kind.upper() == "NONE":
                rest = "NONE"
            elif kind.upper() == "CMD":
                rest = cmd.strip()
                exec_form = _json_array(rest)
            else:
                raise DockerfileError(f"line {line}: HEALTHCHECK needs CMD or NONE")
        elif keyword in ("RUN", "CMD", "ENTRYPOINT", "COPY", "ADD", "SHELL", "VOLUME"):
            exec_form = _json_array(rest)
        out.append(Instruction(keyword, rest, line, flags, exec_form))
    froms = [i for i in out if i.keyword == "FROM"]
    if len(froms) != 1:
        raise DockerfileError(f"expected exactly one FROM (single-stage build), found {len(froms)}")
    return out


# ---------------------------------------------------------------------------------------------
# The build's state along the instructions


@dataclass
class State:
    """What is in effect after an instruction: ARG values, ENV values, WORKDIR, USER, EXPOSEd ports."""

    args: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    user: str = "root"
    expose: list[int] = field(default_factory=list)

    @property
    def variables(self) -> dict[str, str]:
        """What ``$VAR`` expands from: ARG values, overridden by ENV values (as in Docker)."""
        return {**self.args, **self.env}

    def copy(self) -> State:
        return State(dict(self.args), dict(self.env), self.workdir, self.user, list(self.expose))


@dataclass(frozen=True)
class Copy:
    """A COPY / ADD: ``sources`` (relative to the build context) to ``dest`` (absolute, in the image)."""

    sources: tuple[str, ...]
    dest: str
    dest_is_dir: bool
    chown: str | None


def _env_pairs(value: str, variables: dict[str, str], line: int) -> list[tuple[str, str]]:
    items = words(value, variables)
    if not items:
        raise DockerfileError(f"line {line}: ENV needs a value")
    if "=" not in items[0]:  # legacy ``ENV KEY value with spaces``
        key, _, rest = value.partition(" ")
        return [(key, " ".join(words(rest, variables)))]
    pairs = []
    for item in items:
        key, eq, val = item.partition("=")
        if not eq:
            raise DockerfileError(f"line {line}: ENV {item!r} is not KEY=VALUE")
        pairs.append((key, val))
    return pairs


@dataclass
class Dockerfile:
    instructions: list[Instruction]
    path: Path | None = None

    @classmethod
    def parse(cls, text: str, path: Path | None = None) -> Dockerfile:
        return cls(parse_instructions(text), path)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Dockerfile:
        path = Path(path)
        return cls.parse(path.read_text(), path)

    def of(self, *keywords: str) -> list[Instruction]:
        """The instructions with one of these keywords, in order."""
        wanted = {k.upper() for k in keywords}
        return [i for i in self.instructions if i.keyword in wanted]

    def last(self, keyword: str) -> Instruction | None:
        found = self.of(keyword)
        return found[-1] if found else None

    def walk(self, build_args: dict[str, str] | None = None) -> Iterator[tuple[Instruction, State]]:
        """Each instruction with the state in effect once it has run (for RUN / COPY: the state they run in).

        ``build_args`` override ARG defaults as ``docker build --build-arg`` does.
        """
        build_args = dict(build_args or {})
        state = State()
        for ins in self.instructions:
            variables = state.variables
            if ins.keyword == "ARG":
                for item in words(ins.value, variables):
                    name, eq, default = item.partition("=")
                    state.args[name] = build_args.get(name, default if eq else "")
            elif ins.keyword == "ENV":
                state.env.update(_env_pairs(ins.value, variables, ins.line))
            elif ins.keyword == "WORKDIR":
                target = " ".join(words(ins.value, variables))
                state.workdir = posixpath.normpath(posixpath.join(state.workdir, target))
            elif ins.keyword == "USER":
                state.user = " ".join(words(ins.value, variables))
            elif ins.keyword == "EXPOSE":
                for port in words(ins.value, variables):
                    state.expose.append(int(port.split("/")[0]))
            yield ins, state.copy()

    def state(self, build_args: dict[str, str] | None = None) -> State:
        """The state after the last instruction (the container's environment, WORKDIR, USER, ports)."""
        states = [state for _, state in self.walk(build_args)]
        return states[-1] if states else State()

    def copy_of(self, ins: Instruction, state: State) -> Copy:
        """The sources and absolute destination of a COPY / ADD run in ``state``."""
        if ins.keyword not in ("COPY", "ADD"):
            raise ValueError(f"line {ins.line}: {ins.keyword} is not a COPY")
        if "from" in ins.flags:
            raise DockerfileError(f"line {ins.line}: COPY --from (multi-stage) is not supported")
        items = list(ins.exec_form) if ins.exec_form is not None else words(ins.value, state.variables)
        if len(items) < 2:
            raise DockerfileError(f"line {ins.line}: COPY needs a source and a destination")
        *sources, dest = items
        dest_is_dir = dest.endswith("/") or dest in (".", "..") or len(sources) > 1 or dest.endswith("/.")
        absolute = posixpath.normpath(posixpath.join(state.workdir, dest))
        return Copy(tuple(sources), absolute, dest_is_dir, ins.flags.get("chown"))

    @property
    def base_image(self) -> str:
        """FROM's image (``AS name`` dropped), ``$VAR`` expanded from the ARGs declared before it."""
        args: dict[str, str] = {}
        for ins in self.instructions:
            if ins.keyword == "ARG":
                for item in words(ins.value, args):
                    name, _, default = item.partition("=")
                    args[name] = default
            if ins.keyword == "FROM":
                return words(ins.value, args)[0]
        raise DockerfileError("no FROM")  # pragma: no cover (parse_instructions checks)

    @property
    def healthcheck(self) -> Instruction | None:
        return self.last("HEALTHCHECK")

    @property
    def cmd(self) -> Instruction | None:
        return self.last("CMD")


# ---------------------------------------------------------------------------------------------
# .dockerignore


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Go ``filepath.Match`` with Docker's ``**``, as a full-match regex."""
    out, i, n = [], 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            if pattern.startswith("**", i):
                i += 2
                if i < n and pattern[i] == "/":
                    i += 1
                out.append(".*" if i >= n else "(?:.*/)?")
                continue
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = pattern.find("]", i + 1)
            if j < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : j]
                out.append("[" + ("^" + body[1:] if body[:1] in ("^", "!") else body) + "]")
                i = j
        elif c == "\\" and i + 1 < n:
            out.append(re.escape(pattern[i + 1]))
            i += 1
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out))


@dataclass(frozen=True)
class _Rule:
    pattern: str
    exclusion: bool  # True for ``!pattern`` (re-include)
    regex: re.Pattern[str]


class DockerIgnore:
    """The rules of a ``.dockerignore`` (see the module's docstring for the semantics)."""

    def __init__(self, lines: list[str] | tuple[str, ...] = ()):
        self.rules: list[_Rule] = []
        for raw in lines:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            exclusion = line.startswith("!")
            if exclusion:
                line = line[1:].strip()
            pattern = posixpath.normpath(line).lstrip("/")
            if pattern in ("", "."):
                continue
            self.rules.append(_Rule(pattern, exclusion, _pattern_regex(pattern)))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> DockerIgnore:
        """The rules of ``path``; none when the file does not exist."""
        path = Path(path)
        return cls(path.read_text().splitlines() if path.is_file() else [])

    def excluded(self, relpath: str) -> bool:
        """Whether the context path ``relpath`` (``/``-separated, relative) is left out of the build."""
        relpath = posixpath.normpath(relpath).lstrip("/")
        parts = relpath.split("/")
        candidates = ["/".join(parts[: k + 1]) for k in range(len(parts))]
        matched = False
        for rule in self.rules:
            if any(rule.regex.fullmatch(c) for c in candidates):
                matched = not rule.exclusion
        return matched

    def _may_reinclude_under(self, reldir: str) -> bool:
        prefix = reldir + "/"
        for rule in self.rules:
            if rule.exclusion and (rule.pattern.startswith(prefix) or any(ch in rule.pattern for ch in "*?[")):
                return True
        return False

    def files(self, root: str | os.PathLike) -> list[str]:
        """Every file of the build context ``root`` that a COPY can see: relative ``/`` paths, sorted."""
        root = Path(root)
        out: list[str] = []
        for dirpath, dirnames, filenames in os.walk(root):
            rel = Path(dirpath).relative_to(root).as_posix()
            rel = "" if rel == "." else rel + "/"
            keep = []
            for d in sorted(dirnames):
                sub = rel + d
                if (root / sub).is_symlink():
                    if not self.excluded(sub):
                        out.append(sub)  # a link to a folder is copied as the link
                    continue
                if not self.excluded(sub) or self._may_reinclude_under(sub):
                    keep.append(d)
            dirnames[:] = keep
            out.extend(rel + f for f in filenames if not self.excluded(rel + f))
        return sorted(out)
