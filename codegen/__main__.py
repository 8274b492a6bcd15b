"""python -m codegen [--list | --write | --show NAME]: see what would be generated."""

import argparse
import sys

from . import emit
from .table import SPECS
from .target import TARGETS


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m codegen", description=__doc__)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--list", action="store_true", help="list the spec table (default)")
    group.add_argument("--files", action="store_true", help="list the generated files and their sizes")
    group.add_argument("--write", action="store_true", help="write changed files into convgen/_generated")
    group.add_argument("--show", metavar="FILE", help="print one generated file, e.g. _fwd_f32.pyx")
    args = parser.parse_args(argv)

    if args.write:
        written = emit.write_all()
        print(f"{len(written)} file(s) written to {emit.GENERATED_DIR}")
        for path in written:
            print("  " + path)
    elif args.files:
        for name, text in sorted(emit.generated_files().items()):
            print(f"{name:28s} {len(text.splitlines()):6d} lines")
    elif args.show:
        files = emit.generated_files()
        if args.show not in files:
            parser.error(f"no generated file {args.show!r}; choose from {sorted(files)}")
        sys.stdout.write(files[args.show])
    else:
        print(f"{'kernel':48s} {'module':18s} {'tile':6s} other tiles the runtime may pick")
        for spec in sorted(SPECS, key=lambda s: s.name):
            tile = f"{spec.tile[0]}x{spec.tile[1]}"
            print(f"{spec.name:48s} {spec.module:18s} {tile:6s} {', '.join(spec.other_tiles)}".rstrip())
        t = SPECS[0].target
        print(f"{len(SPECS)} kernels in {len(emit.extension_modules())} modules, for {t.name} "
              f"({t.vector_bytes}-byte vectors, {t.registers} registers; "
              f"CONVGEN_TARGET={'|'.join(TARGETS)} to see another)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
