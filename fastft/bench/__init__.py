"""``fastft bench``: fastft against transformers + PEFT (and Liger Kernel) on one LoRA training run.

- :mod:`fastft.bench.cli`: the command (``fastft bench``, ``python -m fastft.bench``): loss, tokens/s and memory
  side by side, a table, ``bench.json``, ``bench.md`` and ``bench.png``;
- :mod:`fastft.bench.step`: the contenders and one measured training run;
- :mod:`fastft.bench.presets`: published architectures with random weights (``--preset``);
- :mod:`fastft.bench.report`: the table, JSON, markdown and plot;
- :mod:`fastft.bench.assets` and :mod:`fastft.bench.data`: the embedded default model, tokenizer and data;
- :mod:`fastft.bench.gpu`: the one-shot GPU suite (``python -m fastft.bench gpu``), built on
  :mod:`fastft.bench.harness` and :mod:`fastft.bench.kernels`.
"""
