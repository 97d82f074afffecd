"""The documentation cannot rot: README.md, docs/*.md and slurm/README.md are checked against the
real commands.

- every relative link and image resolves, and an #anchor names a heading of its page (GitHub's slugs);
- every command a page shows (fenced bash blocks and inline code that starts with a command) exists:
  a `segany-*` command is one of pyproject's scripts and every `--flag` it is shown with is in its real
  `--help` (its subcommand's, when it has them); every Hydra override shown for segany-train,
  segany-engine or segany-stage3 (also through slurm/'s sbatch scripts and segany-finetune) composes
  with the real conf/; `python -m MODULE` of this project imports and `python FILE` exists;
- every ```python block compiles and runs, unless the line before it is
  `<!-- compile-only: the reason -->`.
"""

import contextlib
import functools
import importlib
import importlib.util
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser

from segany_train.config_paths import CONFIG_DIR

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "slurm" / "README.md"]
FENCE = re.compile(r"^\s*```(\w*)\s*$")
COMPILE_ONLY = re.compile(r"^<!--\s*compile-only:\s*\S.*-->$")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
PLACEHOLDER = re.compile(r"<[^<>\n]*>")  # <the token>, <array id>: what the reader fills in
SEPARATORS = {"&&", "||", ";", "|"}
# Hydra entry points and the config each composes (their @hydra.main config_name)
HYDRA_CONFIGS = {"segany-train": "train", "segany-engine": "engine/cycle", "segany-stage3": "engine/distributed_stage3"}
# slurm/'s scripts: the command each runs with the arguments it is given, and what it adds first
SBATCH_COMMANDS = {
    "slurm/train.sbatch": ("segany-train", ["trainer=ddp"]),
    "slurm/engine_stage3.sbatch": ("segany-stage3", ["mode=task"]),
    "slurm/engine_stage3_merge.sbatch": ("segany-stage3", ["mode=merge"]),
}
PROJECT_PACKAGES = ("segany_train", "data_engine", "benchmarks")


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    compile_only: bool

    def __str__(self) -> str:
        return f"{rel(self.page)}:{self.line}"


@functools.cache
def parse(page: Path) -> tuple[list[Block], list[tuple[int, str]]]:
    """The page's fenced blocks, and its other lines (number, text) with inline code left in."""
    blocks, prose = [], []
    lines = page.read_text().splitlines()
    i, previous = 0, ""
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if fence is None:
            prose.append((i + 1, lines[i]))
            if lines[i].strip():
                previous = lines[i].strip()
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if FENCE.match(lines[j])), None)
        assert end is not None, f"{rel(page)}:{i + 1}: a code block that is never closed"
        blocks.append(Block(page, i + 1, fence.group(1), "\n".join(lines[i + 1 : end]), bool(COMPILE_ONLY.match(previous))))
        i, previous = end + 1, ""
    return blocks, prose


def github_slugs(page: Path) -> set[str]:
    """The anchors GitHub gives the page's headings: lower case, punctuation dropped, spaces as
    hyphens, a repeated slug numbered -1, -2, ..."""
    slugs, counts = set(), {}
    for _, line in parse(page)[1]:
        heading = HEADING.match(line)
        if heading is None:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(2).strip().lower()).replace(" ", "-")
        n = counts.get(slug, 0)
        slugs.add(f"{slug}-{n}" if n else slug)
        counts[slug] = n + 1
    return slugs


def links(page: Path) -> list[tuple[int, str]]:
    return [
        (number, target)
        for number, line in parse(page)[1]
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line))
        if not re.match(r"[a-z][a-z0-9+.-]*:", target)  # http:, https:, mailto:
    ]


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_relative_link_and_image_resolves(page):
    for number, target in links(page):
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{rel(page)}:{number}: link to {target} names no file ({resolved})"
        if anchor:
            assert resolved.suffix == ".md", f"{rel(page)}:{number}: anchor #{anchor} into a file that is not a page"
            assert anchor in github_slugs(resolved), (
                f"{rel(page)}:{number}: {target}: no heading of {rel(resolved)} has the anchor #{anchor}"
            )


