"""The paper, nothing else: ``editor`` (read -> encode -> invert -> denoise -> decode), ``denoise``
(the step loop: keyframes, extended attention, propagation, guidance), ``inversion`` (DDIM),
``keyframes`` and ``schedule`` (pure functions: groups, pairs, blend weights, injection timesteps).
How the UNet runs (backends, memory, kernels) is the engine's business."""
