"""Command-line plumbing shared by the scripts: every user error is one line, exit status 2.

`run(argv, doc=..., define_flags=..., main=...)` parses `argv` into a fresh `absl.flags.FlagValues` (so
that the scripts can also be run in-process, one after the other, e.g. by the tests) and calls
`main(flags)`:

* `--help` (`-h`, `--helpshort`, `--helpfull`) prints the script's docstring and its flags on stdout and
  exits 0;
* a bad flag, a missing required flag, an unknown flag or positional argument, a `--config` file that is
  missing or cannot be loaded, and a `--config.a.b=v` override of a key the config does not have (with the
  closest existing key) each print one line `ERROR: <what, and how to fix it>` on stderr and exit 2;
* `guarded(fn, verbose)` does the same for the errors a script's main raises for bad input (`UserError`,
  `ConfigError` — which includes `DataError` and `WorkdirLocked` —, `CheckpointError`, `DistributedError`,
  a missing file; scripts add their own), anything else propagates as a traceback (a bug);
* `--verbose` (every script) adds the traceback to an `ERROR:` line.

Exit statuses shared by the scripts: 0 done, 2 bad input (flags, config, files, a workdir in use),
5 an I/O failure while running (disk full, permission denied: the script names what is intact).
"""
from __future__ import annotations

import difflib
import os
import re
import sys
import traceback
from typing import Callable, List, Optional, Sequence, Tuple, Type

EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_IO_ERROR = 5
_HELP = ("help", "helpshort", "helpfull", "h", "?")


class UserError(ValueError):
  """A problem with what the user gave (flags, files, values); the message says how to fix it."""


def one_line(message) -> str:
  """`message` (an exception or text, possibly several lines such as a config error's list) as one line."""
  if isinstance(message, KeyError) and message.args:
    text = str(message.args[0])
  else:
    text = str(message) if str(message) else type(message).__name__
  out = ""
  for line in text.splitlines():
    line = line.strip()
    if line.startswith("- "):
      line = line[2:]
    if not line:
      continue
    out = line if not out else (f"{out} {line}" if out.endswith((":", ",")) else f"{out}; {line}")
  return " ".join(out.split())


def print_error(message, exc: Optional[BaseException] = None, verbose: bool = False) -> None:
  """`ERROR: <message as one line>` on stderr; with `verbose`, the traceback of `exc` before it."""
  try:
    sys.stdout.flush()
  except Exception:  # noqa: BLE001
    pass
  if verbose and exc is not None:
    traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
  text = one_line(message)
  sys.stderr.write(text if text.startswith("ERROR:") else "ERROR: " + text)
  sys.stderr.write("\n")
  sys.stderr.flush()


def _flag_name(arg: str) -> Optional[str]:
  if not arg.startswith("-") or arg in ("-", "--"):
    return None
  return arg.lstrip("-").split("=", 1)[0]


def wants_help(argv: Sequence[str]) -> bool:
  for a in list(argv)[1:]:
    if a == "--":
      return False
    name = _flag_name(a)
    if name in _HELP and (("=" not in a) or a.split("=", 1)[1].lower() in ("1", "true", "yes")):
      return True
  return False


def wants_verbose(argv: Sequence[str]) -> bool:
  v = False
  for a in list(argv)[1:]:
    name = _flag_name(a)
    if name == "verbose":
      v = ("=" not in a) or a.split("=", 1)[1].lower() in ("1", "true", "yes", "t")
    elif name == "noverbose":
      v = False
  return v


def user_error_types() -> Tuple[Type[BaseException], ...]:
  """The exceptions that mean bad input in every script."""
  from score_sde_jax.checkpoints import CheckpointError
  from score_sde_jax.run.config_utils import ConfigError
  from score_sde_jax.run.parallel import DistributedError
  return (UserError, ConfigError, CheckpointError, DistributedError, FileNotFoundError, NotADirectoryError,
          IsADirectoryError)


# ---------------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------------
def _config_flag_names(fv) -> List[str]:
  from ml_collections.config_flags import config_flags
  return [name for name in fv if config_flags.is_config_flag(fv[name])]


