"""The shell commands shown in the READMEs, found and split (tests/docs/test_readme_commands.py).

A command is one complete shell command of a fenced block tagged bash, sh or shell (every line),
or a `$ `-prompted line of a console transcript (a block tagged console, or an untagged block
whose lines start with `$ `; the lines after it are its output). Comments are dropped (a `#` at
the start of a word outside quotes), `\\` continuations joined, and lines are joined until bash
reads them as complete (a `for ... done` loop is one command). An untagged block that starts like
a command is a problem to fix in the README (tag it bash), so no command hides from the test.
"""

import dataclasses
import os
import re
import shutil
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHELL_TAGS = {"bash", "sh", "shell"}
FENCE = re.compile(r"^(\s*)(```+)\s*([\w+-]*)\s*$")
# The first word of a line that is a command, for untagged blocks that should have been tagged.
COMMAND_START = re.compile(r"^(\.venv/bin/)?(megatron-ntp|python3?|bash|sh|torchrun|sbatch|srun|"
                           r"pip|source|mkdir|for|export|cd)\b|^[A-Z][A-Z0-9_]*=")


@dataclasses.dataclass(frozen=True)
class Command:
    readme: str     # path relative to the repository root
    line: int       # line of the README where the command starts (1-based)
    text: str       # the command, comments dropped and continuations joined
    output: tuple = ()  # a transcript's output lines shown after it


def readmes() -> list[str]:
    """Every README.md in git, relative to the repository root."""
    listed = subprocess.run(["git", "ls-files", "*README.md"], cwd=ROOT, capture_output=True,
                            text=True, check=True)
    return sorted(listed.stdout.split())


def fenced_blocks(text: str):
    """(tag, first line number of the content, content lines) of every fenced block."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence, tag = opening.groups()
        end = i + 1
        while end < len(lines) and lines[end].strip() != fence:
            end += 1
        body = [line[len(indent):] if line.startswith(indent) else line.lstrip()
                for line in lines[i + 1:end]]
        yield tag, i + 2, body
        i = end + 1


def strip_comment(line: str, quote: str | None) -> tuple[str, str | None]:
    """The line without its comment, and the quote still open at its end (quotes may span
    lines). A `#` starts a comment only at the start of a word, outside quotes."""
    out, i = [], 0
    while i < len(line):
        c = line[i]
        if c == "\\" and quote != "'":
            out.append(line[i:i + 2])
            i += 2
            continue
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1] in " \t;|&("):
            break
        out.append(c)
        i += 1
    return "".join(out).rstrip(), quote


def complete(text: str) -> bool:
    """Whether bash reads `text` as complete commands (not cut inside a loop or a quote)."""
    checked = subprocess.run(["bash", "-n", "-c", text], capture_output=True, text=True)
    return checked.returncode == 0 or "unexpected end of file" not in checked.stderr


def split_script(lines: list[str], first_line: int) -> list[tuple[int, str]]:
    """(line number, command) of a shell script's lines."""
    commands, pending, start, quote, continued = [], "", 0, None, False
    for number, raw in enumerate(lines, first_line):
        quote_before = quote
        line, quote = strip_comment(raw, quote)
        if not pending and not line.strip():
            continue
        if not pending:
            start = number
        if continued and not quote_before:
            line = line.lstrip()  # the indentation of a continuation line
        continued = line.endswith("\\") and not quote
        pending += (line[:-1].rstrip() + " ") if continued else (line + "\n")
        if continued or quote or not complete(pending):
            continue
        commands.append((start, pending.strip()))
        pending = ""
    if pending.strip():
        commands.append((start, pending.strip()))
    return commands


def transcript_commands(lines: list[str], first_line: int) -> list[tuple[int, str, tuple]]:
    """(line number, command, output lines) of a console transcript's `$ ` lines."""
    found, i = [], 0
    while i < len(lines):
        if not lines[i].startswith("$ "):
            i += 1
            continue
        start, script = i, [lines[i][2:]]
        while script[-1].rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            script.append(lines[i])
        output = []
        while i + 1 < len(lines) and not lines[i + 1].startswith("$ "):
            i += 1
            output.append(lines[i])
        (line, text), = split_script(script, first_line + start)
        found.append((line, text, tuple(out for out in output if out.strip())))
        i += 1
    return found


def readme_commands(readme: str) -> tuple[list[Command], list[str]]:
    """The commands of one README (a path relative to the repository root), and the problems
    found (untagged command blocks)."""
    with open(os.path.join(ROOT, readme)) as f:
        return commands_in(readme, f.read())


def commands_in(readme: str, text: str) -> tuple[list[Command], list[str]]:
    """The commands of a README's text, and the problems found."""
    commands, problems = [], []
    for tag, first, body in fenced_blocks(text):
        content = [line for line in body if line.strip()]
        if tag in SHELL_TAGS:
            commands += [Command(readme, line, command)
                         for line, command in split_script(body, first)]
        elif tag == "console" or (not tag and content and content[0].startswith("$ ")):
            commands += [Command(readme, line, command, output)
                         for line, command, output in transcript_commands(body, first)]
        elif not tag and content and COMMAND_START.match(content[0]):
            problems.append(f"{readme}:{first - 1}: an untagged block of commands: tag it "
                            f"```bash (or show it as a `$ ` transcript)")
    return commands, problems


def workspace(folder: str) -> str:
    """A stand-in for the repository root in `folder`: every top-level entry in git linked
    (examples/ copied, so that paths relative to its files, like a sweep spec's `root`, stay
    inside), and .venv linked; megatron_ntp/ is left out so that `python -m` imports the
    installed (editable) package, not a second copy. What a command writes stays in `folder`."""
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.split()
    os.makedirs(folder, exist_ok=True)
    for name in sorted({path.split("/")[0] for path in listed} | {".venv"}):
        source, target = os.path.join(ROOT, name), os.path.join(folder, name)
        if name == "megatron_ntp" or not os.path.exists(source):
            continue
        if name == "examples":
            shutil.copytree(source, target)
        else:
            os.symlink(source, target)
    return folder
