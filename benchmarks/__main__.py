"""``python -m benchmarks``: see :mod:`benchmarks.cli`."""

import os
import sys

# On a shared CPU, OpenMP's default spin-waiting makes every thread of a busy process burn its time
# slice waiting for the others: measured 8x slower forwards at load 10 on 2 cores. Passive waiting
# must be chosen before torch loads the OpenMP runtime, hence here, before any import of torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from benchmarks.cli import main  # noqa: E402

sys.exit(main())
