"""``python -m mrc_ref.cases {list,check,regenerate}``

The shipped reference cases: ``list`` prints the cases of a version with their tags and sizes; ``check``
verifies every file against its manifest and that the current code
reproduces every expected value within its stated tolerance (exit 1 on any
failure); ``regenerate`` writes the cases of the generator into a new
version directory (released ones are immutable). See docs/testing.md.
"""

import sys

from .. import cli
from . import case_bytes, case_dir, case_ids, check_files, read_case, read_manifest, resolve_version
from .generate import VERSION, regenerate
from .reference import reproduce


def build_parser():
    parser = cli.parser("python -m mrc_ref.cases", __doc__)
    sub = parser.add_subparsers(dest="command", required=True, help="what to do with the cases")
    for name, help in (("list", "the cases of a version, with their tags and sizes"),
                       ("check", "every file against its manifest, and every expected value reproduced")):
        p = sub.add_parser(name, help=help)
        p.add_argument("--version", help="case version, e.g. v1 (default: the latest)")
    p = sub.add_parser("regenerate", help="write the generator's cases into a new version directory")
    p.add_argument("--version", default=VERSION, help="directory name to create (default: %(default)s)")
    p.add_argument("--into", help="parent directory (default: the installed mrc_ref/cases)")
    p.add_argument("--example", help="the embedded example's directory (default: mrc_ref/example)")
    p.add_argument("--only", help="comma-separated case ids")
    return parser


def main(argv=None):
    def body(args):
        if args.command == "regenerate":
            kwargs = {"into": args.into} if args.into else {}
            only = set(args.only.split(",")) if args.only else None
            for path in regenerate(args.version, example_dir=args.example, only=only, **kwargs):
                print(f"wrote {path} ({case_bytes(path) / 1e6:.2f} MB)")
            return 0
        version = resolve_version(args.version)
        failed = 0
        total = 0
        for case_id in case_ids(version):
            path = case_dir(case_id, version)
            total += case_bytes(path)
            if args.command == "list":
                m = read_manifest(path)
                print(f"{version}/{case_id:18s} {m['difficulty']:8s} {case_bytes(path) / 1e6:5.2f} MB  "
                      f"{', '.join(m['tags'])}")
                continue
            problems = check_files(path)
            if not problems:
                problems = reproduce(read_case(path))
            failed += bool(problems)
            print(f"{version}/{case_id}: {'ok' if not problems else 'FAILED'}")
            for line in problems:
                print(f"  {line}")
        print(f"{version}: {len(case_ids(version))} cases, {total / 1e6:.2f} MB"
              + (f", {failed} failed" if args.command == "check" else ""))
        return 1 if failed else 0

    return cli.run(build_parser(), body, argv)


if __name__ == "__main__":
    sys.exit(main())