def test_the_docs_index_lists_every_page():
    listed = {target.partition("#")[0] for _, target in links(ROOT / "docs" / "README.md")}
    missing = [p.name for p in (ROOT / "docs").glob("*.md") if p.name != "README.md" and p.name not in listed]
    assert not missing, f"docs/README.md does not link {missing}"


def test_the_readme_stays_a_landing_page_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 220, "README.md is past 220 lines: move the detail to a page under docs/"
    codes = [b.text for b in parse(ROOT / "README.md")[0]]
    assert "pip install torch==2.13.0 -e . && segany-engine" in codes
    assert 'pip install torch==2.13.0 -e ".[dev]" && python -m pytest' in codes


# --- commands -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shown:
    """One command line a page shows, split into words as the shell would split it."""

    where: str
    words: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.where}: {' '.join(self.words)}"


def command_lines(text: str) -> list[tuple[int, str]]:
    """(offset of its first line, the line) for each command line, continuation lines joined."""
    joined, start, current = [], 0, ""
    for offset, line in enumerate(text.splitlines()):
        start = offset if not current else start
        current += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            joined += [(start, current)] if current.strip() else []
            current = ""
    return joined


def split_commands(where: str, line: str) -> list[Shown]:
    words = shlex.split(PLACEHOLDER.sub("PLACEHOLDER", line), comments=True)
    shown, current = [], []
    for word in [*words, ";"]:
        if word in SEPARATORS:
            while current and re.match(r"^[A-Za-z_]\w*=", current[0]):  # VAR=value before a command
                current.pop(0)
            if current:
                shown.append(Shown(where, tuple(current)))
            current = []
        else:
            current.append(word)
    return shown


def shown_commands() -> list[Shown]:
    shown = []
    for page in PAGES:
        blocks, prose = parse(page)
        for block in blocks:
            if block.lang in ("bash", "sh", "shell"):
                for offset, line in command_lines(block.text):
                    shown += split_commands(f"{rel(page)}:{block.line + 1 + offset}", line)
        for number, line in prose:
            for code in re.findall(r"`([^`]+)`", line):
                if re.match(r"(segany-[a-z0-9-]+(\s|$)|python -m \w|python benchmarks/)", code):
                    shown += split_commands(f"{rel(page)}:{number}", code)
    return shown


CHECKED = re.compile(r"^(segany-|sbatch$|python$|.*\.(sh|sbatch)$)")
SHOWN = [s for s in shown_commands() if CHECKED.match(s.words[0])]


def scripts() -> dict[str, str]:
    """pyproject.toml's [project.scripts]: command -> "module:function"."""
    section = re.search(r"^\[project\.scripts\]\n(.*?)(?:^\[|\Z)", (ROOT / "pyproject.toml").read_text(), re.S | re.M)
    return dict(re.findall(r'^([\w-]+)\s*=\s*"([^"]+)"', section.group(1), re.M))


SCRIPTS = scripts()


@functools.cache
def help_text(command: str, subcommand: str | None = None) -> str:
    """The command's real --help (its subcommand's, if given), from its entry point in this process."""
    module, function = SCRIPTS[command].split(":")
    main = getattr(importlib.import_module(module), function)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
        main([subcommand, "--help"] if subcommand else ["--help"])
    assert exited.value.code == 0, f"{command} {subcommand or ''} --help exited with {exited.value.code}"
    return out.getvalue()


def options(help: str) -> set[str]:
    """The option strings of argparse's help: the lines that start with a dash, before their help text."""
    lines = [line.strip().split("  ")[0] for line in help.splitlines() if line.lstrip().startswith("-")]
    return {flag for line in lines for flag in re.findall(r"--?[A-Za-z][\w-]*", line)}


def subcommands(help: str) -> set[str]:
    found = re.findall(r"^\s+\{([\w,-]+)\}", help, re.M)
    return {name for group in found for name in group.split(",")}


HYDRA_OPTIONS = get_args_parser()._option_string_actions