def _given_value(argv: Sequence[str], name: str) -> Optional[str]:
  """The value given to --name in argv (`--name=v` or `--name v`), the last one."""
  value = None
  args = list(argv)
  for i, a in enumerate(args[1:], 1):
    if a in (f"--{name}", f"-{name}") and i + 1 < len(args):
      value = args[i + 1]
    elif a.startswith((f"--{name}=", f"-{name}=")):
      value = a.split("=", 1)[1]
  return value


def config_file_problem(path: str) -> Optional[str]:
  """Why the config file `path` (optionally `path:arg`) cannot be loaded, as one line, or None."""
  from score_sde_jax.run import config_utils
  file_path = path.split(":", 1)[0]
  if not file_path:
    return "the path is empty: pass a config file, e.g. configs/toy/ve_ring8.py"
  if not os.path.exists(file_path):
    return f"{file_path}: no such file. Pass a config file, e.g. configs/toy/ve_ring8.py"
  if os.path.isdir(file_path):
    return f"{file_path} is a directory. Pass a config file, e.g. configs/toy/ve_ring8.py"
  try:
    config = config_utils.load_config_file(file_path, path.split(":", 1)[1] if ":" in path else None)
  except Exception as e:  # noqa: BLE001  (anything the file does)
    where = ""
    if isinstance(e, SyntaxError) and e.lineno:
      where = f" (line {e.lineno})"
    msg = one_line(e.msg if isinstance(e, SyntaxError) else e)
    return f"{file_path} cannot be loaded: {type(e).__name__}{where}: {msg}"
  if config is None:
    return f"{file_path}: get_config() returned None (a missing `return`?)"
  return None


def _unknown_override(fv, argv: Sequence[str]) -> Optional[str]:
  """The first `--<config>.a.b` override in argv naming a key its config does not have, explained."""
  from score_sde_jax.run import config_utils
  for name in _config_flag_names(fv):
    path = _given_value(argv, name)
    if not path:
      continue
    try:
      config = config_utils.load_config_file(path.split(":", 1)[0],
                                              path.split(":", 1)[1] if ":" in path else None)
    except Exception:  # noqa: BLE001
      continue
    known = set(config_utils.flatten(config))
    sections = {k.rsplit(".", i)[0] for k in known for i in range(1, k.count(".") + 1)}
    prefix = re.compile(rf"^-{{1,2}}(no)?{re.escape(name)}\.")
    for a in argv[1:]:
      m = prefix.match(a)
      if not m:
        continue
      key = a[m.end():].split("=", 1)[0]
      if key in known or key in sections:
        continue
      close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
      hint = f"; did you mean --{name}.{close[0]}?" if close else ""
      return f"unknown config key {key!r} in {a}{hint}"
  return None


def parse_flags(fv, argv: Sequence[str], doc: str) -> List[str]:
  """Parses `argv` into `fv`; `--help` prints and exits 0; every problem raises UserError (one line)."""
  from absl import flags
  argv = list(argv)
  if wants_help(argv):
    sys.stdout.write((doc or "").strip() + "\n\nflags:\n" + fv.get_help() + "\n")
    sys.stdout.flush()
    raise SystemExit(EXIT_OK)
  for name in _config_flag_names(fv):
    # ml_collections loads a config file as module `<flag>_config` *into* an existing module of that name
    # (SourceFileLoader.load_module): a second run in one process would keep the first file's get_config.
    sys.modules.pop(f"{name}_config", None)
  saved = sys.argv
  sys.argv = argv          # ml_collections reads the --config.a.b overrides from sys.argv
  try:
    rest = fv(argv)
  except Exception as e:  # noqa: BLE001  (flag errors, and whatever loading a config file raises)
    problem = None
    for name in _config_flag_names(fv):
      path = _given_value(argv, name)
      if path is not None:
        p = config_file_problem(path)
        if p:
          problem = f"--{name} {p}"
          break
    problem = problem or _unknown_override(fv, argv)
    if problem is None:
      problem = one_line(e).rstrip(".")
      m = re.search(r"Flag --(\S+) must have a value other than None", problem)
      if m:
        problem = f"--{m.group(1)} is required"
      if isinstance(e, flags.Error):
        problem += ". See --help for the flags."
    raise UserError(problem) from e
  finally:
    sys.argv = saved
  for name in _config_flag_names(fv):        # a --config file that failed to load parses as an error object
    if type(fv[name].value).__name__ == "_ErrorConfig":
      path = _given_value(argv, name) or ""
      raise UserError(f"--{name} {config_file_problem(path) or path + ' cannot be loaded'}")
  if len(rest) > 1:
    raise UserError(f"unexpected argument(s) {' '.join(rest[1:])!r}: options are --flag=value (see --help).")
  return rest


