"""What `--help` says first, and bash completion for `python -m runner` (Hydra's covers `python app.py`)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import cli_env, run_cli


@pytest.mark.slow
def test_help_says_what_the_runner_is_its_main_keys_and_companion_commands(workdir):
    res = run_cli(["--help"], workdir)
    assert res.returncode == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].startswith("python -m runner") and "powered by Hydra" not in res.stdout
    assert "elastic agent" in "\n".join(lines[:6]) and "resumes" in "\n".join(lines[:6])
    head = "\n".join(lines[:15])
    assert "trainer.total_epochs" in head and "optimizer.lr" in head and "launch.nproc_per_node" in head
    for command in ("python -m runner.report", "python -m runner.export", "python -m runner.sample"):
        assert command in res.stdout
    assert "model: digits_cnn, linear, mlp, tiny_gpt" in res.stdout  # Hydra's list of groups stays
    assert not (workdir / "outputs").exists()


@pytest.mark.slow
def test_bash_completion_works_for_python_dash_m_runner(workdir):
    script = """
        eval "$(python -m runner -sc install=bash)"
        for line in "python -m runner mod" "python -m runner model=" "runner model=mlp trainer.total_ep" \
                    "python x.py a"; do
            COMP_LINE="$line"; COMP_POINT=${#COMP_LINE}; COMPREPLY=(); _runner_complete; echo "$line|${COMPREPLY[*]}"
        done
    """
    env = {**cli_env(), "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "-c", script], cwd=workdir, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    replies = dict(line.split("|", 1) for line in proc.stdout.splitlines())
    assert replies["python -m runner mod"].split() == ["model.", "model="]
    assert "model=mlp" in replies["python -m runner model="].split()
    assert replies["runner model=mlp trainer.total_ep"] == "trainer.total_epochs="  # the installed command too
    assert replies["python x.py a"] == ""  # other programs are left to the shell
