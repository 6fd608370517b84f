"""``npinv serve``: invert once and edit many in the browser (Gradio).

- :mod:`npinv.webapp.engine`: the request checks and the server's :class:`Engine` (no Gradio), over
  :mod:`npinv.service` with a per-session :class:`npinv.cache.InversionCache`;
- :mod:`npinv.webapp.app`: the Gradio Blocks page (its edit form derived from :mod:`npinv.settings`)
  and :func:`launch`.
"""

import os

# Gradio and its client phone home (analytics, version check) unless told not to; the app must
# start and answer with no network at all. Set before anything imports gradio.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
