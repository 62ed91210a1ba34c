"""Interpretability on GPT-2's network, in TransformerLens's terms: hook points named as TransformerLens
names them for GPT-2 (``hooks``), the activations of a run by name (``cache``), and TransformerLens's
processed weights (``processing``).

Nothing here touches the network itself: the hooked forward pass reads the same parameters as
``gpt2.model.Transformer`` and computes GPT-2's math step by step, so a model that is only run or
generated from never imports this package and pays nothing for it. ``gpt2.GPT2`` exposes it as the
methods ``run_with_cache``, ``run_with_hooks`` and ``processed``.
"""
