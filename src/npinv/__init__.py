"""npinv: fast real-image inversion and text-guided editing with diffusion models (Negative-prompt Inversion)."""

from npinv.errors import NpinvError
from npinv.guidance import CFG
from npinv.inversion import Inversion, Reconstruction, ddim_inversion, reconstruct
from npinv.model import Model, PromptEmbedding, load_model
from npinv.sampling import Branch, sample
from npinv.schedule import Schedule

__version__ = "0.1.0"
__all__ = ["CFG", "Branch", "Inversion", "Model", "NpinvError", "PromptEmbedding", "Reconstruction", "Schedule",
           "ddim_inversion", "load_model", "reconstruct", "sample", "__version__"]
