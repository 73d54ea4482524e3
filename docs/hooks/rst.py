"""A griffe extension for the API reference: the library's docstrings are reST-flavoured plain text; this turns the
few reST constructs they use into Markdown before mkdocstrings renders them (``docs/api.md``).

* roles ``:func:`x``` / ``:class:`~a.b``` ... -> the code span `` `x` `` / `` `b` ``;
* a paragraph ending in ``::`` -> ``:`` (the indented block after it is already a Markdown code block);
* ``====  ====`` simple tables -> a fenced text block, shown as written (Markdown would read ``===`` as a heading).
"""

from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:func|class|mod|data|meth|attr|exc|obj|ref|py:\w+):`~?([^`]+)`")


def _role(match: re.Match) -> str:
    target = match.group(1)
    if match.group(0).split("`", 1)[1].startswith("~"):
        target = target.rsplit(".", 1)[-1]
    return f"``{target}``"


def to_markdown(text: str) -> str:
    text = _ROLE.sub(_role, text)
    lines, out, k = text.splitlines(), [], 0
    while k < len(lines):
        line = lines[k]
        if re.fullmatch(r"\s*=+(\s+=+)+\s*", line):  # a simple table: up to its third rule line
            rules, block = 0, []
            while k < len(lines):
                block.append(lines[k])
                rules += bool(re.fullmatch(r"\s*=+(\s+=+)+\s*", lines[k]))
                k += 1
                if rules == 3:
                    break
            out += ["```text", *block, "```"]
            continue
        out.append(line[:-1] if line.endswith("::") and not line.strip() == "::" else line)
        k += 1
    return "\n".join(out)


class RestToMarkdown(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:  # every module, class, function, attribute
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value)
