"""``python -m mxmoe.backends.probe``: the probe child (see `mxmoe.backends.probe.child`)."""

import sys

from .child import main

sys.exit(main())
