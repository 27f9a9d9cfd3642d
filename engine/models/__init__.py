"""Model families. Each provides embedding, layer and head modules plus a per-step ``prepare``."""

from engine.models.llama import LlamaFamily
from engine.models.opt import OPTFamily

FAMILY_CLASSES = {"llama": LlamaFamily, "opt": OPTFamily}
