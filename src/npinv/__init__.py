"""npinv: fast real-image inversion and text-guided editing with diffusion models (Negative-prompt Inversion)."""

import os as _os
import sys as _sys

# Before torch loads OpenMP, which reads it then: waiting threads sleep instead of spinning, unless the
# user chose (beside other work on the same cores, spinning made runs 20-40x slower; npinv.threads).
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
