"""Every subcommand, given bad arguments, fails the way the house rules say: exit status 2 (usage and input errors),
nothing on stdout, and exactly one line on stderr, `error: ...`, never a traceback.

What is asserted for click's own usage errors (unknown option, missing argument, bad value): they are rendered as
the same single `error: ...` line, ending with a `(see 'molmocap CMD --help')` hint, instead of click's three-line
usage block. The one exception is a bare command group (`molmocap`, `molmocap cache`): click answers it with its
help text (exit 2), which is what was asked for.

The walk runs in-process through click's CliRunner (the group renders errors itself, so the runner sees what a user
sees); a few cases run as a real `python -m molmocap` process to cover the entry point.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from conftest import molmocap, noise_image
from molmocap.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEMO_CHECKPOINT = ROOT / "models" / "demo" / "checkpoint"


def leaf_commands(group: click.Group = main, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """The command path of every runnable subcommand, nested groups included."""
    paths = []
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            paths += leaf_commands(command, (*path, name))
        else:
            paths.append((*path, name))
    return paths


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad-arguments")
    image, plain = root / "a.png", root / "plain-file"
    noise_image(40, 60, seed=5).save(image)
    plain.write_text("a file, not a directory")
    return {"img": str(image), "file": str(plain), "missing": str(root / "missing"), "out": str(root / "out")}


# Per command: (arguments, what the one error line says). {img}, {file}, {missing}, {out} are filled in from
# `files`; {ckpt} is the demo checkpoint. Each command also gets an unknown option on top of these.
CASES: dict[tuple[str, ...], list[tuple[list[str], str]]] = {
    ("export",): [
        ([], "missing argument 'SRC'"),
        (["{ckpt}"], "missing option '-o'"),
        (["{ckpt}", "-o", "{out}", "--quant", "int3"], "invalid value for '--quant'"),
        (["{missing}", "-o", "{out}"], "checkpoint not found"),
        (["{ckpt}", "-o", "{file}/model"], "is not a directory"),
    ],
    ("caption",): [
        ([], "missing argument 'IMAGES...'"),
        (["{img}", "--style", "poem"], "invalid value for '--style'"),
        (["{img}", "--max-crops", "0"], "invalid value for '--max-crops'"),
        (["{missing}/b.png"], "image file not found"),
        (["{img}", "--model", "{missing}"], "model directory not found"),
        (["{img}", "--model", "{file}"], "model directory not found"),
        (["{img}", "-o", "{file}/results.jsonl"], "cannot write results file"),
        (["{img}", "--format", "csv"], "give -o FILE"),
    ],
    ("ask",): [
        (["{img}"], "give a QUESTION"),
        (["{img}", "  "], "the question is empty"),
        (["{missing}/b.png", "What?"], "image file not found"),
        (["{img}", "What?", "--model", "{missing}"], "model directory not found"),
        (["{img}", "What?", "--json", "--stream"], "cannot be combined"),
    ],
    ("point",): [
        (["{img}"], "missing argument 'LABEL'"),
        (["{img}", "dog", "--draw", "{missing}/marked.png"], "is not a directory"),
        (["{img}", "dog", "--draw", "{file}/marked.png"], "is not a directory"),
        (["{img}", "dog", "--draw", "{out}.gif"], "use a .png, .jpg or .webp"),
        (["{img}", "dog", "--model", "{missing}"], "model directory not found"),
        # The draw target is checked before the model is even opened.
        (["{img}", "dog", "--model", "{missing}", "--draw", "{missing}/marked.png"], "cannot draw into"),
    ],
    ("serve",): [
        (["--port", "70000"], "invalid value for '--port'"),
        (["--device", "tpu"], "invalid value for '--device'"),
        (["--model", "{missing}"], "model directory not found"),
    ],
    ("info",): [
        (["{missing}"], "model directory not found"),
    ],
    ("cache", "stats"): [
        (["extra"], "got unexpected extra argument"),
    ],
    ("cache", "clear"): [
        (["--model", "{missing}"], "model directory not found"),
    ],
}


def assert_one_line_error(result, code: int, pattern: str) -> None:
    assert isinstance(result.exception, SystemExit), f"not a clean exit: {result.exception!r}\n{result.stderr}"
    assert result.exit_code == code, result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and pattern in lines[0], result.stderr


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), prog_name="molmocap", env={"MOLMOCAP_MODEL": None})


def test_every_subcommand_has_bad_argument_cases():
    assert sorted(CASES) == leaf_commands(), "a command without cases in CASES: add its bad arguments"


@pytest.mark.parametrize("command", leaf_commands(), ids=" ".join)
def test_unknown_option_is_one_line_with_a_help_hint(command):
    result = invoke(*command, "--no-such-option")
    assert_one_line_error(result, 2, "no such option '--no-such-option'")
    assert result.stderr.rstrip().endswith(f"(see 'molmocap {' '.join(command)} --help')")


@pytest.mark.parametrize("command,args,pattern",
                         [(command, args, pattern) for command, cases in CASES.items() for args, pattern in cases],
                         ids=lambda value: " ".join(value) if isinstance(value, (tuple, list)) else None)
def test_bad_arguments_are_one_line_errors(command, args, pattern, files):
    filled = [arg.format(ckpt=DEMO_CHECKPOINT, **files) for arg in args]
    assert_one_line_error(invoke(*command, *filled), 2, pattern)


def test_unknown_command_and_bare_groups():
    assert_one_line_error(invoke("caption-all"), 2, "no such command 'caption-all'")
    for group in ([], ["cache"]):
        result = invoke(*group)
        assert result.exit_code == 2 and "Traceback" not in result.stderr
        assert result.stderr.startswith(f"Usage: molmocap {' '.join(group)}".rstrip()), result.stderr


def test_errors_of_a_real_process(files):
    """The same rendering through the entry point a user runs (`python -m molmocap`)."""
    drawn = molmocap("point", files["img"], "dog", "--draw", f"{files['missing']}/marked.png")
    usage = molmocap("caption", files["img"], "--max-crops", "99")
    model = molmocap("serve", "--model", files["missing"])
    for proc, pattern in [(drawn, "cannot draw into"), (usage, "invalid value for '--max-crops'"),
                          (model, "model directory not found")]:
        assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr, proc.stderr
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and pattern in lines[0], proc.stderr


def test_a_bug_is_one_line_not_a_traceback():
    """An exception no command expects (a bug) is still one line, exit 1; MOLMOCAP_DEBUG=1 gives the traceback."""
    group = type(main)(name="molmocap")

    @group.command()
    def broken() -> None:
        raise RuntimeError("something nobody planned for")

    result = CliRunner().invoke(group, ["broken"], prog_name="molmocap")
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        "error: internal error (RuntimeError: something nobody planned for); please report it with `molmocap info` "
        "(MOLMOCAP_DEBUG=1 shows the traceback)"]
    debug = CliRunner().invoke(group, ["broken"], prog_name="molmocap", env={"MOLMOCAP_DEBUG": "1"})
    assert isinstance(debug.exception, RuntimeError)


def test_a_reader_that_leaves_ends_the_command_quietly(files, tmp_path):
    """`molmocap caption DIR | head -1`: once the reader has gone, no BrokenPipeError traceback (click ends the
    command with status 1 and silences the pipe; the catch-all for bugs must not turn it into an error line)."""
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(40):  # enough answers still to come once the reader has gone, however the two are scheduled
        noise_image(40, 48, seed=i).save(folder / f"{i:02d}.png")
    proc = subprocess.Popen([sys.executable, "-m", "molmocap", "--quiet", "caption", str(folder), "--no-cache",
                             "--max-new-tokens", "4"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    proc.stdout.readline()
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=300) == 1 and stderr == "", stderr
