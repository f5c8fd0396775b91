"""What ``mml`` prints: its own lines, and none of the notices other libraries print that a
user cannot act on (Lightning's hardware lines and tips, W&B's banners and end-of-run history,
transformers' load reports and progress bars, dependency deprecation warnings).

Called by the CLI only, never on import: tests, notebooks and scripts that use the package see
every library's output. ``mml -v`` skips it. The project's own warnings are never filtered.
"""

from __future__ import annotations

import logging
import os
import warnings

# warnings raised from any module outside this package (the filter's module is a regex)
NOT_OURS = r"^(?!mmlightning)"


def quiet_third_party() -> None:
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=NOT_OURS)
    # Lightning: "GPU available", "Using bfloat16 AMP", the litlogger tip, "Restoring states" (all
    # INFO through its rank-zero loggers; it sets its package loggers to INFO on import, not these)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # W&B: banners, the deprecation of `anonymous` Lightning still passes, the history at the end
    # (the summary table and its "W&B run:" line say where the run is)
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is first imported
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # its fork warning with loader workers
