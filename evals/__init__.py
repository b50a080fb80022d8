"""emalab's measurement layer: everything that measures behaviour.

The prompt suite and its builder, the refusal judges, the logit refusal score, judge calibration,
the seven-domain evaluation, the utility axis (KL to base), the emergent-misalignment protocol and
the statistics every verdict uses. Builds on :mod:`interp` (the model-facing layer) and never the
other way round; :mod:`training`, :mod:`probes` and :mod:`study` build on it.
"""