def run(argv: Optional[Sequence[str]], *, doc: str, define_flags: Callable, main: Callable) -> int:
  """Defines the script's flags (`define_flags(fv)`, plus --verbose) on a fresh FlagValues, parses
  `argv` (default sys.argv) and returns `main(fv)` (an exit status; None means 0)."""
  from absl import flags
  from absl import logging as absl_logging
  argv = list(sys.argv if argv is None else argv)
  fv = flags.FlagValues()
  define_flags(fv)
  flags.DEFINE_bool("verbose", False, "Show the traceback with an ERROR line (user errors are otherwise "
                    "one line).", flag_values=fv)
  try:
    parse_flags(fv, argv, doc)
  except UserError as e:
    print_error(e, e, wants_verbose(argv))
    return EXIT_USER_ERROR
  if not flags.FLAGS.is_parsed():    # absl's own logging asks for its flags: none are used here
    flags.FLAGS.mark_as_parsed()
  absl_logging.set_verbosity(absl_logging.WARNING)   # orbax logs every save at INFO
  code = main(fv)
  return EXIT_OK if code is None else int(code)


def guarded(fn: Callable[[], Optional[int]], *, verbose: bool,
            user_errors: Tuple[Type[BaseException], ...] = ()) -> Callable[[], None]:
  """`fn` with its bad-input errors turned into one `ERROR:` line and SystemExit(2); a non-zero return
  value becomes SystemExit(value).  Other exceptions (bugs) propagate with their traceback."""
  types = user_error_types() + tuple(user_errors)

  def wrapped() -> None:
    try:
      code = fn()
    except types as e:
      print_error(e, e, verbose)
      raise SystemExit(EXIT_USER_ERROR) from None
    if code:
      raise SystemExit(code)

  return wrapped


def start_and_run(fv, fn: Callable[[], Optional[int]], *, user_errors: Tuple[Type[BaseException], ...] = (),
                  clean_exit_codes=()) -> Optional[int]:
  """What train.py, sample.py and evaluate.py do once their flags are parsed: the shared multi-host
  start-up (`--multihost` / SCORE_SDE_DISTRIBUTED=1; a bad setting is one `ERROR:` line and exit 2), then
  `fn` guarded (`guarded`) under `parallel.run_main`."""
  from score_sde_jax.run import parallel
  try:
    parallel.initialize_distributed(True if fv.multihost else None)
  except parallel.DistributedError as e:
    print_error(e, e, fv.verbose)
    return EXIT_USER_ERROR
  parallel.run_main(guarded(fn, verbose=fv.verbose, user_errors=user_errors),
                    clean_exit_codes=clean_exit_codes)
  return None


def define_run_flags(fv) -> None:
  """The flags every running script shares: --multihost and --progress."""
  from absl import flags
  flags.DEFINE_bool("multihost", False, "Multi-host run (also: SCORE_SDE_DISTRIBUTED=1): every host runs the "
                    "same command; JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID where the "
                    "cluster is not detected (TPU pods, SLURM).", flag_values=fv)
  flags.DEFINE_bool("progress", True, "Show a progress bar.", flag_values=fv)


def argument_parser(**kwargs):
  """An `argparse.ArgumentParser` whose errors (a missing or bad option) are one `ERROR:` line with exit
  status 2 (argparse prints the usage and the error on several lines), with a --verbose flag."""
  import argparse

  class _Parser(argparse.ArgumentParser):
    def error(self, message):
      print_error(f"{message}. See --help for the options.")
      raise SystemExit(EXIT_USER_ERROR)

  parser = _Parser(**kwargs)
  parser.add_argument("--verbose", action="store_true", help="show the traceback with an ERROR line")
  return parser
