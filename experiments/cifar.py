"""MAXL on CIFAR (and Fashion-MNIST): ``python -m experiments.cifar --xla --workdir runs/maxl``.

Thin glue: flags in, ``maxl_jax.train.train_and_evaluate`` out. Examples::

    python -m experiments.cifar --xla --workdir runs/maxl                         # the reference run
    python -m experiments.cifar --xla --method=single --workdir runs/single
    python -m experiments.cifar --xla --config=experiments/configs/cpu.py \\
        --config.data_dir=../shared/data/fashion_mnist --workdir runs/fmnist

Several processes (hosts): the same command in each, with ``--coordinator_address=HOST:PORT
--num_processes=N --process_id=I`` (or ``MAXL_COORDINATOR_ADDRESS`` / ``MAXL_NUM_PROCESSES`` /
``MAXL_PROCESS_ID``; on a Cloud TPU pod slice, under SLURM or Open MPI JAX finds them itself) and a
``--workdir`` every process can reach (a shared file system or a bucket). See
``maxl_jax.distributed``.
"""

import os
import pathlib
import runpy
import signal
import sys


def _interrupted_while_starting(signum, frame):
    print("\nInterrupted before training started: nothing was saved.", file=sys.stderr, flush=True)
    os._exit(130)


if __name__ == "__main__":
    # Ctrl-C during the seconds of imports below (JAX, TFDS, Orbax) gets the same one line as
    # during loading and compiling, not a KeyboardInterrupt traceback from inside a library.
    signal.signal(signal.SIGINT, _interrupted_while_starting)
    if "startup:0=INT" in os.environ.get("MAXL_FAULT", "").split(","):  # the reliability tests'
        os.kill(os.getpid(), signal.SIGINT)

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags

from maxl_jax import data as data_lib
from maxl_jax import compilation_cache, config_checks, distributed, methods, train
from maxl_jax.checkpoint import CheckpointError

if __name__ == "__main__":  # imported: from here on Ctrl-C is a KeyboardInterrupt again
    signal.signal(signal.SIGINT, signal.default_int_handler)

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(pathlib.Path(__file__).resolve().parent / "configs" / "default.py"),
    "Config file (default: experiments/configs/default.py); fields overridable as --config.x=y.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/default",
                               "Run directory: checkpoints, metrics.jsonl, summary.json, plot. "
                               "An existing one is resumed.")
_XLA = flags.DEFINE_bool("xla", True, "Compile the steps with XLA across all local devices "
                         "(--noxla runs the same code op by op, for debugging).")
_METHOD = flags.DEFINE_enum("method", None, methods.names(), "Overrides config.method.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Several processes: HOST:PORT of process 0's coordinator (or "
    "MAXL_COORDINATOR_ADDRESS). Found automatically on Cloud TPU pod slices, SLURM and Open MPI.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Several processes: how many (or "
                                      "MAXL_NUM_PROCESSES); 1 keeps one process, also on a "
                                      "cluster JAX detects.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Several processes: this one's id, 0 to "
                                   "num_processes - 1 (or MAXL_PROCESS_ID); 0 writes the logs.")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", None, "Folder of JAX's persistent compilation cache, so that a rerun or "
    "resume of the same config loads its compiled steps instead of compiling them (default: "
    "JAX_COMPILATION_CACHE_DIR if set, else $XDG_CACHE_HOME/maxl_jax/jax_cache, i.e. "
    "~/.cache/maxl_jax/jax_cache); --compilation_cache=none turns it off. An unwritable folder "
    "is warned about once and the run goes on without it.")
_HELPCONFIG = flags.DEFINE_bool(
    "helpconfig", False, "Print every config field (--config.<field>, each method's own "
    "--config.<method>.<field>) with its type, default and meaning, and exit; "
    "--helpconfig=markdown prints it as docs/CONFIG.md.")
_TRACEBACK = flags.DEFINE_bool("traceback", False, "Show the Python traceback of an error "
                                "(also with MAXL_TRACEBACK=1); by default a user error prints one "
                                "paragraph.")

# Errors that are the user's to fix: exit 2 with the message alone.
USER_ERRORS = (ValueError, data_lib.DatasetNotFoundError, data_lib.DatasetCorruptError,
               CheckpointError, distributed.PeerError, train.RunFilesError)


def _wants_traceback(argv=()) -> bool:
    """--traceback among ``argv`` (or parsed), or MAXL_TRACEBACK set to anything but 0."""
    flag = "--traceback" in argv or (flags.FLAGS.is_parsed() and _TRACEBACK.value)
    return flag or os.environ.get("MAXL_TRACEBACK", "") not in ("", "0")


