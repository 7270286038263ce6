"""`python -m bench ...` is `kvstore bench ...`."""

from bench.cli import main

raise SystemExit(main())
