"""npinv: fast real-image inversion and text-guided editing with diffusion models (Negative-prompt Inversion)."""

import os as _os
import sys as _sys

# Before torch loads OpenMP, which reads it then: a waiting thread spins briefly, then sleeps, unless the
# user chose a policy. Beside other work on the same cores the default spin made runs 35x slower; sleeping at
# once (OMP_WAIT_POLICY=PASSIVE) doubled them on an idle machine (npinv.threads, docs/batch.md).
if "torch" not in _sys.modules and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(_os.environ):
    _os.environ["GOMP_SPINCOUNT"] = "3000"

from npinv.cost import Cost
from npinv.editing import EditResult, edit, edit_batch
from npinv.errors import NpinvError
from npinv.guidance import CFG
from npinv.inversion import Inversion, ddim_inversion
from npinv.methods import METHODS, Method, Reconstruction, reconstruct
from npinv.model import Model, PromptEmbedding, load_model
from npinv.sampling import Branch, sample
from npinv.schedule import Schedule
from npinv.settings import EditSettings, InvertSettings, ReconstructSettings

__version__ = "0.1.0"
__all__ = ["CFG", "METHODS", "Branch", "Cost", "EditResult", "EditSettings", "Inversion", "InvertSettings", "Method",
           "Model", "NpinvError", "PromptEmbedding", "ReconstructSettings", "Reconstruction", "Schedule",
           "ddim_inversion", "edit", "edit_batch", "load_model", "reconstruct", "sample", "__version__"]
