"""``npinv serve``: invert once and edit many in the browser (Gradio).

- :mod:`npinv.webapp.cache`: the bounded per-session inversion cache;
- :mod:`npinv.webapp.engine`: model-facing functions and the server's :class:`Engine` (no Gradio);
- :mod:`npinv.webapp.app`: the Gradio Blocks page and :func:`launch`.
"""

import os

# Gradio and its client phone home (analytics, version check) unless told not to; the app must
# start and answer with no network at all. Set before anything imports gradio.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
