"""`bastion completion bash|zsh`: the script the real shells load completes commands, each command's options and
an option's choices (built from the CLI's own parser, so a new flag is completed without editing a script)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BASTION = [sys.executable, "-m", "gateway"]


def _script(tmp_path: Path, shell: str) -> Path:
    out = subprocess.run([*BASTION, "completion", shell], capture_output=True, text=True, timeout=30, check=True)
    path = tmp_path / f"bastion.{shell}"
    path.write_text(out.stdout)
    return path


def _complete(shell: list[str], prelude: str, script: Path, words: list[str]) -> list[str]:
    arr = " ".join(f"'{w}'" for w in words)
    code = f'{prelude}source {script}; COMP_WORDS=({arr}); COMP_CWORD={len(words) - 1}; _bastion; echo "${{COMPREPLY[@]}}"'
    out = subprocess.run([*shell, code], capture_output=True, text=True, timeout=30, check=True)
    return out.stdout.split()


def test_bash_completes_commands_options_and_choices(tmp_path: Path) -> None:
    """In bash: `bastion ses<TAB>` is sessions, `bastion sessions --pr<TAB>` is --protocol, and after
    `--protocol` the known protocols; the script registers itself for `bastion`."""
    script = _script(tmp_path, "bash")
    bash = ["bash", "--norc", "--noprofile", "-c"]
    assert _complete(bash, "", script, ["bastion", "ses"]) == ["sessions"]
    assert _complete(bash, "", script, ["bastion", "sessions", "--pr"]) == ["--protocol"]
    assert _complete(bash, "", script, ["bastion", "sessions", "--protocol", "ssh"]) == ["ssh", "ssh-jump", "ssh-web"]
    assert _complete(bash, "", script, ["bastion", "nodes", "--"]) == ["--ca-file", "--help", "--insecure", "--json", "--token", "--url"]
    argv = ["bash", "--norc", "-c", f"source {script}; complete -p bastion"]
    registered = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True)
    assert registered.stdout.strip() == "complete -o default -F _bastion bastion"


def test_zsh_loads_it_through_bashcompinit(tmp_path: Path) -> None:
    """In zsh (compinit, then the script, which loads bashcompinit): the same function offers the commands, a
    command's options and an option's choices (zsh's own matcher then narrows them to what was typed)."""
    script = _script(tmp_path, "zsh")
    zsh = ["zsh", "-f", "-c"]
    prelude = "autoload -U compinit && compinit -u; setopt ksharrays; "
    assert "sessions" in _complete(zsh, prelude, script, ["bastion", "ses"])
    assert "--protocol" in _complete(zsh, prelude, script, ["bastion", "sessions", "--pr"])
    assert set(_complete(zsh, prelude, script, ["bastion", "sessions", "--protocol", ""])) >= {"ssh", "rdp", "tcp"}
