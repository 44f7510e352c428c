"""`python -m aha.conformance [--algo A] [--backend B] [--quick] [--report PATH]`."""
import sys

from .cli import main

sys.exit(main())
