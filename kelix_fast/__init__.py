"""kelix_fast: a kernel-optimized inference engine for Kelix (arXiv 2602.09843).

The autoregressive side (Kelix-Tok, the Qwen3 LLM, the Block Decoder and Next-Block-Prediction generation)
is :class:`KelixAR`; ``kelix_fast.KelixAR.tiny()`` builds an embedded tiny model with no files.
:class:`Engine` serves many requests at once over one ``KelixAR`` (continuous batching),
:class:`KelixPipeline` runs chat, text to image and reconstruction, :class:`KelixProcessor` turns chat
messages and images into model inputs, and :class:`EngineOptions` holds the engine-wide choices. The
DiT side's parts: :class:`KelixDiT`, :func:`sample_latents`, :func:`load_vae`, :func:`decode_latents`.
Every ``from_pretrained`` takes a directory or a Hugging Face repo id.
"""

from kelix_fast.ar import GenerationOutput, KelixAR
from kelix_fast.config import ConfigError, KelixARConfig
from kelix_fast.engine import Engine, EngineStats, RequestOutput
from kelix_fast.models.dit import KelixDiT, dit_position_args
from kelix_fast.models.vae import decode_latents, load_vae
from kelix_fast.ops import BackendUnavailableError
from kelix_fast.options import EngineOptions
from kelix_fast.pipeline import KelixPipeline, KelixPipelineOutput
from kelix_fast.processor import KelixProcessor
from kelix_fast.runtime.flow import sample_latents
from kelix_fast.weights import CheckpointError, WeightsMismatchError

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "CheckpointError",
    "ConfigError",
    "Engine",
    "EngineOptions",
    "EngineStats",
    "GenerationOutput",
    "KelixAR",
    "KelixARConfig",
    "KelixDiT",
    "KelixPipeline",
    "KelixPipelineOutput",
    "KelixProcessor",
    "RequestOutput",
    "WeightsMismatchError",
    "__version__",
    "decode_latents",
    "dit_position_args",
    "load_vae",
    "sample_latents",
]
