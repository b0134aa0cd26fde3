"""The README's `optimal-sampling` commands parse with the CLI's own parser (their flags and values exist), so a
renamed flag fails here rather than on a user's machine. Running them is covered by test_generate_on_cpu.py and
tests/test_demo_on_cpu.py."""

from recipe.optimal_sampling import cli
from tests.readme_commands import readme_commands


def test_every_readme_optimal_sampling_command_parses():
    commands = [c for c in readme_commands() if c[0] == "optimal-sampling"]
    assert {c[1] for c in commands} == {"demo", "generate"}
    for command in commands:
        args = cli.build_parser().parse_args(command[1:])
        assert args.command == command[1]
