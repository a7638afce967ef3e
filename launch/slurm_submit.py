"""Render launch/slurm_gpu.sbatch from flags and submit it with sbatch.

    python launch/slurm_submit.py --nodes=2 --gpus_per_node=8 --partition=gpu --time=12:00:00 \\
        --config=configs/clip.py --workdir=/scratch/runs/clip -- --config.train.num_steps=1000
    python launch/slurm_submit.py ... --dry_run     # print the script and the sbatch command

The rendered script sets `#SBATCH --nodes/--ntasks-per-node/--gres=gpu:G/...` from the flags and
bakes CONFIG, WORKDIR and the overrides in (`set -- ...`, shell-quoted), so the file kept under
`--script_dir` records exactly what ran. The values written into `#SBATCH` lines may hold
letters, digits and a few safe punctuation marks only (`DIRECTIVE_CHARS`): a newline there
would start a shell line of the script. Standard library only.
"""

from __future__ import annotations

import argparse
import re
import shlex
import string
import subprocess
import sys
import time
from pathlib import Path

TEMPLATE = Path(__file__).resolve().with_name("slurm_gpu.sbatch")
_ARGS_BLOCK = re.compile(r"(# >>> run arguments[^\n]*\n)(.*?)(# <<< run arguments)", re.S)
_WORD = string.ascii_letters + string.digits + "._-"
# The characters each flag written into an `#SBATCH` line may hold. bash runs the script (a
# newline, `;` or `$(...)` must not reach it) and sbatch reads the directives with its own
# quoting; `--job_name` also names the rendered file (no `/`).
DIRECTIVE_CHARS = {
    "job_name": _WORD,
    "time": _WORD + ":",
    "partition": _WORD + ",",
    "account": _WORD,
}


def set_directive(script: str, key: str, value: str) -> str:
    """Sets `#SBATCH --key=value`, replacing an existing directive or adding one."""
    line = f"#SBATCH --{key}={value}"
    pattern = re.compile(rf"^#SBATCH --{re.escape(key)}=.*$", re.M)
    if pattern.search(script):
        return pattern.sub(lambda _: line, script)
    last = list(re.finditer(r"^#SBATCH .*$", script, re.M))[-1]
    return script[: last.end()] + "\n" + line + script[last.end() :]


def check_directive_values(args: argparse.Namespace) -> None:
    """Fails naming the flag and the character when a value bound for an `#SBATCH` line holds
    one outside `DIRECTIVE_CHARS` (or `--job_name` / `--time` is empty)."""
    for flag, allowed in DIRECTIVE_CHARS.items():
        value = getattr(args, flag)
        if not value and flag in ("job_name", "time"):
            raise SystemExit(f"slurm_submit.py: --{flag} must not be empty")
        bad = next((c for c in value if c not in allowed), None)
        if bad is not None:
            punctuation = " ".join(c for c in allowed if not c.isalnum())
            raise SystemExit(
                f"slurm_submit.py: --{flag}={value!r}: character {bad!r} is not allowed in an "
                f"#SBATCH line (use letters, digits and {punctuation})"
            )


def render(args: argparse.Namespace, overrides: list[str], template: str) -> str:
    """The sbatch script for these flags: one task (process) per GPU on every node."""
    check_directive_values(args)
    directives = {
        "job-name": args.job_name,
        "nodes": str(args.nodes),
        "ntasks-per-node": str(args.gpus_per_node),
        "gres": f"gpu:{args.gpus_per_node}",
        "cpus-per-task": str(args.cpus_per_task),
        "time": args.time,
    }
    if args.partition:
        directives["partition"] = args.partition
    if args.account:
        directives["account"] = args.account
    script = template
    for key, value in directives.items():
        script = set_directive(script, key, value)
    run_args = [args.config, args.workdir, *overrides]
    block = f"set -- {shlex.join(run_args)}\n"
    if args.python:
        block += f"export PYTHON={shlex.quote(args.python)}\n"
    script, count = _ARGS_BLOCK.subn(lambda m: m.group(1) + block + m.group(3), script)
    if count != 1:
        raise SystemExit(f"slurm_submit.py: no '# >>> run arguments' block in {args.template}")
    return script


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Flags; everything after `--` are config overrides for medvlp_jax.main."""
    overrides: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, overrides = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--config", required=True, help="config file, e.g. configs/clip.py")
    parser.add_argument("--workdir", required=True, help="run directory (shared filesystem)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus_per_node", type=int, default=8, help="= tasks per node")
    parser.add_argument("--cpus_per_task", type=int, default=8)
    parser.add_argument("--time", default="24:00:00")
    parser.add_argument("--partition", default="")
    parser.add_argument("--account", default="")
    parser.add_argument("--job_name", default="medvlp")
    parser.add_argument("--python", default="", help="interpreter on the nodes (default: python)")
    parser.add_argument("--template", default=str(TEMPLATE))
    parser.add_argument("--script_dir", default="slurm_jobs", help="where rendered scripts go")
    parser.add_argument("--dry_run", action="store_true", help="print, do not write or submit")
    args = parser.parse_args(argv)
    for name in ("nodes", "gpus_per_node", "cpus_per_task"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)} must be >= 1")
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    script = render(args, overrides, Path(args.template).read_text())
    path = Path(args.script_dir) / f"{args.job_name}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    command = ["sbatch", str(path)]
    if args.dry_run:
        print(script, end="")
        print(f"# dry run: would write {path} and run: {shlex.join(command)}")
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    print(f"wrote {path}; running: {shlex.join(command)}", flush=True)
    return subprocess.run(command, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
