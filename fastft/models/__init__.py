"""How a Hugging Face model is made fast (FastModel, ``fastft.patch``): built on :mod:`fastft.kernels`."""
