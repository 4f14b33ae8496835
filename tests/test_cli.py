"""The `lowbit` command line, end to end on a tiny saved Llama."""

import subprocess
import sys

import pytest

from lowbit.cli import _fraction, main

SMALL = ["--tokens", "120", "--context", "64", "--stride", "32", "--new-tokens", "3", "--prompt", "Hi", "--no-progress"]


def test_help_runs_as_a_program():
    out = subprocess.run([sys.executable, "-m", "lowbit.cli", "--help"], capture_output=True, text=True, check=True)
    assert "compare" in out.stdout
    out = subprocess.run([sys.executable, "-m", "lowbit.cli", "compare", "--help"], capture_output=True, text=True,
                         check=True)  # fmt: skip
    assert "--max-ppl-increase" in out.stdout and "Q4_1 GGUF" in out.stdout


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage: lowbit" in capsys.readouterr().out


def test_compare_writes_the_report(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["compare", str(tiny_llama_dir), "--configs", "int8,nf4", "--out", str(out), *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "Memory and speed" in printed and "nf4" in printed and "wrote" in printed
    names = {"report.md", "report.json", "summary.csv", "sensitivity.csv", "tradeoff.png", "sensitivity.png"}
    assert {p.name for p in out.iterdir()} == names
    assert "| int8 |" in (out / "report.md").read_text()


def test_text_file_and_budget(tiny_llama_dir, tmp_path, capsys):
    text = tmp_path / "eval.txt"
    text.write_text("A small text to evaluate on, repeated. " * 5, encoding="utf-8")
    argv = ["compare", str(tiny_llama_dir), "--configs", "nf4", "--text", str(text), "--max-ppl-increase", "50%",
            "--no-timing", *SMALL]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert str(text) in printed and "Budget: perplexity +50.00%" in printed


@pytest.mark.parametrize("argv, message", [
    (["--configs", "int3"], "unknown config 'int3'"),
    (["--no-sensitivity", "--max-ppl-increase", "1%"], "per-layer errors"),
])  # fmt: skip
def test_bad_input_gives_one_line(tiny_llama_dir, capsys, argv, message):
    assert main(["compare", str(tiny_llama_dir), *argv, *SMALL]) == 2
    assert message in capsys.readouterr().err


def test_unreadable_text_is_a_usage_error(tiny_llama_dir, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["compare", str(tiny_llama_dir), "--text", "/nonexistent/eval.txt", *SMALL])
    assert exit.value.code == 2 and "cannot read --text" in capsys.readouterr().err


def test_missing_extra_names_it(tiny_llama_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "rich.console", None)  # makes `import rich.console` fail
    assert main(["compare", str(tiny_llama_dir), *SMALL]) == 2
    assert "pip install 'lowbit[compare]'" in capsys.readouterr().err


def test_percentages():
    assert _fraction("1%") == pytest.approx(0.01) and _fraction("0.02") == 0.02
    with pytest.raises(Exception, match="percentage"):
        _fraction("lots")

