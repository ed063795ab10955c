"""Build the compiled criss-cross attention kernels ahead of time.

    python -m ops.build            # CUDA sources too when PyTorch has CUDA and nvcc is found
    python -m ops.build --cuda     # fail unless the CUDA sources are compiled as well
    python -m ops.build --cpu-only
    python -m ops.build --cuda --dry-run   # the library name (and build key) only; builds nothing

Prints what was built and where; exits non-zero when the build fails. See ``ops.extension``
for the cache and the environment variables.
"""

from __future__ import annotations

import argparse
import sys

from .extension import LIBRARY, BuildError, build, cuda_arch_list, library_name, want_cuda


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.build", description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--cuda", dest="cuda", action="store_true", default=None,
                       help="compile the CUDA sources too, and fail if that is impossible")
    group.add_argument("--cpu-only", dest="cuda", action="store_false",
                       help="compile the C++ sources alone")
    parser.add_argument("--verbose", action="store_true", help="show the compiler's output")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the library name (its build key) and the CUDA architectures; build nothing")
    args = parser.parse_args(argv)
    try:
        if args.dry_run:
            with_cuda = want_cuda(args.cuda)
            print(f"library name: {library_name(with_cuda)}")
            if with_cuda:
                print(f"CUDA architectures: {cuda_arch_list()}")
            return 0
        info = build(cuda=args.cuda, verbose=args.verbose)
    except BuildError as exc:
        print(f"ops.build: {exc}", file=sys.stderr)
        return 1
    print(f"built {LIBRARY} ({' + '.join(info.devices)} kernels) in {info.seconds:.1f} s")
    print(f"library: {info.library}")
    if info.with_cuda:
        print(f"CUDA architectures: {cuda_arch_list()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