def _flag_error(message: str) -> None:
    print(f"\nError: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def parse_flags(argv):
    """absl's flag parsing, with a user's mistake as one paragraph and exit status 2: an unknown
    flag, a misspelled config field (with ml_collections' "did you mean"), a config file that does
    not load. ``--traceback`` (or MAXL_TRACEBACK=1) shows the traceback instead."""
    show = _wants_traceback(argv)
    for arg in argv[1:]:
        if arg in ("--helpconfig", "--helpconfig=markdown"):
            _print_config_reference(arg.endswith("markdown"))
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        if show:
            raise
        _flag_error(f"{e}. `python -m experiments.cifar --helpshort` lists the flags.")
    except (AttributeError, KeyError) as e:  # an override of a field the config does not have
        if show:
            raise
        inner = e.args[0] if e.args and isinstance(e.args[0], BaseException) else e
        text = str(inner.args[0] if inner.args else inner)
        key, _, hint = text.partition("\n")
        key = key.strip("'\"")
        given = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")
                 and key in a.split("=")[0].split(".")[1:]]
        where = given[0] if given else f"--config.{key}"
        _flag_error(f"{where}: the config has no field {key!r}. {hint} The fields are those of the "
                    f"config file (experiments/configs/default.py lists every one, with what it "
                    f"means); each method's own are --config.<method>.<field>.".replace("  ", " "))
    except OSError as e:  # the config file itself
        if show:
            raise
        _config_file_error(e, argv)


def _print_config_reference(as_markdown: bool = False) -> None:
    """--helpconfig: the config reference (experiments/config_reference.py), then exit 0."""
    from experiments import config_reference

    print(config_reference.markdown() if as_markdown else config_reference.text(), end="")
    sys.exit(0)


def _config_file_error(e: OSError, argv) -> None:
    path = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), "")
    reason = str(e).strip().splitlines()[-1].strip()
    _flag_error(f"--config={path}: the config file does not load ({reason}). Give the path of a "
                f"config file, e.g. experiments/configs/default.py, cpu.py or tiny.py.")


def main(argv):
    logging.set_verbosity(logging.ERROR)  # Orbax logs every save, TFDS every probe of a data dir
    if _HELPCONFIG.value:  # (parse_flags answers --helpconfig before parsing; this: app.run(main))
        _print_config_reference()
    if len(argv) > 1:
        _flag_error(f"unexpected arguments {argv[1:]}: every setting is a flag (--name=value, "
                    f"--config.field=value); `python -m experiments.cifar --helpshort` lists them.")
    try:
        config = _CONFIG.value
        "method" in config  # noqa: B015 - the config file is loaded on first use: fail here
    except OSError as e:
        if _wants_traceback():
            raise
        _config_file_error(e, sys.argv)
    if _METHOD.value:
        config.method = _METHOD.value
    show_traceback = _wants_traceback()
    compilation_cache.enable(compilation_cache.resolve(_COMPILATION_CACHE.value))  # pre-compile
    try:  # before any JAX computation
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    except ValueError as e:
        if show_traceback:
            raise
        print(f"\nError: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    if distributed.is_primary():
        warn_ignored(config)
    try:
        summary = train.train_and_evaluate(config, _WORKDIR.value, xla=_XLA.value,
                                           progress=_PROGRESS.value)
    except train.Interrupted as e:
        print(f"\n{e.message}", file=sys.stderr, flush=True)
        sys.exit(143 if e.signum == signal.SIGTERM else 130)
    except KeyboardInterrupt:
        print("\nInterrupted before training started: nothing was saved.", file=sys.stderr)
        sys.exit(130)
    except (*USER_ERRORS, train.NonFiniteError) as e:
        if show_traceback:
            raise
        print(f"\nError: {e}\n(--traceback shows where.)", file=sys.stderr, flush=True)
        sys.exit(1 if isinstance(e, train.NonFiniteError) else 2)
    if summary.get("already_complete") or not distributed.is_primary():
        return
    print(f"final test accuracy {summary['final_test_accuracy']:.4f}, best "
          f"{summary['best_test_accuracy']:.4f} (epoch {summary['best_epoch']}), mean of last "
          f"{summary.get('last_k_evaluated', summary['last_k'])} "
          f"{summary['last_k_mean_test_accuracy']:.4f}; "
          f"{summary['train_time_s']:.0f} s of training. Results in {_WORKDIR.value}")


def warn_ignored(config) -> None:
    """Warns about settings given on the command line that the chosen method does not read."""
    try:
        base = runpy.run_path(flags.FLAGS["config"].config_filename)["get_config"]()
        method_cls = methods.get(config.method)
    except Exception:  # noqa: BLE001 - a warning only; the run validates the config itself
        return
    ignored = config_checks.ignored_settings(config, base, method_cls)
    if ignored:
        print(f"Warning: method {config.method!r} does not use "
              + ", ".join(f"--config.{f}" for f in ignored) + "; they have no effect.",
              file=sys.stderr)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
