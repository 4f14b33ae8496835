"""The `lowbit` command line, end to end on a tiny saved Llama."""

import subprocess
import sys

import pytest

from lowbit.cli import _percentage, main

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
    assert _percentage("1%") == pytest.approx(0.01) and _percentage("0.5%") == pytest.approx(0.005)
    for ambiguous in ("1", "0.02", "lots", "x%"):  # a bare 1 could be 1% or 100%: refused, not guessed
        with pytest.raises(Exception, match="percentage"):
            _percentage(ambiguous)


def test_the_command_answers_help_and_version_without_importing_torch():
    script = ("import sys, lowbit_cli; lowbit_cli.main(['--help']); lowbit_cli.main(['--version']); "
              "assert 'torch' not in sys.modules, 'the front imported torch'")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert "compare" in out and "export-model" in out and out.strip().splitlines()[-1].startswith("lowbit 0.")
    assert "built against torch" in out


def test_bad_model_path_is_named_at_once(capsys):
    assert main(["compare", "no-such-model-dir", *SMALL]) == 2
    assert "no model at 'no-such-model-dir'" in capsys.readouterr().err


def test_export_model_writes_a_model_directory(tiny_llama_dir, tmp_path, capsys):
    assert main(["export-model", str(tmp_path / "copy"), str(tiny_llama_dir), "--no-progress"]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "copy").iterdir()}
    assert "from_pretrained" in capsys.readouterr().out

