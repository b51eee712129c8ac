"""The README's quickstart commands are what CI runs."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_setup_and_test_commands():
    readme = (ROOT / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", quickstart, flags=re.S)
    setup, tests = commands[0], next(c for c in commands if "pytest" in c)
    assert "pip install" in setup
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for command in (setup, tests):
        for line in command.splitlines():
            assert line in ci, f"README command not run by .ci/run: {line}"
