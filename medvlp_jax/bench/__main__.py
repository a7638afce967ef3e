"""Dispatches `python -m medvlp_jax.bench NAME [args]` to `medvlp_jax.bench.NAME.main(args)`."""

import importlib
import pkgutil
import sys

import medvlp_jax.bench as bench_pkg


def _available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(bench_pkg.__path__) if m.name[0] != "_")


def main() -> None:
    names = _available()
    if len(sys.argv) < 2 or sys.argv[1] not in names:
        sys.exit(f"usage: python -m medvlp_jax.bench {{{','.join(names)}}} [args]")
    importlib.import_module(f"medvlp_jax.bench.{sys.argv[1]}").main(sys.argv[2:])


if __name__ == "__main__":
    main()
