"""Bash completion for `python -m runner` as well as for the `runner` command.

Hydra's own script completes `python app.py` and installed commands only: for `python -m runner`
it looks for a file named `-m` and completes nothing. This one recognises both forms and asks the
runner for the choices (`-sc query=bash`, Hydra's completion) with the line as Hydra expects it.
It takes the place of Hydra's bash plugin (two plugins for one shell are an error in Hydra).
"""

from __future__ import annotations

from hydra._internal.core_plugins.bash_completion import BashCompletion

COMMANDS = "python python3 runner"  # the command words the completion is registered for

SCRIPT = (
    r"""_runner_complete()
{
    local words=($COMP_LINE) helper rest
    if [ "${words[1]}" == "-m" ] && [ "${words[2]}" == "runner" ]; then
        helper="${words[0]} -m runner"
        rest="${COMP_LINE#*-m runner}"
    elif [ "$(basename -- "${words[0]}")" == "runner" ]; then
        helper="${words[0]}"
        rest="${COMP_LINE#*runner}"
    else
        return  # another program: the shell's default (file names)
    fi
    local word=""
    [ "${COMP_LINE: -1}" != " " ] && word="${words[${#words[@]}-1]}"
    local choices
    choices=$(COMP_LINE="runner$rest" COMP_POINT=$((${#rest} + 6)) $helper -sc query=bash 2> /dev/null)
    COMPREPLY=($(compgen -o nospace -o default -W "$choices" -- "$word"))
}
COMP_WORDBREAKS=${COMP_WORDBREAKS//=}
complete -o nospace -o default -F _runner_complete """
    + COMMANDS
)


class RunnerBashCompletion(BashCompletion):
    def install(self) -> None:
        print(f"export _HYDRA_OLD_COMP=$(complete -p python 2> /dev/null)\n{SCRIPT}")

    def uninstall(self) -> None:
        print(f"complete -r {COMMANDS} 2> /dev/null\nunset -f _runner_complete")
        super().uninstall()


def register() -> None:
    """Put RunnerBashCompletion in the place of Hydra's bash plugin."""
    from hydra.core.plugins import Plugins
    from hydra.plugins.completion_plugin import CompletionPlugin

    plugins = Plugins.instance()
    completions = plugins.plugin_type_to_subclass_list.get(CompletionPlugin)
    if completions is not None:
        # Hydra's scan loads its plugin modules afresh: its BashCompletion is not the one imported here.
        completions[:] = [c for c in completions if c.provides() != "bash" or c is RunnerBashCompletion]
    plugins.register(RunnerBashCompletion)
