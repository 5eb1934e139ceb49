"""Expand Hydra sweep syntax into a sweep file: one line of overrides per run, for slurm/array.sbatch.

    python -m peftlab.sweep "init.iters=8,16,32" "seed=1,2,3" -o sweep.txt
    sbatch --array=0-8 slurm/array.sbatch sweep.txt

Parsing is Hydra's own (OverridesParser: `a=1,2`, `choice(...)`, `range(...)`, `glob(...)` over config groups,
quoting), and the product is taken the way Hydra's BasicSweeper takes it (in the order the keys are first given, the
last value of a repeated key winning), so line k holds the overrides of job k of `python run_exp.py -m <same args>`.
Each line is shell words (shlex-quoted), which the array script reads back with `eval`.
"""
from __future__ import annotations

import argparse
import shlex
import sys

from .config import CONF_DIR
from .utils import atomic_write_text

# Set per array task by slurm/array.sbatch; a sweep line that also set them would fight it.
RESERVED = ("hydra.run.dir", "resume")


def expand(overrides: list[str], check: bool = True, for_array: bool = True) -> list[list[str]]:
    """The override lists of every job of the sweep, in Hydra's job order. ``for_array``: refuse what
    slurm/array.sbatch sets per task (a `run_exp.py -m` sweep may give resume=true)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.utils import create_config_search_path
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    bad = [o for o in overrides if o in ("-m", "--multirun") or o.startswith("-")]
    if bad:
        raise ValueError(f"give overrides only (key=value, key=a,b, choice(...), range(...)), not options: {bad}")
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONF_DIR)))  # for glob() over groups
    try:
        parsed = OverridesParser.create(config_loader=loader).parse_overrides(overrides)
        jobs = BasicSweeper.split_arguments(parsed, max_batch_size=None)[0]
    except HydraException as e:
        raise ValueError(f"cannot expand the sweep {overrides}: {e}") from None
    for o in parsed if for_array else ():
        if o.key_or_group in RESERVED:
            raise ValueError(f"{o.key_or_group} is set per task by slurm/array.sbatch (a fixed run folder per task, "
                             f"resume=true so a requeued task continues); leave it out of the sweep")
    if check:
        _check_compose(jobs)
    return jobs


def _check_compose(jobs: list[list[str]]) -> None:
    """Compose and validate every job's config now (the run's own checks, peftlab.config.resolve_config) so a typo or
    an invalid value fails here, not on the cluster."""
    ok, bad = check_jobs(jobs)
    if bad:
        i, msg = bad[0]
        raise ValueError(f"{len(bad)} of {len(jobs)} job(s) are invalid; job {i} ({' '.join(jobs[i])}): {msg}")


def check_jobs(jobs: list[list[str]]) -> tuple[int, list[tuple[int, str]]]:
    """(number of valid jobs, [(job index, error)]) after composing and resolving each job's config."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from .config import compose_config, resolve_config

    bad = []
    for i, job in enumerate(jobs):
        try:
            resolve_config(compose_config(job, run_dir="sweep-check"))  # the run folder is set per task
        except (HydraException, OmegaConfBaseException, ValueError) as e:
            bad.append((i, str(e).strip().splitlines()[0]))
    return len(jobs) - len(bad), bad


def check_lines(lines: list[str]) -> tuple[int, list[tuple[int, str]]]:
    """check_jobs for the lines of a sweep file (shell words, as the array script reads them)."""
    return check_jobs([shlex.split(line) for line in lines if line.strip()])


def override_keys(job: list[str]) -> list[str]:
    """The key (or config group) each override sets, by Hydra's parser (`+`/`++`/`~` dropped)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return [o.key_or_group for o in OverridesParser.create().parse_overrides(list(job))]


def run_name(job: list[str], jobs: list[list[str]]) -> str:
    """A short wandb name for one job of a sweep: its overrides of the keys whose value differs between the jobs
    (what every run shares says nothing about the run; hydra.* and wandb.* never go in). A one-job sweep, or a sweep
    whose jobs are all alike, is named by all its overrides."""
    per_job = [dict(zip(override_keys(j), j)) for j in jobs]
    keys = list(dict.fromkeys(k for d in per_job for k in d))
    varying = {k for k in keys if len({d.get(k) for d in per_job}) > 1}
    mine = dict(zip(override_keys(job), job))
    named = [o for k, o in mine.items() if not k.startswith(("hydra.", "wandb."))]
    short = [mine[k] for k in mine if k in varying and not k.startswith(("hydra.", "wandb."))]
    return ",".join(short or named) or "default"


def to_line(job: list[str]) -> str:
    return " ".join(shlex.quote(o) for o in job)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m peftlab.sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, sweeps included: seed=1,2,3 'init.iters=8,16'")
    ap.add_argument("-o", "--output", help="sweep file to write (default: print the lines)")
    ap.add_argument("--no-check", action="store_true", help="skip validating each job's config")
    ap.add_argument("--check", metavar="SWEEP_FILE", help="validate every line of a sweep file (as each run would, "
                    "before loading anything) and exit non-zero naming the bad lines")
    ap.add_argument("--name-of", nargs=2, metavar=("SWEEP_FILE", "LINE"),
                    help="print the wandb run name of line LINE (0-based) of a sweep file: its overrides that differ "
                         "between the lines (slurm/array.sbatch uses it)")
    args = ap.parse_args(argv)
    if args.check:
        from pathlib import Path

        lines = [l for l in Path(args.check).read_text().splitlines() if l.strip()]
        ok, bad = check_lines(lines)
        for i, msg in bad:
            print(f"{args.check} line {i + 1}: {msg}", file=sys.stderr)
        print(f"{ok} of {len(lines)} lines valid", file=sys.stderr)
        sys.exit(1 if bad else 0)
    if args.name_of:
        path, k = args.name_of
        jobs = [shlex.split(line) for line in open(path).read().splitlines() if line.strip()]
        print(run_name(jobs[int(k)], jobs))
        return
    if not args.overrides:
        ap.error("give the sweep's overrides, or --check SWEEP_FILE, or --name-of SWEEP_FILE LINE")
    try:
        jobs = expand(args.overrides, check=not args.no_check)
    except ValueError as e:
        sys.exit(f"peftlab.sweep: {e}")
    text = "".join(to_line(j) + "\n" for j in jobs)
    if not args.output:
        sys.stdout.write(text)
        return
    atomic_write_text(args.output, text)
    print(f"{len(jobs)} runs -> {args.output}; submit with:\n"
          f"  sbatch --array=0-{len(jobs) - 1} slurm/array.sbatch {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
