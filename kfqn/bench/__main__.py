"""``python -m kfqn.bench``."""
import sys

from kfqn.bench.cli import main

sys.exit(main())