def hydra_overrides(shown: Shown, words: list[str]) -> list[str]:
    """The Hydra overrides of a Hydra entry point's arguments; Hydra's own flags must be its flags."""
    overrides, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word.startswith("-"):
            flag = word.split("=")[0]
            assert flag in HYDRA_OPTIONS, f"{shown}: {flag} is not an option of Hydra's command line"
            skip = HYDRA_OPTIONS[flag].nargs != 0 and "=" not in word
        else:
            overrides.append(word)
    return overrides


def check_composes(shown: Shown, config: str, overrides: list[str]) -> None:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        try:
            compose(config, overrides=overrides)
        except Exception as error:  # the first line says which override
            pytest.fail(f"{shown}: {' '.join(overrides)} does not compose with conf/{config}.yaml: {str(error).splitlines()[0]}")


def check_segany(shown: Shown, command: str, args: list[str]) -> None:
    assert command in SCRIPTS, f"{shown}: {command} is not a command of this package (pyproject.toml's scripts)"
    if command in HYDRA_CONFIGS:
        check_composes(shown, HYDRA_CONFIGS[command], hydra_overrides(shown, args))
        return
    help = help_text(command)
    positional = [a for a in args if not a.startswith("-")]
    sub = positional[0] if positional and positional[0] in subcommands(help) else None
    known = options(help) | (options(help_text(command, sub)) if sub else set())
    for word in args:
        if word.startswith("--"):
            assert word.split("=")[0] in known, f"{shown}: {word.split('=')[0]} is not an option of {command} {sub or ''}".rstrip()
    if command == "segany-finetune":  # its extra words are segany-train overrides on experiment=finetune_folder
        extra = [a for a in positional[1:] if "=" in a]
        if extra:
            check_composes(shown, "train", ["experiment=finetune_folder", f"data.folder={positional[0]}", *extra])


@pytest.mark.parametrize("shown", SHOWN, ids=lambda s: s.where)
def test_every_command_shown_exists_with_its_flags_and_overrides(shown):
    command, args = shown.words[0], list(shown.words[1:])
    if command.startswith("segany-"):
        check_segany(shown, command, args)
    elif command == "sbatch":
        script = next((a for a in args if a.endswith((".sbatch", ".sh"))), None)
        assert script is not None and (ROOT / script).is_file(), f"{shown}: no such script {script}"
        if script in SBATCH_COMMANDS:
            target, first = SBATCH_COMMANDS[script]
            rest = args[args.index(script) + 1 :]
            named = {a.split("=")[0] for a in rest}
            check_segany(shown, target, [f for f in first if f.split("=")[0] not in named] + rest)
    elif command.endswith((".sh", ".sbatch")):
        assert (ROOT / command).is_file(), f"{shown}: no such script {command}"
    elif command == "python" and args[:1] == ["-m"]:
        module = args[1]
        if module.split(".")[0] in PROJECT_PACKAGES:
            assert importlib.util.find_spec(module) is not None, f"{shown}: no module {module}"
    elif command == "python" and args and args[0].endswith(".py"):
        assert (ROOT / args[0]).is_file(), f"{shown}: no such file {args[0]}"


def test_the_pages_show_commands_of_every_kind():
    """The checks above have something to check: the pages show Hydra, argparse and sbatch commands."""
    first = {s.words[0] for s in SHOWN}
    assert {"segany-train", "segany-engine", "segany-amg", "segany-coco", "sbatch"} <= first


# --- python ---------------------------------------------------------------------------------------

PYTHON = [b for page in PAGES for b in parse(page)[0] if b.lang == "python"]


@pytest.mark.parametrize("block", PYTHON, ids=str)
def test_every_python_block_compiles_and_the_short_ones_run(block, tmp_path, monkeypatch):
    code = compile(block.text, str(block), "exec")
    if block.compile_only:
        return
    monkeypatch.chdir(tmp_path)
    with torch.random.fork_rng():  # a snippet's torch.manual_seed must not reseed the tests after it
        exec(code, {"__name__": "__docs__"})
