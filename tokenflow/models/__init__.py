"""Models users bring: ``load`` (Hub ids, folders, SD versions, identity, prompt encoding), ``tiny``
(the random-weight SD-2.1-layout test model, built in code), ``random_weights`` (the one recipe for
random weights, tokenizer, scheduler and text encoder, shared with the benchmark's real-size
architectures), ``layouts`` (the SD UNet/VAE layouts as plain data), ``hf`` (Hugging Face library
plumbing)."""
