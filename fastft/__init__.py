"""fastft: hand-derived Triton kernels that make Hugging Face LLM fine-tuning faster and leaner.

The kernels live in :mod:`fastft.kernels`; model patching (``FastModel``), the TRL glue and sharding
build on them in later layers (see DESIGN.md).
"""

__version__ = "0.1.0.dev0"
