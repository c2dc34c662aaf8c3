"""`.ci/run` runs exactly the README's test command, in a fresh venv with the test extra (which brings the
pytest-xdist that `-n auto` needs), so CI and a new user run the same suite."""
import os
import re
import shlex

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(rel):
  with open(os.path.join(REPO, rel)) as f:
    return f.read()


def test_ci_runs_the_readme_test_command():
  blocks = re.findall(r"```bash\n(.*?)\n```", _read("README.md"), re.S)
  (setup,) = [b for b in blocks if "pytest" in b]
  install, test = [part.strip() for part in setup.split("&&")]
  assert install == "pip install -e '.[test]'", install
  commands = [ln.split("#")[0].strip() for ln in _read(".ci/run").splitlines()
              if ln.strip() and not ln.lstrip().startswith("#")]
  assert commands[-1] == test, (commands[-1], test)          # the last thing CI does is the README's test
  # the same editable install of the test extra (CI adds -q)
  assert any(c.startswith("python -m pip install") and " -e .[test]" in " ".join(shlex.split(c))
             for c in commands), commands
  extra = re.search(r'^test = \[(.*)\]$', _read("pyproject.toml"), re.M).group(1)
  assert '"pytest-xdist' in extra and "-n auto" in test
