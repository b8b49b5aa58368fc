"""The README and docs/ against the code: the command synopsis, the README's length, links.

The synopsis is the fenced block under the README's "## Commands" heading: one line per
command, ``slimsearch SUB [SUB2] ARGS...``, where an indented line continues the one above,
and ``[...]`` marks what is optional. It is checked against the real argument parser, read
when the test runs, so a flag added to the parser without a README line fails here.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 250
FLAG = re.compile(r"--[A-Za-z0-9][A-Za-z0-9-]*")
SUBCOMMAND = re.compile(r"[a-z][a-z0-9-]*")  # positional placeholders are upper case (JOB, CSV)
# [text](target) and ![alt](target); the target ends at whitespace or ')'.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _parser_commands() -> dict[tuple[str, ...], dict[str, bool]]:
    """Each leaf command of ``slimsearch`` (``("hw", "profile")``) -> its long flags -> required.

    A flag of a parser with subcommands (``hw``) belongs to each of its leaves.
    """
    from slimsearch.cli import _parser

    commands: dict[tuple[str, ...], dict[str, bool]] = {}

    def walk(parser: argparse.ArgumentParser, path: tuple[str, ...], inherited: dict[str, bool]) -> None:
        flags = dict(inherited)
        subparsers = []
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if isinstance(action, argparse._SubParsersAction):
                subparsers.append(action)
                continue
            for option in action.option_strings:
                if option.startswith("--"):
                    flags[option] = bool(action.required)
        if not subparsers:
            commands[path] = flags
        for action in subparsers:
            for name, sub in action.choices.items():
                walk(sub, path + (name,), flags)

    root = _parser()
    top = [a for a in root._actions if isinstance(a, argparse._SubParsersAction)]
    assert top, "slimsearch's parser has no subcommands"
    assert top[0] is root._subparsers._group_actions[0]
    walk(root, (), {})
    return commands


def _synopsis_lines(text: str) -> list[str]:
    """The command lines of the first fenced block after the README's '## Commands' heading,
    continuation lines joined to the line they continue."""
    lines = text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "## Commands")
    except StopIteration:
        pytest.fail("README.md has no '## Commands' section")
    fence = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("```")), None)
    assert fence is not None, "README.md's Commands section has no fenced synopsis block"
    end = next((i for i in range(fence + 1, len(lines)) if lines[i].startswith("```")), None)
    assert end is not None, "README.md's synopsis block is not closed"
    commands: list[str] = []
    for line in lines[fence + 1:end]:
        if not line.strip():
            continue
        if line[0].isspace():
            assert commands, f"README.md synopsis: a continuation line comes first: {line!r}"
            commands[-1] += " " + line.strip()
        else:
            assert line.startswith("slimsearch "), f"README.md synopsis: a line not starting 'slimsearch ': {line!r}"
            commands.append(line)
    return commands


def _readme_commands() -> dict[tuple[str, ...], dict[str, int]]:
    """Each synopsis line's command path -> its flags -> bracket depth where the flag stands."""
    out: dict[tuple[str, ...], dict[str, int]] = {}
    for line in _synopsis_lines(README.read_text(encoding="utf-8")):
        words = line.split()[1:]
        path: list[str] = []
        for word in words:
            if not SUBCOMMAND.fullmatch(word):
                break
            path.append(word)
        assert path, f"README.md synopsis: no subcommand in {line!r}"
        key = tuple(path)
        assert key not in out, f"README.md synopsis: 'slimsearch {' '.join(key)}' has two lines"
        depth, flags = 0, {}
        for token in re.finditer(r"\[|\]|--[A-Za-z0-9][A-Za-z0-9-]*", line):
            if token.group() == "[":
                depth += 1
            elif token.group() == "]":
                depth -= 1
                assert depth >= 0, f"README.md synopsis: unbalanced ']' in {line!r}"
            else:
                flags[token.group()] = depth
        assert depth == 0, f"README.md synopsis: unbalanced '[' in {line!r}"
        out[key] = flags
    return out


def test_readme_synopsis_lists_every_command_and_flag_of_the_parser():
    parser = _parser_commands()
    readme = _readme_commands()
    name = lambda path: "slimsearch " + " ".join(path)  # noqa: E731
    missing_commands = sorted(name(p) for p in parser if p not in readme)
    assert not missing_commands, f"commands missing from README.md's synopsis: {missing_commands}"
    missing_flags = sorted(f"{name(p)} {f}" for p, flags in parser.items() for f in flags if f not in readme[p])
    assert not missing_flags, f"flags missing from README.md's synopsis: {missing_flags}"


def test_readme_synopsis_names_nothing_the_parser_lacks():
    parser = _parser_commands()
    readme = _readme_commands()
    name = lambda path: "slimsearch " + " ".join(path)  # noqa: E731
    unknown_commands = sorted(name(p) for p in readme if p not in parser)
    assert not unknown_commands, f"README.md's synopsis names commands the parser lacks: {unknown_commands}"
    unknown_flags = sorted(f"{name(p)} {f}" for p, flags in readme.items() for f in flags if f not in parser[p])
    assert not unknown_flags, f"README.md's synopsis names flags the parser lacks: {unknown_flags}"


def test_readme_synopsis_brackets_exactly_the_optional_flags():
    parser = _parser_commands()
    readme = _readme_commands()
    wrong = []
    for path, flags in parser.items():
        for flag, required in flags.items():
            depth = readme.get(path, {}).get(flag)
            if depth is not None and (depth == 0) != required:
                wrong.append(f"slimsearch {' '.join(path)} {flag} ({'required' if required else 'optional'})")
    assert not wrong, f"README.md's synopsis brackets required flags or leaves optional ones bare: {wrong}"


def test_readme_is_at_most_250_lines():
    count = len(README.read_text(encoding="utf-8").splitlines())
    assert count <= MAX_README_LINES, f"README.md has {count} lines; at most {MAX_README_LINES}"


def _relative_links(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"^(```|~~~).*?^\1", "", text, flags=re.S | re.M)  # links in code blocks are code
    text = re.sub(r"`[^`\n]*`", "", text)
    targets = []
    for match in LINK.finditer(text):
        target = match.group(1)
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # a URL (http:, mailto:) or an anchor in the same page
        targets.append(target)
    return targets


DOC_FILES = [README, *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_to_an_existing_file(doc: Path):
    broken = []
    for target in _relative_links(doc):
        file_part = target.split("#", 1)[0].split("?", 1)[0]
        if file_part and not (doc.parent / file_part).exists():
            broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)}: links to files that do not exist: {broken}"


def test_the_link_finder_sees_links_and_skips_urls_and_code(tmp_path: Path):
    page = tmp_path / "page.md"
    page.write_text("[a](docs/a.md) ![b](img.png \"title\") [c](https://x.org/y) [d](#here)\n"
                    "`[e](code.md)`\n```\n[f](block.md)\n```\n[g](docs/g.md#part)\n", encoding="utf-8")
    assert _relative_links(page) == ["docs/a.md", "img.png", "docs/g.md#part"]


def test_ci_runs_the_readmes_second_quickstart_command():
    """.ci/run is README's command 2 (install everything, run the tests), word for word."""
    readme = README.read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)\n```", readme.split("## Quickstart", 1)[1], flags=re.S)
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    assert blocks[1].strip() == ci.strip()
