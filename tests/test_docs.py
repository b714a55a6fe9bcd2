"""Every command the README and docs/ show still exists as written: its subcommand, its flags, the files it names,
and the configs it runs load with its dotted overrides (docs that drift from the code are a bug)."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _shell_lines(path: Path) -> list[str]:
    """Commands of the fenced bash blocks, continuation lines joined, comments dropped."""
    lines, block, joined = [], None, ""
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            block = line[3:].strip() if block is None else None
            continue
        if block not in ("bash", "sh", "shell"):
            continue
        text = re.sub(r"\s+#.*$", "", line).strip()
        if text.startswith("#") or not text:
            continue
        joined = f"{joined} {text[:-1]}" if text.endswith("\\") else f"{joined} {text}"
        if not text.endswith("\\"):
            lines.append(joined.strip())
            joined = ""
    return lines


def _commands() -> list[tuple[str, list[str]]]:
    """(doc, argv after the program) for every mm-ptft / data_tools / bench invocation."""
    found = []
    for doc in DOCS:
        for line in _shell_lines(doc):
            try:
                words = shlex.split(line)
            except ValueError:
                continue
            while words and "=" in words[0] and not words[0].startswith("-"):
                words = words[1:]  # VAR=value prefixes
            if words[:1] == ["deepspeed"] or words[:1] == ["torchrun"]:
                program = next((i for i, w in enumerate(words) if w == "--module" or w.endswith(".py")), None)
                if program is None:
                    continue
                words = (
                    ["mm-ptft", *words[program + 2 :]] if words[program] == "--module" else ["python", *words[program:]]
                )
            if words[:1] == ["mm-ptft"] or words[:3] == ["python", "-m", "mm_ptft"]:
                found.append((doc.name, ["mm-ptft", *words[1 if words[0] == "mm-ptft" else 3 :]]))
            elif words[:3] == ["python", "-m", "data_tools"]:
                found.append((doc.name, ["data_tools", *words[3:]]))
            elif words[:1] == ["python"] and len(words) > 1 and words[1].startswith("bench/"):
                found.append((doc.name, words[1:]))
    return found


COMMANDS = _commands()


def test_the_docs_show_commands():
    programs = {argv[0] for _, argv in COMMANDS}
    assert {"mm-ptft", "data_tools"} <= programs and len(COMMANDS) > 40


def _help(main, argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main([*argv, "--help"])
    return out.getvalue()


@pytest.mark.parametrize(("doc", "argv"), COMMANDS, ids=[f"{d}:{' '.join(a[:2])}" for d, a in COMMANDS])
def test_a_documented_command_exists_with_its_flags_and_configs(doc, argv):
    from mm_ptft.cli import COMMANDS as MM_PTFT

    if argv[0] == "mm-ptft":
        from mm_ptft.cli import main

        assert argv[1] in MM_PTFT, f"{doc}: `mm-ptft {argv[1]}` is not a command"
        if argv[1] == "clip-benchmark":
            return  # CLIP_benchmark's own CLI, its flags are its own
        text = _help(main, argv[1:2])
    elif argv[0] == "data_tools":
        import data_tools

        text = _help(data_tools.main, argv[1:2])
    else:
        script = ROOT / argv[0]
        assert script.is_file(), f"{doc}: {argv[0]} does not exist"
        return
    for flag in (w.split("=")[0] for w in argv[2:] if w.startswith("--") and w != "--local_rank"):
        assert flag in text, f"{doc}: `{' '.join(argv[:2])}` has no option {flag}"
    config = next((argv[i + 1] for i, w in enumerate(argv) if w in ("-c", "--config") and i + 1 < len(argv)), None)
    if argv[0] == "mm-ptft" and argv[1] == "train" and config:
        from mm_ptft.config import load_config
        from mm_ptft.tasks import configure_task

        overrides = [w for w in argv[2:] if "=" in w and not w.startswith("-")]
        configure_task(load_config(ROOT / config, overrides))  # the recipe and its documented overrides


def test_every_file_the_docs_name_exists():
    missing = []
    pattern = re.compile(
        r"(?<![\w/.-])((?:configs|bench|launch|tests|mm_ptft|data_tools|docs)/[\w./-]+\.(?:py|yaml|sh|md|sbatch))"
    )
    for doc in DOCS:
        for path in pattern.findall(doc.read_text()):
            if not (ROOT / path).exists():
                missing.append(f"{doc.name}: {path}")
    assert not missing, missing
